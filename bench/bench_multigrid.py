"""Multigrid against constant-shape training: multi-view accuracy against wall-clock, one model, one GPU.

    python bench/bench_multigrid.py                               # X3D-S on one GPU: the issue-8 measurement
    python bench/bench_multigrid.py --tiny --device cpu           # CPU smoke run of the machinery (numbers meaningless)
    python bench/bench_multigrid.py --runs constant               # one run per command; a later call with
    python bench/bench_multigrid.py --runs multigrid              #   the same --out-dir reports both

On the device machine (one H100, 16 cores, 10 minutes a command) one command does it all; it needs the
PyAV wheel carried in: bench/README.md gives the command.

It generates a synthetic Kinetics-format dataset (`synthetic_data.make_kinetics`; defaults: 10 motion
classes x (200 train + 20 val) H.264 videos of 3 s at 30 fps, 128x96, "medium" difficulty, 16
processes), then trains the same X3D (S by default) twice with the real trainer
(`train_x3d_kinetics_multigrid.py` in a subprocess), from the same max epoch and LR steps, the same
step policy (steps_with_relative_lrs, gamma 0.1), the same base-LR rule (0.1 per 128 clips, linear)
and warm-up, and the same seed:
- constant: no long or short cycle (max epoch 20, steps 0,8,13,16: PySlowFast's stepwise
  0,94,154,196 of 239, scaled);
- multigrid: long and short cycle at epoch factor 1.5 (PySlowFast's schedule: 30 epochs, 13 phases,
  about a quarter of the constant run's iterations).
Every `--evals`-th part of a run the trainer runs precise BN and its 1-clip validation and keeps an
epoch checkpoint; after training, the bench runs the multi-view test (`--eval-only`, the trainer's
own test, 10 temporal x 3 spatial views by default) on each kept checkpoint, and the trainer's final
test gives the last point. Testing saved checkpoints, rather than adding a test to the training loop,
keeps the trainer unchanged and the test's cost out of the training clock.

Wall-clock ("wall s") is the training loop's time from the first step to the last, read from the
run's metrics.jsonl time stamps, minus the evaluations the bench asked for (precise BN + validation);
checkpoint writes, plots, loader restarts and shape changes stay in. The table gives per run: wall s,
iterations, clips, data-wait share of step time, peak GPU memory, final multi-view top-1, the time
at which the run first reached the constant run's final top-1 (first evaluation at or above it) and
that time over the constant run's wall s. The JSON (`bench_multigrid.json`) also holds every
evaluation, every Multigrid phase start (shape changes marked) and a breakdown of each epoch start:
evaluation, bookkeeping (checkpoint, plot), the first batch's data wait and the first step's compute
against the same shape's median. The PNG (`bench_multigrid.png`) plots top-1 against wall s for both
runs, with the Multigrid run's shape changes marked. Per-step records (`--log-period 1`) add one
host-device synchronisation per step to both runs.
"""
import argparse
import contextlib
import datetime
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
import train_x3d_kinetics_multigrid as kinetics
import trainer

SCRIPT = os.path.join(ROOT, "train_x3d_kinetics_multigrid.py")
RUNS = ("constant", "multigrid")
# The GPU measurement; every value is a command-line option of the same name.
DEFAULTS = {
    "device": "cuda", "version": "S", "frames": 0, "rate": 0, "crop": 0, "test_crop": 0, "short_side": "",
    "batch_size": 64, "base_lr": 0.1, "lr_reference_batch": 128, "max_epoch": 20, "steps": "0,8,13,16",
    "warmup_epochs": 2.0, "epoch_factor": 1.5, "bn_base_size": 8, "dropout": 0.5, "precision": "fp32",
    "workers": 14, "threads": 0, "evals": 5, "precise_bn_batches": 20, "test_temporal_views": 10,
    "test_spatial_views": 3, "test_batch": 8, "log_period": 1, "seed": 0,
    "classes": 10, "train_per_class": 200, "val_per_class": 20, "seconds": 3, "fps": 30, "size": "128x96",
    "difficulty": "medium", "keyframe_interval": 250, "data_workers": 16,
}
# The CPU smoke run of tests/test_bench_multigrid.py: X3D-XS 4x48, 36 training videos, 2 epochs.
TINY = {
    "device": "cpu", "version": "XS", "frames": 4, "rate": 2, "crop": 48, "test_crop": 48, "short_side": "52,60",
    "batch_size": 2, "base_lr": 0.05, "lr_reference_batch": 2, "max_epoch": 2, "steps": "0,1", "warmup_epochs": 0.0,
    "bn_base_size": 2, "dropout": 0.0, "workers": 1, "threads": 1, "evals": 2, "precise_bn_batches": 2,
    "test_temporal_views": 2, "test_spatial_views": 1, "test_batch": 2,
    "classes": 3, "train_per_class": 12, "val_per_class": 2, "seconds": 1, "size": "64x48", "difficulty": "easy",
    "data_workers": 1,
}


def parse_args(argv=None):
    """Options (DEFAULTS, or TINY with --tiny, for those not given)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the CPU smoke configuration (TINY) for options not given")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                        help="runs to train now; a run not listed is read from --out-dir when it is there")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "logs", "bench_multigrid"),
                        help="run folders, bench_multigrid.{json,png,md} (a run's old folder is replaced)")
    parser.add_argument("--data", help="dataset folder (default data/bench_multigrid[_tiny]; reused when complete)")
    parser.add_argument("--run-timeout", type=float, default=0, help="seconds before a training run is stopped; 0: none")
    for name, value in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(value), default=None, help=f"(default {value!r}; --tiny {TINY.get(name, value)!r})")
    args = parser.parse_args(argv)
    for name, value in (TINY if args.tiny else {}).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.data = args.data or os.path.join(ROOT, "data", "bench_multigrid_tiny" if args.tiny else "bench_multigrid")
    try:
        args.size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(args.size) == 2
    except (ValueError, AssertionError):
        parser.error(f"--size {args.size!r}: expected WIDTHxHEIGHT such as 128x96")
    if args.evals < 1:
        parser.error(f"--evals must be at least 1, got {args.evals}")
    if args.device not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: use cuda (one GPU) or cpu")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available here; use --tiny --device cpu for a smoke run")
    return args


def make_data(args) -> tuple[dict, float]:
    """Generate (or find complete) the synthetic Kinetics-format dataset; (paths, seconds spent)."""
    import synthetic_data
    start = time.time()
    try:
        paths = synthetic_data.make_kinetics(
            args.data, num_classes=args.classes, train_per_class=args.train_per_class,
            val_per_class=args.val_per_class, seconds=args.seconds, fps=args.fps, size=args.size,
            keyframe_interval=args.keyframe_interval, difficulty=args.difficulty, workers=args.data_workers,
            progress=sys.stderr.isatty())
    except ValueError as e:
        sys.exit(f"error: dataset {args.data}: {e}")
    return paths, time.time() - start


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


def run_flags(name: str) -> list[str]:
    """The flags that make a run constant-shape or Multigrid."""
    return ["--no-long-cycle", "--no-short-cycle"] if name == "constant" else ["--long-cycle", "--short-cycle"]


def config_of(flags: list[str]):
    """The config the trainer resolves from these flags (its own parser and preset rules)."""
    cfg = trainer.parse_config(kinetics.CONSTANTS, flags)
    trainer.fill_preset(cfg)
    return cfg


def plan_of(flags: list[str]) -> multigrid.MultigridPlan:
    """The Multigrid plan the trainer will build from these flags."""
    return trainer.make_plan(config_of(flags), trainer.Dist())


def train_run(args, name: str, flags: list[str]) -> dict:
    """Train one run in a subprocess (its folder replaced); returns returncode, seconds and console path."""
    run_dir = os.path.join(args.out_dir, name)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(args.out_dir, exist_ok=True)
    console = os.path.join(args.out_dir, f"{name}.console.txt")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"[bench] training {name} (output in {console})", flush=True)
    start = time.time()
    with open(console, "w") as out:
        try:
            code = subprocess.run([sys.executable, SCRIPT] + flags, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  cwd=ROOT, timeout=args.run_timeout or None, check=False).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.time() - start
    print(f"[bench] {name}: exit {code} after {seconds:.1f} s", flush=True)
    return {"returncode": code, "process_s": seconds, "console": console}


def multiview_test(flags: list[str], checkpoint: str, log_dir: str) -> dict:
    """The trainer's multi-view test (`--eval-only`) of one checkpoint, in this process; its results dict."""
    name = os.path.splitext(os.path.basename(checkpoint))[0]
    argv = flags + ["--eval-only", "--checkpoint", checkpoint, "--log-dir", log_dir, "--run-name", name]
    with open(os.path.join(log_dir, "console.txt"), "a") as out, contextlib.redirect_stdout(out):
        trainer.main(kinetics.TASK, kinetics.CONSTANTS, argv)
    with open(os.path.join(log_dir, name, "results.json")) as f:
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
    return {
        "name": name, **process, "run_dir": run_dir,
        "wall_s": wall, "wall_with_evals_s": last["end"] - tl["epochs"][0]["start"],
        "evals_s": sum(ep["eval_s"] for ep in tl["epochs"]), "epochs": last["epoch"] + 1,
        "iterations": train[-1]["step"], "clips": round(sum(r["clips_per_s"] * r["window_s"] for r in train)),
        "data_wait": sum(r["data_wait"] * r["window_s"] for r in train) / window,
        "peak_gpu_mem_gb": max(mem) if mem else None,
        "final_top1": evaluations[-1]["top1"] if final else None,
        "evaluations": evaluations, "phases": changes,
        "epoch_starts": {**summary, "lost_share": summary["lost_s"] / wall if wall else None},
    }


def _accuracy(results: dict) -> dict:
    """top-1 / top-5 / mean class accuracy of a results dict or test record."""
    return {k: results[k] for k in ("top1", "top5", "mean_class_acc") if k in results}


def finish_run(args, name: str, flags: list[str], process: dict) -> dict:
    """Test a trained run's kept checkpoints; write and return its summary (or its failure)."""
    run_dir = os.path.join(args.out_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    result = {"name": name, **process, "flags": flags}
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
        result.update(summarize(name, run_dir, process, tests), flags=flags, checkpoint_tests_s=time.time() - start)
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


def _cell(value, fmt="{:.1f}"):
    """A table cell: formatted number or n/a."""
    return "n/a" if value is None else fmt.format(value)


def table(runs: dict) -> str:
    """The markdown table: one row per run, the constant run first (the baseline)."""
    head = ["run", "wall s", "iterations", "clips", "data-wait %", "peak GiB", "final top-1 %",
            "reach s", "reach / constant wall"]
    rows = [head, ["---"] * len(head)]
    for name in RUNS:
        r = runs.get(name)
        if r is None:
            continue
        if "wall_s" not in r:
            rows.append([name] + ["failed"] + [""] * (len(head) - 2))
            continue
        rows.append([name, _cell(r["wall_s"]), str(r["iterations"]), str(r["clips"]), _cell(100 * r["data_wait"]),
                     _cell(r["peak_gpu_mem_gb"], "{:.2f}"), _cell(r["final_top1"], "{:.2f}"),
                     "not reached" if r["reach_s"] is None else _cell(r["reach_s"]),
                     _cell(r["reach_ratio"], "{:.2f}x")])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot(runs: dict, target, path: str, title: str) -> None:
    """accuracy against wall-clock, both runs, Multigrid shape changes as dotted lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {"constant": "tab:blue", "multigrid": "tab:orange"}
    for name, run in runs.items():
        points = [(e["wall_s"], e["top1"]) for e in run.get("evaluations", [])]
        if points:
            ax.plot(*zip(*points), "o-", color=colors[name], label=f"{name} ({run['iterations']} iterations)")
    for change in runs.get("multigrid", {}).get("phases", []):
        if change["shape_change"]:
            ax.axvline(change["at_s"], color=colors["multigrid"], ls=":", lw=0.8)
            _, frames, crop = change["to"]
            ax.annotate(f"{frames}x{crop}", (change["at_s"], 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=7, color=colors["multigrid"])
    if runs.get("multigrid", {}).get("phases"):
        ax.plot([], [], ":", color=colors["multigrid"], lw=0.8, label="Multigrid shape change (frames x crop)")
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"constant final {target:.1f}%")
    ax.set(xlabel="training wall-clock, s (evaluations excluded)", ylabel="multi-view top-1, %", title=title)
    ax.set_xlim(left=0)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def setup(args, data_s: float, protocol: str) -> dict:
    """What the numbers were measured on: device, software, dataset and settings."""
    import torch
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    settings = {k: getattr(args, k) for k in DEFAULTS}
    settings["size"] = "x".join(map(str, args.size))
    return {
        "created": datetime.datetime.now().isoformat(timespec="seconds"), "device": device,
        "torch": torch.__version__, "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
        "dataset": {"root": args.data, "classes": args.classes, "train_videos": args.classes * args.train_per_class,
                    "val_videos": args.classes * args.val_per_class, "seconds": args.seconds, "fps": args.fps,
                    "size": settings["size"], "difficulty": args.difficulty,
                    "keyframe_interval": args.keyframe_interval, "generation_s": data_s},
        "protocol": protocol, "settings": settings, "tiny": args.tiny,
    }


def main(argv=None) -> int:
    """Generate the data, train and test the runs, write the JSON, PNG and table; 1 if a run failed."""
    args = parse_args(argv)
    paths, data_s = make_data(args)
    print(f"[bench] dataset {args.data} ready in {data_s:.1f} s", flush=True)
    flags = common_flags(args, paths)
    argv = {}
    for name in RUNS:
        period = str(math.ceil(plan_of(flags + run_flags(name)).max_epoch / args.evals))
        argv[name] = flags + run_flags(name) + ["--eval-period", period, "--checkpoint-period", period]
    runs = {}
    for name in set(RUNS) - set(args.runs):  # a run trained by an earlier call, with the same options
        saved = os.path.join(args.out_dir, name, "bench_run.json")
        if os.path.exists(saved):
            with open(saved) as f:
                runs[name] = json.load(f)
            if runs[name]["flags"] != argv[name]:
                sys.exit(f"error: {saved} was trained with other options than this call's: train it again "
                         f"(--runs {name}) or give the options it was trained with")
    trained = {}
    for name in args.runs:  # both trainings first: the checkpoint tests then hold no GPU memory during them
        trained[name] = train_run(args, name, argv[name] + ["--log-dir", args.out_dir, "--run-name", name])
    for name in args.runs:
        runs[name] = finish_run(args, name, argv[name], trained[name])
    runs = {name: runs[name] for name in RUNS if name in runs}
    target = compare(runs)
    cfg = config_of(flags)
    protocol = (f"{cfg.test_temporal_views} temporal x {cfg.test_spatial_views} spatial views, "
                f"{cfg.frames}x{cfg.rate} frames, crop {cfg.test_crop}, mean of softmax")
    result = {"bench": "bench_multigrid", **setup(args, data_s, protocol), "target_top1": target, "runs": runs}
    text = table(runs)
    result["table"] = text
    out = os.path.join(args.out_dir, "bench_multigrid")
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    title = (f"X3D-{args.version} on {result['dataset']['train_videos']} synthetic videos, {result['device']}"
             + (" (tiny smoke run)" if args.tiny else ""))
    plot(runs, target, out + ".png", title)
    footer = (f"{result['device']}; torch {result['torch']}; dataset {result['dataset']['train_videos']} train / "
              f"{result['dataset']['val_videos']} val videos, {args.classes} classes, {args.seconds} s at {args.fps} fps, "
              f"{result['dataset']['size']}, {args.difficulty}; X3D-{args.version}, batch {args.batch_size}, "
              f"max epoch {args.max_epoch}, steps {args.steps}; test: {protocol}; "
              "wall s = training loop without the evaluations; reach = first evaluation at or above the "
              "constant run's final top-1")
    with open(out + ".md", "w") as f:
        f.write(text + "\n\n" + footer + "\n")
    print(text + "\n\n" + footer, flush=True)
    return 0 if all(r.get("returncode") == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
