"""Multigrid against constant-shape training: multi-view accuracy against wall-clock, one model, one device.

    python bench/bench_multigrid.py                               # X3D-S on one GPU
    python bench/bench_multigrid.py --cpu --seed 0                # the CPU measurement on the demo's videos (one seed;
    python bench/bench_multigrid.py --cpu --seed 1                #   each call adds a seed to the same folder and
    python bench/bench_multigrid.py --cpu --summary               #   refreshes the summary; --summary alone redraws it)
    python bench/bench_multigrid.py --tiny --device cpu           # CPU smoke run of the machinery (numbers meaningless)
    python bench/bench_multigrid.py --runs constant               # one run per command; a later call with
    python bench/bench_multigrid.py --runs multigrid              #   the same options and seed reports both

It generates (or finds complete) a synthetic Kinetics-format dataset (`synthetic_data.make_kinetics`;
`--classes` takes a count or motion names, `--difficulty` a preset with optional field=value
overrides; `--cpu` takes the demo's classes, difficulty and 384 training videos, with 120 held-out
videos instead of its 60) and by default converts it into frame store
files (`--source store`: their decode cost falls with the clip's shape, an mp4 clip's hardly does, and
on a few CPU cores the loader otherwise takes CPU time from Multigrid's cheap small-shape steps), then
trains the same X3D twice with the real trainer (`train_x3d_kinetics_multigrid.py` in a subprocess),
from the same max epoch and LR steps, the same step policy (steps_with_relative_lrs, gamma 0.1), the
same base-LR rule and warm-up, and the same seed:
- constant: no long or short cycle, at the base shape;
- multigrid: the long cycle, and the short cycle unless `--no-short-cycle` (off in the `--cpu`
  preset), at epoch factor 1.5
  (PySlowFast's schedule).
Every `--eval-period` epochs (default: `--evals` evaluations a run) the trainer runs precise BN and its
1-clip validation and keeps an epoch checkpoint; after a run has trained, the bench runs the
multi-view test (`--eval-only`, the trainer's own test) on each kept checkpoint, and the trainer's
final test gives the last point. Testing saved checkpoints keeps the trainer unchanged and the
test's cost out of the training clock.

Wall-clock ("wall s") is the training loop's time from the first step to the last, read from the
run's metrics.jsonl time stamps, minus the evaluations the bench asked for (precise BN + validation);
checkpoint writes, plots, loader restarts and shape changes stay in. Peak memory: the GPU's peak
allocation (torch, in the trainer), and on every device the trainer process's ru_maxrss and the
largest ru_maxrss among its children (data-loader workers), read with getrusage when the trainer
exits; a forked worker's RSS counts pages it shares with the trainer, so the two do not add up.

Each seed goes to <out-dir>/seed_<seed>/: one folder per run, and each run's results
(`bench_run.json`) written as soon as it is tested, so a later call with the same options skips what
is done (and refuses a folder measured with other options). `bench_multigrid.{json,png,md}` in the
seed folder hold that seed; in <out-dir> they hold the summary over every seed there: median and
range (min-max) per run of wall s, iterations, clips, data-wait share, peak memory, final top-1, the
wall s at which the run first reached its seed's constant run's final top-1 ("reach": the first
evaluation at or above it) and that over the constant run's wall s; the picture plots top-1 against
wall s for both runs (median and range over seeds, Multigrid's shape changes marked). The per-seed
JSON also holds every evaluation, every Multigrid phase start and a breakdown of each epoch start:
evaluation, bookkeeping (checkpoint, plot), the first batch's data wait and the first step's compute
against the same shape's median. Per-step records (`--log-period 1`) add one host-device
synchronisation per step to both runs on a GPU.
"""
import argparse
import contextlib
import dataclasses
import datetime
import glob
import inspect
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import multigrid
import prepare_videos
import synthetic_data
import train_x3d_kinetics_multigrid as kinetics
import trainer

SCRIPT = os.path.join(ROOT, "train_x3d_kinetics_multigrid.py")
RUNS = ("constant", "multigrid")
SUMMARY = "bench_multigrid"
# The GPU measurement; every value is a command-line option of the same name.
DEFAULTS = {
    "device": "cuda", "version": "S", "frames": 0, "rate": 0, "crop": 0, "test_crop": 0, "short_side": "",
    "batch_size": 64, "base_lr": 0.1, "lr_reference_batch": 128, "max_epoch": 20, "steps": "0,8,13,16",
    "warmup_epochs": 2.0, "epoch_factor": 1.5, "bn_base_size": 8, "dropout": 0.5, "precision": "fp32",
    "short_cycle": True, "constant_batch": False, "workers": 14, "threads": 0, "evals": 5, "eval_period": 0,
    "precise_bn_batches": 20,
    "test_temporal_views": 10, "test_spatial_views": 3, "test_batch": 8, "log_period": 1, "seed": 0,
    "classes": "10", "train_per_class": 200, "val_per_class": 20, "seconds": 3, "fps": 30, "size": "128x96",
    "difficulty": "medium", "keyframe_interval": 250, "data_workers": 16, "source": "store",
}
# The CPU smoke run of tests/test_bench_multigrid.py: X3D-XS 4x48, 36 training videos, 2 epochs.
TINY = {
    "device": "cpu", "version": "XS", "frames": 4, "rate": 2, "crop": 48, "test_crop": 48, "short_side": "52,60",
    "batch_size": 2, "base_lr": 0.05, "lr_reference_batch": 2, "max_epoch": 2, "steps": "0,1", "warmup_epochs": 0.0,
    "bn_base_size": 2, "dropout": 0.0, "workers": 1, "threads": 1, "eval_period": 1, "precise_bn_batches": 2,
    "test_temporal_views": 2, "test_spatial_views": 1, "test_batch": 2,
    "classes": "3", "train_per_class": 12, "val_per_class": 2, "seconds": 1, "size": "64x48", "difficulty": "easy",
    "data_workers": 1,
}


def _demo_dataset() -> dict:
    """The CPU demo's dataset options: make_kinetics' defaults with the demo's DEMO_DATASET over them."""
    defaults = {k: v.default for k, v in inspect.signature(synthetic_data.make_kinetics).parameters.items()
                if v.default is not inspect.Parameter.empty}
    data = {**defaults, **kinetics.DEMO_DATASET}
    return {"classes": ",".join(data["classes"]), "difficulty": data["difficulty"],
            "train_per_class": data["train_per_class"], "val_per_class": data["val_per_class"],
            "seconds": data["seconds"], "fps": data["fps"], "size": "x".join(map(str, data["size"])),
            "keyframe_interval": data["keyframe_interval"]}


_DEMO = {k.lower(): v for k, v in kinetics.DEMO_SETTINGS.items()}
# The CPU measurement: the demo's training data and model settings (X3D-XS 16x2 at crop 48, base batch 8,
# 0.1 per 16 clips, 2 warm-up epochs, 5x3 test views, no short cycle), read from frame store files, 120
# held-out videos instead of the demo's 60 (one video is then 0.83 points of top-1, not 1.67), max epoch
# 10 with LR steps at 6 and 8 so that the constant run trains 4-5 minutes on 2 cores and Multigrid's
# long cycle has room to recover after it restarts at the first LR step, BN splits of 8 clips (the base
# batch: at the base shape Multigrid's BN is then the constant run's) and an evaluation after every
# epoch (a tenth of the constant run or less). The trials behind each choice are in bench/README.md.
CPU = {
    "device": "cpu", "version": _DEMO["x3d_version"], **{k: _DEMO[k] for k in (
        "frames", "rate", "crop", "test_crop", "batch_size", "base_lr", "lr_reference_batch", "warmup_epochs",
        "dropout", "workers", "precise_bn_batches", "test_temporal_views", "test_spatial_views", "short_cycle")},
    "short_side": ",".join(map(str, _DEMO["short_side"])), "max_epoch": 10, "steps": "0,6,8",
    "bn_base_size": _DEMO["batch_size"], "test_batch": kinetics.CONSTANTS["TEST_BATCH"], "eval_period": 1,
    "threads": 0, "data_workers": 2, **_demo_dataset(), "val_per_class": 40,
}
PRESETS = {"tiny": TINY, "cpu": CPU}
HELP = {
    "classes": "a count (the first N motions of synthetic_data.CLASS_POOL) or comma-separated motion names",
    "difficulty": "a synthetic_data preset (easy, medium, hard, demo), optionally with field=value overrides: "
                  "demo,speed=1.5,distractors=0:1",
    "short_cycle": "the Multigrid run's short cycle",
    "constant_batch": "the Multigrid run's long cycle at the base batch and LR in every phase (not PySlowFast's)",
    "eval_period": "epochs between evaluations (precise BN, validation, a kept checkpoint to test); 0: --evals a run",
    "evals": "evaluations a run when --eval-period is 0",
    "seed": "the trainer's seed for both runs; each seed goes to <out-dir>/seed_<seed>/",
    "source": "what both runs read: 'store' (frame store files built once by prepare_videos.store_tree into "
              "<data>_store/) or 'mp4' (the generated videos)",
}
SOURCES = ("store", "mp4")


def parse_args(argv=None):
    """Options (DEFAULTS, or the --tiny / --cpu preset, for those not given), checked before any work."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--tiny", action="store_true", help="the CPU smoke configuration (TINY) for options not given")
    preset.add_argument("--cpu", action="store_true",
                        help="the CPU measurement (CPU: the demo's videos and settings) for options not given")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                        help="runs to train now; a run not listed is read from the seed's folder when it is there")
    parser.add_argument("--summary", action="store_true",
                        help="train nothing: summarize the seeds already in --out-dir (table, JSON, picture)")
    parser.add_argument("--out-dir",
                        help="seed folders and the summary over them (default logs/bench_multigrid[_cpu|_tiny])")
    parser.add_argument("--data", help="dataset folder (default data/bench_multigrid[_cpu|_tiny]; "
                                       "reused when complete)")
    parser.add_argument("--run-timeout", type=float, default=0, help="seconds before a training run is stopped; 0: none")
    for name, value in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        shown = (HELP.get(name, "") + f" (default {value!r}; --tiny {TINY.get(name, value)!r}; "
                 f"--cpu {CPU.get(name, value)!r})").strip()
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=shown)
        else:
            parser.add_argument(flag, type=type(value), default=None, help=shown)
    args = parser.parse_args(argv)
    chosen = "tiny" if args.tiny else "cpu" if args.cpu else None
    for name, value in {**DEFAULTS, **PRESETS.get(chosen, {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    folder = "bench_multigrid" + (f"_{chosen}" if chosen else "")
    args.out_dir = os.path.abspath(args.out_dir or os.path.join(ROOT, "logs", folder))
    args.data = os.path.abspath(args.data or os.path.join(ROOT, "data", folder))
    try:
        args.size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(args.size) == 2
    except (ValueError, AssertionError):
        parser.error(f"--size {args.size!r}: expected WIDTHxHEIGHT such as 128x96")
    for flag, parse, name in (("--classes", synthetic_data.parse_classes, "class_choice"),
                              ("--difficulty", synthetic_data.parse_difficulty, "difficulty_spec")):
        try:
            setattr(args, name, parse(getattr(args, flag[2:])))
        except ValueError as e:
            parser.error(f"{flag}: {e}")
    if args.evals < 1:
        parser.error(f"--evals must be at least 1, got {args.evals}")
    if args.eval_period < 0:
        parser.error(f"--eval-period must be 0 (from --evals) or a number of epochs, got {args.eval_period}")
    if args.source not in SOURCES:
        parser.error(f"--source {args.source}: use one of {', '.join(SOURCES)}")
    if args.device not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: use cuda (one GPU) or cpu")
    if args.device == "cuda" and not args.summary:
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available here; use --cpu (or --tiny) for a CPU run")
    return args


def refuse(message: str) -> None:
    """Stop with one line on stderr and exit status 2 (bad input, nothing trained)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def settings_of(args) -> dict:
    """Every option that shapes a measurement (the seed included), as JSON values."""
    settings = {k: getattr(args, k) for k in DEFAULTS}
    settings["size"] = "x".join(map(str, args.size))
    settings["data"] = args.data
    return settings


def seed_dir(args) -> str:
    """This call's seed folder."""
    return os.path.join(args.out_dir, f"seed_{args.seed}")


_ADDED_SETTINGS = {"constant_batch": False}  # settings newer than some saved runs: what those runs did


def saved_runs(args) -> dict:
    """{seed folder: {run name: its bench_run.json}} of every run already in --out-dir.

    Exits (2) when one was measured with other settings than this call's, seed aside: one output
    folder holds one configuration, so its summary compares like with like.
    """
    mine = {k: v for k, v in settings_of(args).items() if k != "seed"}
    found = {}
    for path in sorted(glob.glob(os.path.join(args.out_dir, "seed_*", "*", "bench_run.json"))):
        with open(path) as f:
            run = json.load(f)
        theirs = {k: v for k, v in {**_ADDED_SETTINGS, **run.get("settings", {})}.items() if k != "seed"}
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            shown = ", ".join(f"{k}={theirs.get(k)!r} (now {mine.get(k)!r})" for k in differ)
            refuse(f"{path} was measured with other settings: {shown}. Give those options, or another --out-dir "
                   "for this configuration")
        found.setdefault(os.path.dirname(os.path.dirname(path)), {})[run["name"]] = run
    return found


def make_data(args) -> tuple[dict, float]:
    """Generate (or find complete) the synthetic Kinetics-format dataset; (paths, seconds spent)."""
    start = time.time()
    try:
        paths = synthetic_data.make_kinetics(
            args.data, **synthetic_data.class_arguments(args.class_choice), train_per_class=args.train_per_class,
            val_per_class=args.val_per_class, seconds=args.seconds, fps=args.fps, size=args.size,
            keyframe_interval=args.keyframe_interval, difficulty=args.difficulty_spec, workers=args.data_workers,
            progress=sys.stderr.isatty())
    except ValueError as e:
        refuse(f"dataset {args.data}: {e}")
    if args.source == "store":
        paths = make_store(args, paths)
    return paths, time.time() - start


def make_store(args, paths: dict) -> dict:
    """Convert both splits into frame store files under <data>_store/ (kept when already converted);
    the same paths with the store's roots. The annotations stay the videos': the datasets find a
    `.frames` file by the video's stem."""
    store = args.data.rstrip(os.sep) + "_store"
    paths = dict(paths)
    for key in ("train_root", "val_root"):
        out_root = os.path.join(store, os.path.basename(paths[key]))
        try:
            entries, _ = prepare_videos.scan_sources(paths[key])
            counts, failed = prepare_videos.store_tree(paths[key], out_root, entries, workers=args.data_workers)
        except (OSError, ValueError) as e:
            refuse(f"frame store {out_root}: {e}")
        if failed:
            first = ", ".join(f"{path} ({why})" for path, why in sorted(failed.items())[:3])
            refuse(f"frame store {out_root}: {len(failed)} of {len(entries)} videos under {paths[key]} could not be "
                   f"converted (first: {first}); delete {args.data} to generate it again, or use --source mp4")
        print(f"[bench] frame store {out_root}: {counts['written']} written, {counts['kept']} kept", flush=True)
        paths[key] = out_root
    return paths


def common_flags(args, paths) -> list[str]:
    """Trainer flags shared by both runs and by the checkpoint tests."""
    flags = {
        "train-root": paths["train_root"], "train-annotations": paths["train_csv"],
        "val-root": paths["val_root"], "val-annotations": paths["val_csv"], "class-list": paths["classes"],
        "x3d-version": args.version, "frames": args.frames, "rate": args.rate, "crop": args.crop,
        "test-crop": args.test_crop, "batch-size": args.batch_size, "base-lr": args.base_lr,
        "lr-reference-batch": args.lr_reference_batch, "lr-policy": "steps_with_relative_lrs",
        "steps": args.steps, "max-epoch": args.max_epoch, "warmup-epochs": args.warmup_epochs,
        "epoch-factor": args.epoch_factor, "bn-base-size": args.bn_base_size, "dropout": args.dropout,
        "precision": args.precision, "workers": args.workers, "threads": args.threads, "seed": args.seed,
        "precise-bn-batches": args.precise_bn_batches, "test-temporal-views": args.test_temporal_views,
        "test-spatial-views": args.test_spatial_views, "test-batch": args.test_batch,
        "log-period": args.log_period, "checkpoint-iters": 0,
    }
    if args.short_side:
        flags["short-side"] = args.short_side
    out = ["--no-random-flip", "--no-resume"] + (["-gpu", "0"] if args.device == "cuda" else [])
    for key, value in flags.items():
        out += [f"--{key}", str(value)]
    return out


def run_flags(name: str, short_cycle: bool = True, constant_batch: bool = False) -> list[str]:
    """The flags that make a run constant-shape or Multigrid (with or without the short cycle, at the
    scaled or the constant batch)."""
    if name == "constant":
        return ["--no-long-cycle", "--no-short-cycle"]
    return ["--long-cycle", "--short-cycle" if short_cycle else "--no-short-cycle"] + (
        ["--constant-batch"] if constant_batch else [])


def run_argv(args, flags: list[str], name: str) -> list[str]:
    """A run's trainer flags: common flags, its cycles, and its evaluation / checkpoint period."""
    own = flags + run_flags(name, args.short_cycle, args.constant_batch)
    period = args.eval_period or math.ceil(plan_of(own).max_epoch / args.evals)
    return own + ["--eval-period", str(period), "--checkpoint-period", str(period)]


def config_of(flags: list[str]):
    """The config the trainer resolves from these flags (its own parser and preset rules)."""
    cfg = trainer.parse_config(kinetics.CONSTANTS, flags)
    trainer.fill_preset(cfg)
    return cfg


def plan_of(flags: list[str]) -> multigrid.MultigridPlan:
    """The Multigrid plan the trainer will build from these flags."""
    return trainer.make_plan(config_of(flags), trainer.Dist())


# Runs the trainer script as __main__ and, at its exit (after multiprocessing has joined the loader
# workers: atexit runs this handler last), writes the process's and its children's ru_maxrss.
RUSAGE_CHILD = """
import atexit, json, os, resource, runpy, sys
out, script = sys.argv[1], sys.argv[2]
def report():
    peaks = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    with open(out, "w") as f:
        json.dump({"self": peaks[0], "children": peaks[1], "unit": "bytes" if sys.platform == "darwin" else "KiB"}, f)
atexit.register(report)
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
"""


def read_rusage(path: str) -> dict:
    """peak_rss_mib (trainer process) and peak_worker_rss_mib (its largest child) from RUSAGE_CHILD's file."""
    if not os.path.exists(path):
        return {"peak_rss_mib": None, "peak_worker_rss_mib": None}
    with open(path) as f:
        peaks = json.load(f)
    scale = 2.0 ** 20 if peaks["unit"] == "bytes" else 2.0 ** 10
    return {"peak_rss_mib": peaks["self"] / scale, "peak_worker_rss_mib": peaks["children"] / scale or None}


def train_run(args, name: str, flags: list[str]) -> dict:
    """Train one run in a subprocess (its folder replaced); returncode, seconds, console path and peak RSS."""
    out_dir = seed_dir(args)
    shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    console = os.path.join(out_dir, f"{name}.console.txt")
    rusage = os.path.join(out_dir, f"{name}.rusage.json")
    if os.path.exists(rusage):
        os.remove(rusage)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"[bench] seed {args.seed}: training {name} (output in {console})", flush=True)
    start = time.time()
    with open(console, "w") as out:
        try:
            code = subprocess.run([sys.executable, "-c", RUSAGE_CHILD, rusage, SCRIPT] + flags, stdout=out,
                                  stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=args.run_timeout or None,
                                  check=False).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.time() - start
    print(f"[bench] seed {args.seed}: {name}: exit {code} after {seconds:.1f} s", flush=True)
    return {"returncode": code, "process_s": seconds, "console": console, **read_rusage(rusage)}


def multiview_test(flags: list[str], checkpoint: str, log_dir: str) -> dict:
    """The trainer's multi-view test (`--eval-only`) of one checkpoint, in this process; its results dict."""
    name = os.path.splitext(os.path.basename(checkpoint))[0]
    argv = flags + ["--eval-only", "--checkpoint", checkpoint, "--log-dir", log_dir, "--run-name", name]
    with open(os.path.join(log_dir, "console.txt"), "a") as out, contextlib.redirect_stdout(out):
        trainer.main(kinetics.TASK, kinetics.CONSTANTS, argv)
    with open(os.path.join(log_dir, name, f"eval_{name}", "results.json")) as f:  # trainer.eval_dir_for
        return json.load(f)


def _shape(phase: dict) -> tuple:
    """(per-GPU batch, frames, crop) of a phase record."""
    return phase["per_gpu_batch"], phase["frames"], phase["crop"]


def _step_shape(record: dict) -> tuple:
    """(per-GPU batch, frames, crop) of a train record."""
    return record["batch"], record["frames"], record["crop"]


def timeline(records: list[dict]) -> dict:
    """Per-epoch timings from the time-stamped records, and the wall clock without evaluations.

    An epoch starts where its first logged window starts (record time - window_s) and ends at its
    last record (the trainer always logs an epoch's last iteration). Evaluation after epoch e is
    the time from that end to its "val" record. `clock(t)` maps a time stamp to training seconds
    since the first step with every earlier evaluation taken out.
    """
    train = [r for r in records if r["kind"] == "train"]
    val_time = {r["epoch"]: r["time"] for r in records if r["kind"] == "val"}
    epochs = {}
    for r in train:
        epochs.setdefault(r["epoch"], []).append(r)
    out = []
    for e in sorted(epochs):
        rs = epochs[e]
        first = rs[0]
        out.append({"epoch": e, "start": first["time"] - first["window_s"], "end": rs[-1]["time"],
                    "eval_s": val_time[e + 1] - rs[-1]["time"] if e + 1 in val_time else 0.0,
                    "first_window_s": first["window_s"], "first_wait_s": first["data_wait"] * first["window_s"],
                    "first_iterations": first["iteration"], "shape": _step_shape(first),
                    "records": rs})
    for prev, cur in itertools.pairwise(out):
        cur["bookkeeping_s"] = cur["start"] - prev["end"] - prev["eval_s"]
    t0 = out[0]["start"] if out else 0.0

    def clock(t: float) -> float:
        return t - t0 - sum(ep["eval_s"] for ep in out if ep["end"] < t - 1e-9 and ep["eval_s"])

    return {"epochs": out, "clock": clock}


def _median(values):
    """Median, or None for no values."""
    return statistics.median(values) if values else None


def step_profile(epochs: list[dict]) -> dict:
    """Median per-step compute and data wait of each phase's steady steps (an epoch's first window left out)."""
    compute, wait = {}, {}
    for ep in epochs:
        for before, r in itertools.pairwise(ep["records"]):
            n = r["iteration"] - before["iteration"]
            compute.setdefault(_step_shape(r), []).append((1 - r["data_wait"]) * r["window_s"] / n)
            wait.setdefault(_step_shape(r), []).append(r["data_wait"] * r["window_s"] / n)
    return {k: (_median(compute[k]), _median(wait[k])) for k in compute}


def _first_step(ep: dict, profile: dict) -> dict:
    """An epoch's first step against the steady steps of the same shape: data wait and compute, and their excess."""
    n = max(ep["first_iterations"], 1)
    wait, compute = ep["first_wait_s"] / n, (ep["first_window_s"] - ep["first_wait_s"]) / n
    steady_compute, steady_wait = profile.get(ep["shape"], (None, None))
    return {"first_wait_s": wait, "first_step_s": compute, "steady_wait_s": steady_wait,
            "steady_step_s": steady_compute, "first_wait_excess_s": wait - (steady_wait or 0.0),
            "first_step_excess_s": None if steady_compute is None else compute - steady_compute}


def boundaries(tl: dict, records: list[dict]) -> tuple[list, dict]:
    """Every phase start (shape changes marked) with where its time went, and totals over all epoch starts.

    At an epoch start the trainer evaluates (when due), then does its bookkeeping (last.pt, plots,
    BN splits at a phase change), then waits for the first batch and runs the first step; the first
    wait and step are compared with the median steady step of the same shape (on a GPU, compute
    excess at a new shape is mostly cudnn autotuning).
    """
    epochs = {ep["epoch"]: ep for ep in tl["epochs"]}
    profile = step_profile(tl["epochs"])
    phases = [r for r in records if r["kind"] == "phase"]
    out = []
    for prev, cur in zip([None] + phases, phases):
        ep = epochs.get(cur["epoch"])
        if ep is None:
            continue
        before = epochs.get(cur["epoch"] - 1)
        out.append({
            "epoch": cur["epoch"], "phase": cur["index"], "lr_step": cur["step_index"],
            "from": list(_shape(prev)) if prev else None, "to": list(_shape(cur)),
            "short_cycle": [list(shape) for shape in cur["shapes"]],
            "shape_change": prev is not None and _shape(prev) != _shape(cur),
            "at_s": tl["clock"](ep["start"]), "eval_before_s": before["eval_s"] if before else 0.0,
            "bookkeeping_s": ep.get("bookkeeping_s", 0.0), **_first_step(ep, profile),
        })
    starts = [(ep, _first_step(ep, profile)) for ep in tl["epochs"][1:]]
    totals = {
        "bookkeeping_s": sum(ep["bookkeeping_s"] for ep, _ in starts),
        "first_wait_excess_s": sum(f["first_wait_excess_s"] for _, f in starts),
        "first_step_excess_s": sum(f["first_step_excess_s"] or 0.0 for _, f in starts),
    }
    return out, {"epoch_starts": len(starts), **totals, "lost_s": sum(totals.values()),
                 "bookkeeping_s_mean": _mean([ep["bookkeeping_s"] for ep, _ in starts])}


def _mean(values):
    """Mean, or None for no values."""
    return sum(values) / len(values) if values else None


def summarize(name: str, run_dir: str, process: dict, tests: dict) -> dict:
    """One run's numbers from its metrics.jsonl and checkpoint tests."""
    records = trainer.read_metrics(run_dir)
    tl = timeline(records)
    train = [r for r in records if r["kind"] == "train"]
    last = tl["epochs"][-1]
    wall = tl["clock"](last["end"])
    evaluations = []
    for ep in tl["epochs"]:
        done = ep["epoch"] + 1
        if done in tests:
            evaluations.append({"epoch": done, "wall_s": tl["clock"](ep["end"]), "source": f"epoch_{done:04d}.pt",
                                **_accuracy(tests[done])})
    final = [r for r in records if r["kind"] == "test"]
    if final:
        evaluations.append({"epoch": last["epoch"] + 1, "wall_s": wall, "source": "final test", **_accuracy(final[-1])})
    changes, summary = boundaries(tl, records)
    window = sum(r["window_s"] for r in train)
    mem = [r["gpu_mem_gb"] for r in train if "gpu_mem_gb" in r]
    times = [0.0] + [e["wall_s"] for e in evaluations]
    return {
        "name": name, **process, "run_dir": run_dir,
        "wall_s": wall, "wall_with_evals_s": last["end"] - tl["epochs"][0]["start"],
        "evals_s": sum(ep["eval_s"] for ep in tl["epochs"]), "epochs": last["epoch"] + 1,
        "iterations": train[-1]["step"], "clips": round(sum(r["clips_per_s"] * r["window_s"] for r in train)),
        "data_wait": sum(r["data_wait"] * r["window_s"] for r in train) / window,
        "peak_gpu_mem_gb": max(mem) if mem else None,
        "final_top1": evaluations[-1]["top1"] if final else None,
        "eval_gap_max_s": max(b - a for a, b in itertools.pairwise(times)) if evaluations else None,
        "evaluations": evaluations, "phases": changes,
        "epoch_starts": {**summary, "lost_share": summary["lost_s"] / wall if wall else None},
    }


def _accuracy(results: dict) -> dict:
    """top-1 / top-5 / mean class accuracy of a results dict or test record."""
    return {k: results[k] for k in ("top1", "top5", "mean_class_acc") if k in results}


def finish_run(args, name: str, flags: list[str], process: dict) -> dict:
    """Test a trained run's kept checkpoints; write and return its summary (or its failure)."""
    run_dir = os.path.join(seed_dir(args), name)
    os.makedirs(run_dir, exist_ok=True)
    result = {"name": name, **process, "flags": flags, "settings": settings_of(args)}
    if process["returncode"] != 0:
        with open(process["console"]) as f:
            result["error"] = f.read()[-3000:]
        print(f"[bench] {name} failed:\n{result['error']}", file=sys.stderr, flush=True)
    else:
        tests, start = {}, time.time()
        checkpoints = sorted(f for f in os.listdir(os.path.join(run_dir, "checkpoints")) if f.startswith("epoch_"))
        final_epoch = plan_of(flags).max_epoch
        eval_dir = os.path.join(run_dir, "checkpoint_tests")
        os.makedirs(eval_dir, exist_ok=True)
        for f in checkpoints:
            epoch = int(f[len("epoch_"):-len(".pt")])
            if epoch < final_epoch:  # the trainer's own final test covers the last epoch
                tests[epoch] = multiview_test(flags, os.path.join(run_dir, "checkpoints", f), eval_dir)
        result.update(summarize(name, run_dir, process, tests), checkpoint_tests_s=time.time() - start)
        for f in checkpoints:  # large, and their numbers are in the summary now
            os.remove(os.path.join(run_dir, "checkpoints", f))
    with open(os.path.join(run_dir, "bench_run.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def reach(run: dict, target: float):
    """Wall seconds of the run's first evaluation at or above `target` top-1 (None if never)."""
    return next((e["wall_s"] for e in run.get("evaluations", []) if e["top1"] >= target - 1e-9), None)


def compare(runs: dict) -> float | None:
    """Add reach_s / reach_ratio to every run against the constant run's final top-1; return that target."""
    base = runs.get("constant", {})
    target = base.get("final_top1")
    for run in runs.values():
        run["reach_s"] = reach(run, target) if target is not None else None
        ok = run["reach_s"] is not None and base.get("wall_s")
        run["reach_ratio"] = run["reach_s"] / base["wall_s"] if ok else None
    return target


# Per-run numbers the summary takes the median and range of, over seeds.
SUMMARY_KEYS = ("wall_s", "iterations", "clips", "data_wait", "peak_rss_mib", "peak_worker_rss_mib",
                "peak_gpu_mem_gb", "final_top1", "reach_s", "reach_ratio", "eval_gap_max_s", "process_s")


def spread(values: list) -> dict:
    """Median, min and max of per-seed values; None (not reached, not measured) ranks above every number."""
    known = sorted(v for v in values if v is not None)
    ranked = known + [None] * (len(values) - len(known))
    n = len(ranked)
    if not n:
        return {"median": None, "min": None, "max": None, "n": 0, "missing": 0, "values": []}
    middle = ranked[(n - 1) // 2:n // 2 + 1]
    median = None if None in middle else statistics.mean(middle)
    return {"median": median, "min": ranked[0], "max": ranked[-1], "n": n, "missing": n - len(known),
            "values": list(values)}


def summarize_seeds(seeds: dict) -> dict:
    """The summary over seeds ({seed: that seed's result}): per run, the spread of every SUMMARY_KEYS number.

    Each seed's reach is against its own constant run's final top-1; failed runs count as missing.
    """
    order = sorted(seeds)
    runs = {}
    for name in RUNS:
        per_seed = [seeds[s]["runs"].get(name) for s in order]
        if not any(per_seed):
            continue
        done = [r for r in per_seed if r and "wall_s" in r]
        runs[name] = {"seeds": len(per_seed), "measured": len(done),
                      **{k: spread([r.get(k) if r else None for r in per_seed]) for k in SUMMARY_KEYS}}
    return {"seeds": order, "target_top1": spread([seeds[s].get("target_top1") for s in order]), "runs": runs}


def _cell(stats: dict, fmt="{:.1f}", scale=1.0, missing="n/a") -> str:
    """A table cell: the median, and [min-max] over more than one seed; `missing` for no value."""
    def one(v):
        return missing if v is None else fmt.format(v * scale)
    if stats["n"] == 0 or stats["missing"] == stats["n"]:
        return missing
    if stats["n"] == 1:
        return one(stats["median"])
    return f"{one(stats['median'])} [{one(stats['min'])}-{one(stats['max'])}]"


def table(summary: dict) -> str:
    """The markdown table: one row per run, the constant run first (the baseline); median [min-max] over seeds."""
    head = ["run", "seeds", "wall s", "iterations", "clips", "data-wait %", "peak RSS MiB", "worker RSS MiB",
            "peak GPU GiB", "final top-1 %", "reach s", "reach / constant wall", "largest eval gap s"]
    rows = [head, ["---"] * len(head)]
    for name, r in summary["runs"].items():
        if not r["measured"]:
            rows.append([name, str(r["seeds"]), "failed"] + [""] * (len(head) - 3))
            continue
        rows.append([
            name, str(r["seeds"]) if r["measured"] == r["seeds"] else f"{r['measured']} of {r['seeds']}",
            _cell(r["wall_s"]), _cell(r["iterations"], "{:.0f}"), _cell(r["clips"], "{:.0f}"),
            _cell(r["data_wait"], scale=100), _cell(r["peak_rss_mib"], "{:.0f}"),
            _cell(r["peak_worker_rss_mib"], "{:.0f}"), _cell(r["peak_gpu_mem_gb"], "{:.2f}"),
            _cell(r["final_top1"], "{:.2f}"), _cell(r["reach_s"], missing="not reached"),
            _cell(r["reach_ratio"], "{:.2f}x", missing="not reached"), _cell(r["eval_gap_max_s"])])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _curve(runs: list[dict]) -> tuple[list, list, list, list]:
    """Per evaluation index over seeds: median wall s, median / min / max top-1 (runs share the epochs evaluated)."""
    count = min(len(r["evaluations"]) for r in runs)
    points = [[r["evaluations"][k] for r in runs] for k in range(count)]
    return ([statistics.median(e["wall_s"] for e in p) for p in points],
            [statistics.median(e["top1"] for e in p) for p in points],
            [min(e["top1"] for e in p) for p in points], [max(e["top1"] for e in p) for p in points])


def plot(seeds: dict, summary: dict, path: str, title: str) -> None:
    """top-1 against wall-clock, both runs: median over seeds, range shaded, each seed thin; shape changes dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 5.5))
    colors = {"constant": "tab:blue", "multigrid": "tab:orange"}
    many = len(seeds) > 1
    for name in RUNS:
        runs = [s["runs"][name] for s in seeds.values() if s["runs"].get(name, {}).get("evaluations")]
        if not runs:
            continue
        wall, top1, low, high = _curve(runs)
        iterations = summary["runs"][name]["iterations"]["median"]
        label = name + ("" if iterations is None else f" ({iterations:.0f} iterations)") + (
            f", median of {len(runs)} seeds" if many else "")
        ax.plot(wall, top1, "o-", color=colors[name], label=label, zorder=3)
        if many:
            ax.fill_between(wall, low, high, color=colors[name], alpha=0.2, lw=0, label=f"{name}: range over seeds")
            for run in runs:
                ax.plot([e["wall_s"] for e in run["evaluations"]], [e["top1"] for e in run["evaluations"]], "-",
                        color=colors[name], lw=0.6, alpha=0.4)
    changes = {}
    for s in seeds.values():
        for change in s["runs"].get("multigrid", {}).get("phases", []):
            if change["shape_change"]:
                changes.setdefault(change["phase"], []).append(change)
    for found in changes.values():
        at = statistics.median(c["at_s"] for c in found)
        ax.axvline(at, color=colors["multigrid"], ls=":", lw=0.8)
        _, frames, crop = found[0]["to"]
        ax.annotate(f"{frames}x{crop}", (at, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top",
                    ha="right", fontsize=7, color=colors["multigrid"])
    if changes:
        ax.plot([], [], ":", color=colors["multigrid"], lw=0.8, label="Multigrid shape change (frames x crop)")
    target = summary["target_top1"]
    if target["median"] is not None:
        ax.axhline(target["median"], color="grey", ls="--", lw=0.8,
                   label=f"constant final {target['median']:.1f}%" + (" (median)" if many else ""))
    ax.set(xlabel="training wall-clock, s (evaluations excluded)", ylabel="multi-view top-1, %", title=title)
    ax.set_xlim(left=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: curves fill any corner
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def setup(args, data_s: float, protocol: str) -> dict:
    """What the numbers were measured on: device, software, dataset and settings."""
    import torch
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    with open(os.path.join(args.data, "annotations", "classes.txt")) as f:
        classes = f.read().split("\n")[:-1]
    return {
        "created": datetime.datetime.now().isoformat(timespec="seconds"), "device": device,
        "torch": torch.__version__, "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
        "dataset": {"root": args.data, "classes": classes, "train_videos": len(classes) * args.train_per_class,
                    "val_videos": len(classes) * args.val_per_class, "seconds": args.seconds, "fps": args.fps,
                    "size": "x".join(map(str, args.size)), "difficulty": args.difficulty,
                    "difficulty_fields": dataclasses.asdict(args.difficulty_spec),
                    "keyframe_interval": args.keyframe_interval, "generation_s": data_s},
        "protocol": protocol, "settings": settings_of(args), "tiny": args.tiny, "preset": (
            "tiny" if args.tiny else "cpu" if args.cpu else None),
    }


_SOURCE_WORDS = {"store": "frame store files (prepare_videos --frame-store)", "mp4": "the mp4 files"}


def _footer(result: dict, seeds: list) -> str:
    """What a table was measured on, in one paragraph."""
    s, d = result["settings"], result["dataset"]
    return (f"{result['device']}; torch {result['torch']}; seeds {', '.join(map(str, seeds))}; dataset "
            f"{d['train_videos']} train / {d['val_videos']} val videos, {len(d['classes'])} classes "
            f"({', '.join(d['classes'])}), {d['seconds']} s at {d['fps']} fps, {d['size']}, difficulty "
            f"{d['difficulty']}, read from {_SOURCE_WORDS[s.get('source', 'mp4')]}; X3D-{s['version']}, batch "
            f"{s['batch_size']}, max epoch {s['max_epoch']}, steps "
            f"{s['steps']}, short cycle {'on' if s['short_cycle'] else 'off'}"
            f"{', Multigrid at the constant batch' if s.get('constant_batch') else ''}; test: {result['protocol']}; "
            "wall s = training loop without the evaluations; reach = first evaluation at or above the seed's "
            "constant run's final top-1; peak RSS = ru_maxrss of the trainer process, worker = the largest of its "
            "children's; median [min-max] over seeds")


def write_outputs(folder: str, seeds: dict, setup_info: dict, title: str) -> str:
    """bench_multigrid.{json,png,md} in `folder` for these seeds' results; returns the printed text."""
    summary = summarize_seeds(seeds)
    text = table(summary)
    footer = _footer(setup_info, summary["seeds"])
    result = {"bench": "bench_multigrid", **setup_info, "summary": summary, "table": text}
    if len(seeds) == 1:
        result.update(next(iter(seeds.values())))
        result["table"] = text
    out = os.path.join(folder, SUMMARY)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(seeds, summary, out + ".png", title + (f", {len(seeds)} seeds" if len(seeds) > 1 else ""))
    with open(out + ".md", "w") as f:
        f.write(text + "\n\n" + footer + "\n")
    return text + "\n\n" + footer


def _title(info: dict) -> str:
    """The picture's title."""
    return (f"X3D-{info['settings']['version']} on {info['dataset']['train_videos']} synthetic videos, "
            f"{info['device']}" + (" (tiny smoke run)" if info["tiny"] else ""))


def write_summary(out_dir: str, after_seed: bool = False) -> int:
    """The summary over every seed folder in out_dir with a bench_multigrid.json; 2 when there is none."""
    seeds = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "seed_*", SUMMARY + ".json"))):
        with open(path) as f:
            result = json.load(f)
        seeds[result["settings"]["seed"]] = result
    if not seeds:
        print(f"error: no seed folder with {SUMMARY}.json under {out_dir}: run a seed first "
              "(the same options without --summary)", file=sys.stderr)
        return 2
    info = {k: v for k, v in seeds[min(seeds)].items() if k not in ("runs", "summary", "table", "target_top1")}
    text = write_outputs(out_dir, seeds, {**info, "settings": {**info["settings"], "seed": sorted(seeds)}},
                         _title(info))
    shown = f"\n{text}" if len(seeds) > 1 or not after_seed else " (one seed: its table above)"
    print(f"[bench] summary over seeds {sorted(seeds)} in {out_dir}{shown}", flush=True)
    return 0


def main(argv=None) -> int:
    """Train and test this seed's runs (skipping those already done), write its results, refresh the summary."""
    args = parse_args(argv)
    if args.summary:
        return write_summary(args.out_dir)
    saved = saved_runs(args).get(seed_dir(args), {})
    paths, data_s = make_data(args)
    print(f"[bench] dataset {args.data} ready in {data_s:.1f} s", flush=True)
    flags = common_flags(args, paths)
    argv = {name: run_argv(args, flags, name) for name in RUNS}
    runs = {}
    for name in RUNS:
        old = saved.get(name)
        if old is not None and old["flags"] != argv[name]:
            refuse(f"{os.path.join(seed_dir(args), name)} was trained with other trainer flags than this call's "
                   "(the bench changed?): delete that folder to train it again")
        if name in args.runs and not (old and old["returncode"] == 0):
            trained = train_run(args, name, argv[name] + ["--log-dir", seed_dir(args), "--run-name", name])
            runs[name] = finish_run(args, name, argv[name], trained)
            _free_gpu_cache(args)
        elif old is not None:
            if name in args.runs:
                print(f"[bench] seed {args.seed}: {name} is already measured in {seed_dir(args)}: kept, not "
                      "trained again (delete its folder to measure it again)", flush=True)
            runs[name] = old
    target = compare(runs)
    cfg = config_of(flags)
    protocol = (f"{cfg.test_temporal_views} temporal x {cfg.test_spatial_views} spatial views, "
                f"{cfg.frames}x{cfg.rate} frames, crop {cfg.test_crop}, mean of softmax")
    info = setup(args, data_s, protocol)
    seed_result = {**info, "target_top1": target, "runs": runs}
    print(write_outputs(seed_dir(args), {args.seed: seed_result}, info, _title(info) + f", seed {args.seed}"),
          flush=True)
    write_summary(args.out_dir, after_seed=True)
    return 0 if all(r.get("returncode") == 0 for r in runs.values()) else 1


def _free_gpu_cache(args) -> None:
    """Hand the checkpoint tests' cached GPU memory back before the next training subprocess."""
    if args.device == "cuda":
        import torch
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
