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
import functools
import os

import numpy as np
import torch.nn.functional as F

import charades
import trainer
from train_x3d_kinetics_multigrid import DEMO_DATASET as kinetics_demo_dataset, fill_preset

# --------------------------------------------------------------------------- constants (edit me)
GPU = ""                 # -gpu 0,1,2,3: local GPUs, one process each; empty: CPU
CPU_PROCESSES = 1        # CPU only: number of gloo processes (tests, debugging DDP)
DEMO = False             # generate the synthetic Charades-format dataset and train on it
RUN_NAME = "charades_x3d_m"
LOG_DIR = "logs"
RESUME = True            # continue from logs/<RUN_NAME>/checkpoints/last.pt when it exists
FORCE_RESUME = False     # resume even when schedule settings (batch size, epochs, ...) changed

FRAMES_ROOT = "/data/charades/Charades_v1_rgb"   # <id>/<id>-000001.jpg at 24 fps (or <id>.mp4)
TRAIN_ANNOTATIONS = "/data/charades/Charades_v1_train.csv"
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
DROPOUT = 0.5
RANDOM_FLIP = True       # training flip; the synthetic demo's classes need it off

BATCH_SIZE = 16          # global clips per iteration (split over processes)
BASE_LR = 0.0375         # for LR_REFERENCE_BATCH clips; scaled linearly to BATCH_SIZE
LR_REFERENCE_BATCH = 16
LR_POLICY = "steps_with_relative_lrs"      # or "cosine"
STEPS = [0, 41, 49]
MAX_EPOCH = 57
GAMMA = 0.1
WARMUP_EPOCHS = 4.0
WARMUP_START_LR = 0.0001  # relative to BASE_LR's batch, like BASE_LR
MOMENTUM = 0.9
NESTEROV = True
WEIGHT_DECAY = 1e-4
BN_WEIGHT_DECAY = 0.0

LONG_CYCLE = False       # Multigrid long cycle (off for fine-tuning, see the docstring)
SHORT_CYCLE = False
EPOCH_FACTOR = 1.5
BN_BASE_SIZE = 8

PRECISION = "fp32"       # fp32, bf16 (autocast) or fp16 (autocast + grad scaler)
CHANNELS_LAST = False
COMPILE = False
ACTIVATION_CHECKPOINTING = False
FAST_DEPTHWISE = True    # CPU: x3d_kernels.py's faster depthwise-conv backward (PyTorch's grads to rounding)
DETERMINISTIC = False
THREADS = 0              # torch intra-op threads per process; 0: torch's default
SEED = 0
WORKERS = 8              # data-loading processes per training process

LOG_PERIOD = 20
EVAL_PERIOD = 6          # epochs between clip-level validations (PySlowFast: 6)
CHECKPOINT_PERIOD = 6
CHECKPOINT_ITERS = 1000
PRECISE_BN_BATCHES = 200
TEST_TEMPORAL_VIEWS = 10
TEST_SPATIAL_VIEWS = 3
TEST_BATCH = 4           # videos per test batch (each with all its views)

EVAL_ONLY = False        # multi-view test of CHECKPOINT, no training
CHECKPOINT = ""

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
DEMO_DATASET = dict(classes=kinetics_demo_dataset["classes"], difficulty="demo")
DEMO_DATA = "data/synthetic_charades"
# ------------------------------------------------------------------------------------------------

CONSTANTS = trainer.constants_of(globals(), exclude=("DEMO_SETTINGS", "DEMO_DATA", "DEMO_DATASET"))


def demo(cfg, settings=DEMO_SETTINGS) -> None:
    """Generate the synthetic Charades-format dataset and apply `settings` not set by flags."""
    import synthetic_data
    try:
        paths = synthetic_data.make_charades(DEMO_DATA, overwrite=True, workers=os.cpu_count() or 1,
                                             **DEMO_DATASET)
    except ValueError as e:
        raise trainer.SetupError(f"{e}; delete {DEMO_DATA} to regenerate it") from None
    cfg.frames_root, cfg.class_list = paths["frames_root"], paths["classes"]
    cfg.train_annotations, cfg.test_annotations = paths["train_csv"], paths["test_csv"]
    for name, value in settings.items():
        if name.lower() not in cfg.explicit:
            setattr(cfg, name.lower(), value)
    if cfg.pretrained == settings.get("PRETRAINED") and not os.path.exists(cfg.pretrained):
        print(f"demo: {cfg.pretrained} not found (run the demo that writes it first to start from "
              "its weights): training from scratch")
        cfg.pretrained = ""


def _dataset(cfg, annotations_flag, mode, target, log):
    """One CharadesDataset of the configuration; a missing path is a SetupError naming its flag."""
    annotations = getattr(cfg, annotations_flag.replace("-", "_"))
    for flag, path in (("frames-root", cfg.frames_root), ("class-list", cfg.class_list),
                       (annotations_flag, annotations)):
        if path and not os.path.exists(path):
            raise trainer.SetupError(
                f"Charades --{flag} {path!r} does not exist: set --{flag} (or the constant at the "
                "top of the script), or run --demo")
    return charades.CharadesDataset(
        cfg.frames_root, annotations, mode, classes=cfg.class_list or None, frames=cfg.frames,
        rate=cfg.rate, crop=cfg.crop, short_side=tuple(cfg.short_side), test_crop=cfg.test_crop,
        temporal_views=cfg.test_temporal_views, spatial_views=cfg.test_spatial_views, fps=cfg.fps,
        target=target, inverse_uniform=cfg.inverse_uniform, seed=cfg.seed,
        random_flip=cfg.random_flip, log=log)


def build_datasets(cfg, log, test_only=False, target="clip"):
    """(train, val, test) Charades datasets; val (centre clips) and test (all views) read the test CSV."""
    fill_preset(cfg)
    try:
        test = _dataset(cfg, "test-annotations", "test", target, log)
        if test_only:
            return None, None, test
        train = _dataset(cfg, "train-annotations", "train", target, log)
        val = _dataset(cfg, "test-annotations", "val", target, log)
    except (ValueError, FileNotFoundError) as e:
        raise trainer.SetupError(str(e)) from None
    if train.num_classes != test.num_classes:
        raise trainer.SetupError(f"{cfg.train_annotations} and {cfg.test_annotations} disagree on "
                                 f"the class count ({train.num_classes} vs {test.num_classes})")
    return train, val, test


def random_baseline(metric, shape, labels, seeds=10) -> float:
    """Mean over `seeds` of `metric(uniform random scores of shape, labels).map`: the chance level."""
    return float(np.mean([metric(np.random.default_rng(s).random(shape), labels).map
                          for s in range(seeds)]))


def clip_map(scores, targets) -> dict:
    """Validation: classify_map of centre-clip sigmoid scores (N, C) against span targets (N, C), in %."""
    return {"mAP": 100.0 * charades.classify_map(scores.numpy(), targets.numpy()).map,
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
    chance = random_baseline(charades.classify_map, full.shape, dataset.videos)
    path = os.path.join(run_dir, "submission_classify.txt")
    results = {"protocol": protocol, "mAP": 100.0 * result.map, "classify_map": result.map,
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


def num_classes(dataset) -> int:
    """Classes of a Charades dataset."""
    return dataset.num_classes


TASK = trainer.Task(name="charades", build_datasets=build_datasets, loss=loss, val_metrics=clip_map,
                    test=test, primary="mAP", n_classes=num_classes, multi_label=True,
                    demo=functools.partial(demo, settings=DEMO_SETTINGS))


if __name__ == "__main__":
    trainer.main(TASK, CONSTANTS, description=__doc__)
