"""Train X3D on Kinetics-400 with Multigrid, then run the multi-view test.

    python train_x3d_kinetics_multigrid.py -gpu 0,1,2,3        # the constants below, on 4 GPUs
    python train_x3d_kinetics_multigrid.py --demo              # a synthetic dataset, on the CPU
    python train_x3d_kinetics_multigrid.py --eval-only --checkpoint models/x3d_m.pt -gpu 0
    python train_x3d_kinetics_multigrid.py --predict some_video.mp4 --checkpoint PATH

Edit the constants or override any of them on the command line (`--help` lists them all).
A run writes everything to logs/<RUN_NAME>/ and resumes from there when restarted.
"""
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

import checkpoints
import kinetics_multigrid
import synthetic_data
import trainer
import transforms
import x3d

# --------------------------------------------------------------------------- constants (edit me)
GPU = ""                 # -gpu 0,1,2,3: local GPUs, one process each; empty: CPU
CPU_PROCESSES = 1        # CPU only: number of gloo processes (tests, debugging DDP)
DEMO = False             # generate the synthetic Kinetics-format dataset and train on it
RUN_NAME = "kinetics_x3d_m"  # run folder name under LOG_DIR; a rerun with the same name resumes
LOG_DIR = "logs"         # LOG_DIR/RUN_NAME/ holds the run's logs, plots, checkpoints and results
RESUME = True            # continue from logs/<RUN_NAME>/checkpoints/last.pt when it exists
FORCE_RESUME = False     # resume even when schedule settings (batch size, epochs, ...) changed

TRAIN_ROOT = "/data/kinetics400/train"     # <label>/<youtube_id>_<start>_<end>.mp4 (or frames)
TRAIN_ANNOTATIONS = "/data/kinetics400/annotations/train.csv"   # Kinetics CSV, `path label`, JSON
VAL_ROOT = "/data/kinetics400/val"         # videos of the validation and the multi-view test
VAL_ANNOTATIONS = "/data/kinetics400/annotations/validate.csv"  # Kinetics CSV, `path label`, JSON
CLASS_LIST = ""          # one class name per line; empty: alphabetical order of the names
TARGET_FPS = 30          # videos are read at this frame rate; RATE counts frames at it

X3D_VERSION = "M"        # XS, S, M, L, XL
PRETRAINED = ""          # initial weights: FAIR .pyth, pytorchvideo, x3d-multigrid .pt, ours
FRAMES = 0               # 0: the preset's (XS 4, S 13, M/L/XL 16)
RATE = 0                 # frame stride at TARGET_FPS; 0: the preset's (XS 12, S 6, M/L/XL 5)
CROP = 0                 # train crop; 0: the preset's (160 / 224 / 312)
TEST_CROP = 0            # 0: the preset's (182 / 256 / 356)
SHORT_SIDE = []          # train short-side jitter [min, max]; empty: the preset's
DROPOUT = 0.5            # dropout before the classifier
RANDOM_FLIP = True       # training flip; the synthetic demo's classes need it off

BATCH_SIZE = 128         # global clips per iteration at the full shape (split over processes)
BASE_LR = 0.1            # for LR_REFERENCE_BATCH clips; scaled linearly to BATCH_SIZE
LR_REFERENCE_BATCH = 128  # the global batch BASE_LR is meant for
LR_POLICY = "cosine"     # X3D's recipe; or "steps_with_relative_lrs" (PySlowFast's Multigrid)
COSINE_BATCH_FACTOR = True  # cosine + long cycle: LR x the phase's batch factor; False: PySlowFast's (no factor)
STEPS = [0, 118, 193, 246]  # epochs that place the long cycles (cosine) or the LR steps
MAX_EPOCH = 300          # before Multigrid rescales it (x epoch factor 1.5 -> 450)
GAMMA = 0.1              # LR ratio between steps (steps_with_relative_lrs)
WARMUP_EPOCHS = 35.0     # epochs of linear LR warm-up from WARMUP_START_LR (not rescaled)
WARMUP_START_LR = 0.01   # at LR_REFERENCE_BATCH, scaled like BASE_LR
MOMENTUM = 0.9           # SGD momentum
NESTEROV = True          # Nesterov momentum
WEIGHT_DECAY = 5e-5      # weight decay of every parameter but BN's (biases too)
BN_WEIGHT_DECAY = 0.0    # weight decay of the BN weights and biases

LONG_CYCLE = True        # Multigrid long cycle: phases of bigger batches of smaller clips
SHORT_CYCLE = True       # Multigrid short cycle: iterations at smaller crops with bigger batches
EPOCH_FACTOR = 1.5       # long cycle: the schedule's epochs x this (PySlowFast's 1.5)
BN_BASE_SIZE = 8         # samples per BN split on each GPU in long-cycle phases
CONSTANT_BATCH = False   # long cycle at the base batch and LR in every phase (a small-data variant, not PySlowFast's)

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
EVAL_PERIOD = 10         # epochs between clip-level validations
CHECKPOINT_PERIOD = 10   # epochs between kept checkpoints (last.pt is written every epoch)
CHECKPOINT_ITERS = 1000  # iterations between last.pt updates inside an epoch; 0: off
PRECISE_BN_BATCHES = 200  # training batches that recompute the BN statistics before an evaluation
TEST_TEMPORAL_VIEWS = 10  # clips per video in the multi-view test, spread over the video
TEST_SPATIAL_VIEWS = 3   # 3: 30-view protocol at TEST_CROP; 1: centre crop
TEST_BATCH = 4           # videos per test batch (each with all its views)

EVAL_ONLY = False        # multi-view test of CHECKPOINT, no training
CHECKPOINT = ""          # for --eval-only / --predict; settings it holds apply unless given as flags
PREDICT = ""             # a video file: print its top-5 classes with CHECKPOINT's weights

# The demo: X3D-XS on the synthetic dataset, sized for a 2-core CPU (see README for its numbers).
# 16 frames, so the coarsest long-cycle shape still holds 4 (on 2-frame clips of these small objects
# held-out clip accuracy was under 50% after 500 iterations); no short cycle (its 24-pixel crops
# hold too little of them); PySlowFast's stepwise Multigrid LRs, so the first long cycle trains at
# the full base LR; three motions of different kind (with a second translation, moving down, most
# errors were down <-> right: 65-90% over seeds instead of 85-100%); 3 x 128 training videos, so
# every Multigrid batch (64, 32, 16, 8) divides an epoch.
DEMO_SETTINGS = dict(
    RUN_NAME="demo_kinetics_x3d_xs", X3D_VERSION="XS", FRAMES=16, RATE=2, CROP=48, TEST_CROP=48,
    SHORT_SIDE=[48, 56], BATCH_SIZE=8, BASE_LR=0.1, LR_REFERENCE_BATCH=16,
    LR_POLICY="steps_with_relative_lrs", STEPS=[0, 17, 19], MAX_EPOCH=20, WARMUP_EPOCHS=2.0,
    SHORT_CYCLE=False, BN_BASE_SIZE=4, WORKERS=1, EVAL_PERIOD=12, CHECKPOINT_PERIOD=0,
    CHECKPOINT_ITERS=200, LOG_PERIOD=40, PRECISE_BN_BATCHES=40, TEST_TEMPORAL_VIEWS=5,
    TEST_SPATIAL_VIEWS=3, DROPOUT=0.0, RANDOM_FLIP=False,
)
DEMO_DATA = "data/synthetic_kinetics_demo"
DEMO_DATASET = dict(classes=synthetic_data.DEMO_MOTIONS, difficulty="demo", train_per_class=128,
                    val_per_class=20)
# ------------------------------------------------------------------------------------------------

CONSTANTS = trainer.constants_of(globals(), exclude=("DEMO_SETTINGS", "DEMO_DATA", "DEMO_DATASET"))


DATA_SETTINGS = ("train_root", "train_annotations", "val_root", "val_annotations", "class_list")


def demo(cfg) -> None:
    """--demo: write the synthetic Kinetics-format dataset and train on it (trainer.run_demo)."""
    def write():
        paths = synthetic_data.make_kinetics(DEMO_DATA, progress=True, overwrite=True,
                                             workers=os.cpu_count() or 1, **DEMO_DATASET)
        cfg.train_root, cfg.train_annotations = paths["train_root"], paths["train_csv"]
        cfg.val_root, cfg.val_annotations = paths["val_root"], paths["val_csv"]
        cfg.class_list = paths["classes"]
    trainer.run_demo(cfg, DATA_SETTINGS, DEMO_DATA, write, DEMO_SETTINGS)


def _dataset(cfg, root, annotations, mode, log, classes=None, classes_from=None):
    return kinetics_multigrid.KineticsDataset(
        root, annotations, mode, class_list=cfg.class_list or None, classes=classes,
        classes_from=classes_from, frames=cfg.frames,
        rate=cfg.rate, crop=cfg.crop, short_side=tuple(cfg.short_side), test_crop=cfg.test_crop,
        temporal_views=cfg.test_temporal_views, spatial_views=cfg.test_spatial_views,
        target_fps=cfg.target_fps, seed=cfg.seed, random_flip=cfg.random_flip, log=log)


def build_datasets(cfg, log, test_only=False):
    """(train, val, test) Kinetics datasets; val and test read the same validation list, their labels
    mapped by name onto the training classes (--eval-only: the checkpoint's, else --class-list)."""
    if test_only:
        names = getattr(cfg, "class_names", None)
        if names and cfg.class_list and kinetics_multigrid.read_class_list(cfg.class_list) != names:
            raise trainer.SetupError(
                f"--class-list {cfg.class_list} differs from the {len(names)} class names stored "
                f"in {cfg.checkpoint} (names or order): leave --class-list out to use the checkpoint's")
        return None, None, _dataset(cfg, cfg.val_root, cfg.val_annotations, "test", log, names,
                                    f"the classes stored in {cfg.checkpoint}")
    train = _dataset(cfg, cfg.train_root, cfg.train_annotations, "train", log)
    source = f"the training classes (of {cfg.class_list or cfg.train_annotations})"
    val = _dataset(cfg, cfg.val_root, cfg.val_annotations, "val", log, train.classes, source)
    test = _dataset(cfg, cfg.val_root, cfg.val_annotations, "test", log, train.classes, source)
    return train, val, test


def test(model, dataset, cfg, d, log, run_dir) -> dict:
    """The multi-view test: mean of softmax over views; top-1 / top-5 / mean class accuracy."""
    protocol = (f"{cfg.test_temporal_views} temporal x {cfg.test_spatial_views} spatial views "
                f"({cfg.test_temporal_views * cfg.test_spatial_views}-view), {cfg.frames}x"
                f"{cfg.rate} frames, crop {cfg.test_crop}, mean of softmax")
    index, scores, labels, failed = trainer.predict_views(
        model, dataset, kinetics_multigrid.collate_test, cfg, d, aggregate="mean")
    for i in failed:
        log(f"test: left out {dataset.path(i)}: it could not be decoded")
    known = labels >= 0
    results = {"protocol": protocol, **trainer.topk_accuracy(scores[known], labels[known]),
               "failed_videos": len(failed)}
    log(f"multi-view test ({protocol}): top-1 {results['top1']:.2f}%, top-5 "
        f"{results['top5']:.2f}%, mean class accuracy {results['mean_class_acc']:.2f}% over "
        f"{results['videos']} videos ({len(failed)} undecodable, left out); chance "
        f"{100 / scores.shape[1]:.1f}%")
    if d.main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "test_predictions.csv"), "w") as f:
            f.write("path,label,top1,top5,top1_prob\n")
            for i, s, y in zip(index.tolist(), scores, labels.tolist()):
                top = s.topk(min(5, len(s)))
                names = [dataset.classes[c] for c in top.indices.tolist()]
                true = dataset.classes[y] if y >= 0 else ""
                f.write(f'"{dataset.path(i)}","{true}","{names[0]}","{";".join(names)}",'
                        f"{top.values[0]:.4f}\n")
    return results


def predict(cfg) -> None:
    """--predict VIDEO: print the top-5 classes of one video with CHECKPOINT's weights.

    The X3D version, the test views and the class names come from the checkpoint when it holds them
    (trainer.adopt_checkpoint_settings) and the flags do not give them.
    """
    trainer.fill_preset(cfg)
    if trainer.describe_adopted(cfg):
        print("settings " + trainer.describe_adopted(cfg), file=sys.stderr)
    if not os.path.exists(cfg.predict):
        raise trainer.SetupError(f"--predict {cfg.predict}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        listing = os.path.join(tmp, "predict.txt")
        with open(listing, "w") as f:
            f.write(f"{os.path.abspath(cfg.predict)} 0\n")
        dataset = kinetics_multigrid.KineticsDataset(
            "/", listing, "test", frames=cfg.frames, rate=cfg.rate, crop=cfg.crop,
            test_crop=cfg.test_crop, temporal_views=cfg.test_temporal_views, spatial_views=cfg.test_spatial_views,
            target_fps=cfg.target_fps, log=lambda m: None)
        try:
            ckpt = checkpoints.load(cfg.checkpoint)[0]
        except checkpoints.Corrupt as e:
            raise trainer.SetupError(str(e)) from None
        n_classes = ckpt.get("n_classes", 400) if isinstance(ckpt, dict) else 400
        model = x3d.generate_model(cfg.x3d_version, n_classes=n_classes)
        try:
            x3d.load_pretrained(model, ckpt)
        except ValueError as e:
            raise trainer.SetupError(f"{cfg.checkpoint}: {e}") from None
        views, _, _ = dataset[0]
        if views is None:
            raise trainer.SetupError(f"--predict {cfg.predict}: the video could not be decoded")
        model.eval()
        with torch.no_grad():
            probs = model.predict(transforms.normalize(views)).mean(0)
    names = _class_names(cfg, n_classes)
    top = probs.topk(min(5, n_classes))
    print(f"{cfg.predict}:")
    for p, c in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {p:.4f}  {names[c] if c < len(names) else c}")


def _class_names(cfg, n_classes) -> list[str]:
    """Class names from the checkpoint, else CLASS_LIST, else the training annotations, else indices."""
    if getattr(cfg, "class_names", None):
        return list(cfg.class_names)
    if cfg.class_list and os.path.exists(cfg.class_list):
        return kinetics_multigrid.read_class_list(cfg.class_list)
    if os.path.exists(cfg.train_annotations):
        entries = kinetics_multigrid.read_annotations(cfg.train_annotations)
        return kinetics_multigrid.assign_labels(entries)[0]
    return [str(i) for i in range(n_classes)]


def loss(logits, labels):
    """Cross-entropy on float32 logits."""
    return F.cross_entropy(logits.float(), labels)


TASK = trainer.Task(name="kinetics", build_datasets=build_datasets, loss=loss,
                    val_metrics=trainer.topk_accuracy, test=test, primary="top1", demo=demo,
                    predict=predict, data_paths=DATA_SETTINGS,
                    test_data=DATA_SETTINGS[2:])


if __name__ == "__main__":
    trainer.main(TASK, CONSTANTS, description=__doc__)
