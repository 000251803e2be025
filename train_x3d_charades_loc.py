"""Fine-tune a Kinetics X3D for Charades temporal localization (per-frame multi-label), then test.

    python train_x3d_charades_loc.py -gpu 0,1,2,3 --pretrained models/x3d_m.pt   # the constants below
    python train_x3d_charades_loc.py --demo              # a synthetic Charades-format dataset, on the CPU
    python train_x3d_charades_loc.py --eval-only --checkpoint logs/charades_loc_x3d_m/checkpoints/final.pt

Model: X3D with task='loc' (x3d.py): logits (N, C, T), one per input frame. Training clips carry
per-frame targets (C, T) at the sampled frames' times; frames past either end of the video are
padding (-1) and are masked out of the loss.
Loss, as x3d-multigrid (after pytorch-i3d's Charades script): 0.5 x per-frame BCE with logits +
0.5 x BCE of the time-max-pooled logits against the time-max-pooled targets (padding excluded from
both the mean and the max).
Test: TEST_TEMPORAL_VIEWS windows covering the video (PySlowFast Charades placement: the first at
the start, the last at the end) x TEST_SPATIAL_VIEWS crops; per window the max over crops of the
per-frame sigmoid scores. Every output frame has a time (frame index / FPS); outputs of overlapping
windows at the same time are averaged, and the score at any time is the linear interpolation
between the nearest output times before and after it (held constant before the first and after
the last). That gives the 25 official points t_j = (j - 1) / 25 * length, scored with the official
Charades_v1_localize mAP and written as the official submission (`id framenumber score_1 ..
score_C`), and the dense per-frame mAP of x3d-multigrid / Super-Events (strict bounds, frame times
f / (frames / length)), reported labelled as such on every FRAME_MAP_STRIDE-th frame.
Schedule and settings: those of train_x3d_charades.py (PySlowFast's Charades recipe, Multigrid off).
"""
import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import charades
import synthetic_data
import trainer
from progress import Progress

# --------------------------------------------------------------------------- constants (edit me)
GPU = ""                 # -gpu 0,1,2,3: local GPUs, one process each; empty: CPU
CPU_PROCESSES = 1        # CPU only: number of gloo processes (tests, debugging DDP)
DEMO = False             # generate the synthetic Charades-format dataset and train on it
RUN_NAME = "charades_loc_x3d_m"  # run folder name under LOG_DIR; a rerun with the same name resumes
LOG_DIR = "logs"         # LOG_DIR/RUN_NAME/ holds the run's logs, plots, checkpoints and results
RESUME = True            # continue from logs/<RUN_NAME>/checkpoints/last.pt when it exists
FORCE_RESUME = False     # resume even when schedule settings (batch size, epochs, ...) changed

FRAMES_ROOT = "/data/charades/Charades_v1_rgb"   # <id>/<id>-000001.jpg at 24 fps (or <id>.mp4)
TRAIN_ANNOTATIONS = "/data/charades/Charades_v1_train.csv"  # training videos and their actions
TEST_ANNOTATIONS = "/data/charades/Charades_v1_test.csv"   # also the clip-level validation set
CLASS_LIST = "/data/charades/Charades_v1_classes.txt"      # empty: 157 classes, index = code number
FPS = 24                 # frame rate of the frame folders; RATE counts frames at this rate

X3D_VERSION = "M"        # XS, S, M, L, XL
PRETRAINED = "models/x3d_m.pt"   # Kinetics (or Charades classification) weights
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
WARMUP_START_LR = 0.0001  # at LR_REFERENCE_BATCH, scaled like BASE_LR
MOMENTUM = 0.9           # SGD momentum
NESTEROV = True          # Nesterov momentum
WEIGHT_DECAY = 1e-4      # weight decay of every parameter but BN's (biases too)
BN_WEIGHT_DECAY = 0.0    # weight decay of the BN weights and biases

LONG_CYCLE = False       # Multigrid long cycle (off for fine-tuning, see train_x3d_charades.py)
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
EVAL_PERIOD = 6          # epochs between clip-level validations
CHECKPOINT_PERIOD = 6    # epochs between kept checkpoints (last.pt is written every epoch)
CHECKPOINT_ITERS = 1000  # iterations between last.pt updates inside an epoch; 0: off
PRECISE_BN_BATCHES = 200  # training batches that recompute the BN statistics before an evaluation
TEST_TEMPORAL_VIEWS = 10  # clips per video in the multi-view test, spread over the video
TEST_SPATIAL_VIEWS = 3   # 3: three crops at TEST_CROP; 1: centre crop
TEST_BATCH = 4           # videos per test batch (each with all its views)
FRAME_MAP_STRIDE = 4     # dense frame-mAP on every Nth frame (1: every frame; memory grows with it)

EVAL_ONLY = False        # multi-view test of CHECKPOINT, no training
CHECKPOINT = ""          # for --eval-only / --predict; settings it holds apply unless given as flags

# The demo: X3D-XS fine-tuned from the classification demo's weights (from scratch without them).
DEMO_SETTINGS = dict(
    RUN_NAME="demo_charades_loc_x3d_xs", X3D_VERSION="XS",
    PRETRAINED="logs/demo_charades_x3d_xs/checkpoints/final.pt", FRAMES=8, RATE=3,
    CROP=48, TEST_CROP=48, SHORT_SIDE=[48, 56], BATCH_SIZE=16, BASE_LR=0.05, LR_REFERENCE_BATCH=16,
    STEPS=[0, 10, 13], MAX_EPOCH=15, WARMUP_EPOCHS=1.0, WARMUP_START_LR=0.01, WORKERS=0,
    EVAL_PERIOD=5, CHECKPOINT_PERIOD=0, CHECKPOINT_ITERS=200, LOG_PERIOD=10,
    PRECISE_BN_BATCHES=10, TEST_TEMPORAL_VIEWS=4, TEST_SPATIAL_VIEWS=1, DROPOUT=0.0,
    RANDOM_FLIP=False,
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


def loss(logits, targets):
    """0.5 x masked per-frame BCE + 0.5 x BCE of time-max-pooled logits vs targets (padding = -1 excluded)."""
    logits = logits.float()
    valid = targets[:, :1] >= 0  # (N, 1, T); padding is marked in every class row
    truth = targets.clamp(min=0)
    per_frame = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    frame_loss = (per_frame * valid).sum() / (valid.sum() * logits.shape[1])
    pooled = logits.masked_fill(~valid, torch.finfo(logits.dtype).min).amax(2)
    video_loss = F.binary_cross_entropy_with_logits(pooled, truth.amax(2))
    return 0.5 * frame_loss + 0.5 * video_loss


def clip_frame_map(scores, targets) -> dict:
    """Validation: per-frame mAP (0-1) over the non-padding frames of centre clips (N, C, T)."""
    valid = targets[:, 0] >= 0
    s, t = scores.permute(1, 0, 2)[:, valid], targets.permute(1, 0, 2)[:, valid]
    return {"mAP": charades.frame_map(s.numpy(), t.numpy()).map,
            "protocol": "per-frame mAP of centre clips (not official)"}


@torch.no_grad()
def predict_videos(model, dataset, cfg, d) -> tuple:
    """Per-video ([index], [(25, C) scores at the official points], [(C, Q) dense scores], failed), all ranks.

    trainer.predict_views aggregates over views, which loses the time of each output; this loop keeps it.
    """
    loader = DataLoader(dataset, batch_size=cfg.test_batch, sampler=list(range(d.rank, len(dataset), d.world)),
                        num_workers=cfg.workers, collate_fn=charades.collate_test)
    net = trainer.unwrap(model)
    net.eval()
    mine, failed = [], []
    progress = Progress(len(loader), "localization test", unit="batches", active=d.main)
    with trainer.autocast(cfg, d):
        for views, _, index, bad, infos in loader:
            progress.update()
            failed.extend(bad)
            if len(index) == 0:
                continue
            b, v = views.shape[:2]
            flat = views.reshape(b * v, *views.shape[2:])
            chunk = cfg.test_batch * 3
            probs = torch.cat([net.predict(trainer.to_input(flat[i:i + chunk], d, cfg)).float().cpu()
                               for i in range(0, b * v, chunk)]).double().numpy()
            probs = probs.reshape(b, cfg.test_temporal_views, cfg.test_spatial_views, *probs.shape[1:]).max(2)
            for i, p, info in zip(index.tolist(), probs, infos):
                video = dataset.videos[i]
                scores = p.transpose(1, 0, 2).reshape(p.shape[1], -1)  # (C, K * T)
                frames = np.arange(0, info["num_frames"], cfg.frame_map_stride)
                points = charades.interpolate_scores(info["times"], scores, charades.localization_points(video.length))
                dense = charades.interpolate_scores(info["times"], scores, frames / info["fps"]).T
                mine.append((i, points, dense.astype(np.float32), info["num_frames"]))
    progress.close()
    parts = d.gather((mine, failed))
    rows = sorted((r for p in parts for r in p[0]), key=lambda r: r[0])
    return rows, sorted(f for p in parts for f in p[1])


def test(model, dataset, cfg, d, log, run_dir) -> dict:
    """Official 25-point localization mAP, the dense frame-mAP (labelled), and the submission file."""
    protocol = (f"{cfg.test_temporal_views} temporal x {cfg.test_spatial_views} spatial views, "
                f"{cfg.frames}x{cfg.rate} frames at {cfg.fps:g} fps, crop {cfg.test_crop}; max over crops, "
                "mean over overlapping windows, linear interpolation in time to the 25 official points")
    rows, failed = predict_videos(model, dataset, cfg, d)
    for i in failed:
        log(f"test: {dataset.path(i)} could not be decoded: scored -inf at its 25 points, as the official "
            "script scores entries missing from the submission")
    c = dataset.num_classes
    points = np.full((len(dataset), charades.LOCALIZATION_POINTS, c), -np.inf)
    for i, p, _, _ in rows:
        points[i] = p
    official = charades.localize_map(points, dataset.videos)
    dense_scores, dense_targets = [], []
    for i, _, dense, n in rows:
        video = dataset.videos[i]
        times = charades.dense_frame_times(n, video.length)[::cfg.frame_map_stride]
        dense_scores.append(dense)
        dense_targets.append(charades.frame_targets(video, times, c, strict=True))
    dense = charades.frame_map(dense_scores, dense_targets)
    flat_shape = (c, sum(s.shape[1] for s in dense_scores))
    results = {
        "protocol": protocol, "mAP": official.map, "localize_map": official.map,
        "random_scores_localize_map": charades.random_baseline(charades.localize_map, points.shape, dataset.videos),
        "frame_map": dense.map, "frame_map_protocol": f"{dense.protocol}, every {cfg.frame_map_stride}th frame",
        "random_scores_frame_map": charades.random_baseline(charades.frame_map, flat_shape,
                                                   np.concatenate(dense_targets, axis=1)),
        "videos": len(dataset), "failed_videos": len(failed),
        "submission": os.path.join(run_dir, "submission_localize.txt")}
    log(f"localization test ({protocol}): {official} (uniform random scores "
        f"{results['random_scores_localize_map']:.6f}); {dense} (random "
        f"{results['random_scores_frame_map']:.6f}) over {len(dataset)} videos ({len(failed)} undecodable)")
    if d.main:
        os.makedirs(run_dir, exist_ok=True)
        charades.write_localize_submission(results["submission"], [dataset.videos[r[0]].id for r in rows],
                                           np.stack([r[1] for r in rows]))
    return results


TASK = trainer.Task(name="charades_loc", build_datasets=functools.partial(charades.build_datasets, target="frames"),
                    loss=loss, val_metrics=clip_frame_map, test=test, primary="mAP", model_task="loc",
                    multi_label=True, demo=demo, data_paths=charades.DATA_SETTINGS,
                    test_data=charades.TEST_DATA)


if __name__ == "__main__":
    trainer.main(TASK, CONSTANTS, description=__doc__)
