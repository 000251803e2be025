"""Fine-tune a Kinetics X3D on Charades (157-way multi-label classification), then the multi-view test.

    python train_x3d_charades.py -gpu 0,1,2,3 --pretrained models/x3d_m.pt   # the constants below
    python train_x3d_charades.py --demo                 # a synthetic Charades-format dataset, on the CPU
    python train_x3d_charades.py --eval-only --checkpoint logs/charades_x3d_m/checkpoints/final.pt

Loss: BCE with logits over the classes (PySlowFast MODEL.LOSS_FUNC bce_logit, mean reduction).
Test: TEST_TEMPORAL_VIEWS x TEST_SPATIAL_VIEWS views per video, max over views of the sigmoid scores
(PySlowFast DATA.ENSEMBLE_METHOD max), scored with the official Charades_v1_classify mAP; the
official submission file (`id score_1 .. score_C`) is written to logs/<RUN_NAME>/, where
`python charades.py classify --annotations TEST_ANNOTATIONS --submission FILE` gives the same mAP.

Schedule: PySlowFast's Charades recipe (configs/Charades/SLOWFAST_16x8_R50[_multigrid].yaml: batch
16, BASE_LR 0.0375, steps_with_relative_lrs with STEPS [0, 41, 49] and LRS [1, 0.1, 0.01], MAX_EPOCH
57, 4 warm-up epochs from 0.0001, momentum 0.9, weight decay 1e-4, no BN weight decay, dropout 0.5,
jitter scales drawn inverse-uniformly). FAIR published no X3D Charades config; we use that recipe
unchanged for X3D. The LR steps are expressed as GAMMA 0.1 per step (the same LRs).
Multigrid: that SlowFast config turns both cycles on; they are off here by default (LONG_CYCLE /
SHORT_CYCLE) because a fine-tune of 57 epochs from Kinetics weights gains little from the long
cycle's coarse shapes, and it keeps the full-shape BN statistics of the checkpoint. Both work
through the same MultigridPlan as Kinetics when switched on.
Edit the constants or override any of them on the command line (`--help` lists them all).
"""
import os

import numpy as np
import torch.nn.functional as F

import charades
import synthetic_data
import trainer

# --------------------------------------------------------------------------- constants (edit me)
GPU = ""                 # -gpu 0,1,2,3: local GPUs, one process each; empty: CPU
CPU_PROCESSES = 1        # CPU only: number of gloo processes (tests, debugging DDP)
DEMO = False             # generate the synthetic Charades-format dataset and train on it
RUN_NAME = "charades_x3d_m"  # run folder name under LOG_DIR; a rerun with the same name resumes
LOG_DIR = "logs"         # LOG_DIR/RUN_NAME/ holds the run's logs, plots, checkpoints and results
RESUME = True            # continue from logs/<RUN_NAME>/checkpoints/last.pt when it exists
FORCE_RESUME = False     # resume even when schedule settings (batch size, epochs, ...) changed

FRAMES_ROOT = "/data/charades/Charades_v1_rgb"   # <id>/<id>-000001.jpg at 24 fps (or <id>.mp4)
TRAIN_ANNOTATIONS = "/data/charades/Charades_v1_train.csv"  # training videos and their actions
TEST_ANNOTATIONS = "/data/charades/Charades_v1_test.csv"   # also the clip-level validation set
CLASS_LIST = "/data/charades/Charades_v1_classes.txt"      # empty: 157 classes, index = code number
FPS = 24                 # frame rate of the frame folders; RATE counts frames at this rate

X3D_VERSION = "M"        # XS, S, M, L, XL
PRETRAINED = "models/x3d_m.pt"   # Kinetics weights: FAIR .pyth, pytorchvideo, x3d-multigrid, ours
FRAMES = 0               # 0: the preset's (XS 4, S 13, M/L/XL 16)
RATE = 0                 # frame stride at FPS; 0: the preset's (XS 12, S 6, M/L/XL 5)
CROP = 0                 # train crop; 0: the preset's (160 / 224 / 312)
TEST_CROP = 0            # 0: the preset's (182 / 256 / 356)
SHORT_SIDE = []          # train short-side jitter [min, max]; empty: the preset's
INVERSE_UNIFORM = True   # PySlowFast Charades DATA.INV_UNIFORM_SAMPLE: short side uniform in 1/size
DROPOUT = 0.5            # dropout before the classifier
RANDOM_FLIP = True       # training flip; the synthetic demo's classes need it off

BATCH_SIZE = 16          # global clips per iteration (split over processes)
BASE_LR = 0.0375         # for LR_REFERENCE_BATCH clips; scaled linearly to BATCH_SIZE
LR_REFERENCE_BATCH = 16  # the global batch BASE_LR is meant for
LR_POLICY = "steps_with_relative_lrs"      # or "cosine"
COSINE_BATCH_FACTOR = True  # cosine + long cycle: LR x the phase's batch factor; False: PySlowFast's (no factor)
STEPS = [0, 41, 49]      # epochs where the LR steps down by GAMMA (before Multigrid rescales them)
MAX_EPOCH = 57           # training epochs (before Multigrid rescales them)
GAMMA = 0.1              # LR ratio between steps (steps_with_relative_lrs)
WARMUP_EPOCHS = 4.0      # epochs of linear LR warm-up from WARMUP_START_LR (not rescaled)
WARMUP_START_LR = 0.0001  # relative to BASE_LR's batch, like BASE_LR
MOMENTUM = 0.9           # SGD momentum
NESTEROV = True          # Nesterov momentum
WEIGHT_DECAY = 1e-4      # weight decay of every parameter but BN's (biases too)
BN_WEIGHT_DECAY = 0.0    # weight decay of the BN weights and biases

LONG_CYCLE = False       # Multigrid long cycle (off for fine-tuning, see the docstring)
SHORT_CYCLE = False      # Multigrid short cycle: iterations at smaller crops with bigger batches
EPOCH_FACTOR = 1.5       # long cycle: the schedule's epochs x this (PySlowFast's 1.5)
BN_BASE_SIZE = 8         # samples per BN split on each GPU in long-cycle phases

PRECISION = "fp32"       # fp32, bf16 (autocast) or fp16 (autocast + grad scaler)
CHANNELS_LAST = False    # channels-last 3D memory format (slower for X3D on an H200: bench/README.md)
COMPILE = False          # torch.compile the model
ACTIVATION_CHECKPOINTING = False  # recompute activations in the backward pass: less memory, more time
FAST_DEPTHWISE = True    # CPU: x3d_kernels.py's faster depthwise-conv backward (PyTorch's grads to rounding)
DETERMINISTIC = False    # torch's deterministic algorithms; no cuDNN autotuning
THREADS = 0              # torch intra-op threads per process; 0: torch's default
SEED = 0                 # seed of the weights, the sampler and every clip
WORKERS = 8              # data-loading processes per training process

LOG_PERIOD = 20          # iterations between log lines
EVAL_PERIOD = 6          # epochs between clip-level validations (PySlowFast: 6)
CHECKPOINT_PERIOD = 6    # epochs between kept checkpoints (last.pt is written every epoch)
CHECKPOINT_ITERS = 1000  # iterations between last.pt updates inside an epoch; 0: off
PRECISE_BN_BATCHES = 200  # training batches that recompute the BN statistics before an evaluation
TEST_TEMPORAL_VIEWS = 10  # clips per video in the multi-view test, spread over the video
TEST_SPATIAL_VIEWS = 3   # 3: three crops at TEST_CROP; 1: centre crop
TEST_BATCH = 4           # videos per test batch (each with all its views)

EVAL_ONLY = False        # multi-view test of CHECKPOINT, no training
CHECKPOINT = ""          # for --eval-only / --predict; settings it holds apply unless given as flags

# The demo: X3D-XS fine-tuned from the Kinetics demo's weights (from scratch without them), on a
# synthetic dataset of the Kinetics demo's motions at its speed and size, 8-frame clips one
# eighth of a second apart (its 8-frame phases: 2-4 frames at 30 fps) at crop 48, sized for a
# 2-core CPU (see README for its numbers).
DEMO_SETTINGS = dict(
    RUN_NAME="demo_charades_x3d_xs", X3D_VERSION="XS",
    PRETRAINED="logs/demo_kinetics_x3d_xs/checkpoints/final.pt", FRAMES=8, RATE=3,
    CROP=48, TEST_CROP=48, SHORT_SIDE=[48, 56], BATCH_SIZE=16, BASE_LR=0.05, LR_REFERENCE_BATCH=16,
    STEPS=[0, 10, 13], MAX_EPOCH=15, WARMUP_EPOCHS=1.0, WARMUP_START_LR=0.01, WORKERS=0,
    EVAL_PERIOD=5, CHECKPOINT_PERIOD=0, CHECKPOINT_ITERS=200, LOG_PERIOD=10,
    PRECISE_BN_BATCHES=10, RANDOM_FLIP=False, TEST_TEMPORAL_VIEWS=10, TEST_SPATIAL_VIEWS=1, DROPOUT=0.0,
)
DEMO_DATASET = dict(classes=synthetic_data.DEMO_MOTIONS, difficulty="demo")  # the Kinetics demo's motions
DEMO_DATA = "data/synthetic_charades"
# ------------------------------------------------------------------------------------------------

CONSTANTS = trainer.constants_of(globals(), exclude=("DEMO_SETTINGS", "DEMO_DATA", "DEMO_DATASET"))


def demo(cfg) -> None:
    """--demo: write the synthetic Charades-format dataset and train on it (trainer.run_demo)."""
    trainer.run_demo(cfg, charades.DATA_SETTINGS, DEMO_DATA,
                     lambda: charades.use_demo_dataset(cfg, DEMO_DATA, **DEMO_DATASET), DEMO_SETTINGS,
                     hint=f"; delete {DEMO_DATA} to regenerate it")


def clip_map(scores, targets) -> dict:
    """Validation: classify_map (0-1, as the test) of centre-clip sigmoid scores against span targets."""
    return {"mAP": charades.classify_map(scores.numpy(), targets.numpy()).map,
            "protocol": "centre clip, span targets (not the official test)"}


def test(model, dataset, cfg, d, log, run_dir) -> dict:
    """Multi-view test: max over views of sigmoid scores; official Charades_v1_classify mAP; submission."""
    protocol = (f"{cfg.test_temporal_views} temporal x {cfg.test_spatial_views} spatial views, "
                f"{cfg.frames}x{cfg.rate} frames at {cfg.fps:g} fps, crop {cfg.test_crop}, max of "
                "sigmoid over views; official Charades_v1_classify mAP")
    index, scores, _, failed = trainer.predict_views(model, dataset, charades.collate_test, cfg, d,
                                                     aggregate="max")
    for i in failed:
        log(f"test: {dataset.path(i)} could not be decoded: scored -inf, as the official script "
            "scores a video missing from the submission")
    full = np.full((len(dataset), dataset.num_classes), -np.inf)
    full[index.numpy()] = scores.double().numpy()
    result = charades.classify_map(full, dataset.videos)
    chance = charades.random_baseline(charades.classify_map, full.shape, dataset.videos)
    path = os.path.join(run_dir, "submission_classify.txt")
    results = {"protocol": protocol, "mAP": result.map, "classify_map": result.map,
               "random_scores_map": chance, "videos": len(dataset), "failed_videos": len(failed),
               "submission": path}
    log(f"multi-view test ({protocol}): {result} over {len(dataset)} videos ({len(failed)} "
        f"undecodable); uniform random scores: {chance:.6f}; submission {path}")
    if d.main:
        os.makedirs(run_dir, exist_ok=True)
        charades.write_classify_submission(path, [dataset.videos[i].id for i in index.tolist()],
                                           scores.double().numpy())
    return results


def loss(logits, targets):
    """BCE with logits on float32 (mean over clips and classes)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


TASK = trainer.Task(name="charades", build_datasets=charades.build_datasets, loss=loss,
                    val_metrics=clip_map, test=test, primary="mAP", multi_label=True, demo=demo,
                    data_paths=charades.DATA_SETTINGS, test_data=charades.TEST_DATA)


if __name__ == "__main__":
    trainer.main(TASK, CONSTANTS, description=__doc__)
