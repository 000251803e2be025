"""The Kinetics training script run end to end on a GPU: precisions, memory formats, compile, a kill.

    python bench/gpu_smoke.py                     # on GPU 0; a table of what ran and how it ended
    python bench/gpu_smoke.py --device cpu        # the same runs on the CPU (no compile), to check this script

Each run is `train_x3d_kinetics_multigrid.py` on a small generated dataset (X3D-XS, 16 frames,
long + short cycle, so the run passes several Multigrid shape changes):
- bf16 autocast + channels-last 3D, SIGKILLed once it has trained at its second long-cycle shape,
  then started again with the same command: it must resume from its checkpoint and finish;
- fp16 autocast with the grad scaler + torch.compile;
- fp32 with deterministic algorithms (warn-only) and no cuDNN autotuning.
A run passes when it exits 0, every logged loss is finite, it trained at every long-cycle shape of
its plan and it wrote the multi-view test's results.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import trainer  # noqa: E402 - after the repository root is on the path

SCRIPT = os.path.join(ROOT, "train_x3d_kinetics_multigrid.py")
SETTINGS = {
    "x3d-version": "XS", "frames": 16, "rate": 2, "crop": 64, "test-crop": 64, "short-side": "68,80",
    "batch-size": 8, "lr-reference-batch": 8, "base-lr": 0.01, "lr-policy": "steps_with_relative_lrs",
    "steps": "0,3,4", "max-epoch": 5, "warmup-epochs": 0, "bn-base-size": 4, "precise-bn-batches": 4,
    "test-temporal-views": 2, "test-spatial-views": 1, "test-batch": 8, "eval-period": 4,
    "log-period": 1, "checkpoint-iters": 2, "checkpoint-period": 0,
}
RUNS = {
    "bf16_channels_last_killed": {"precision": "bf16", "channels-last": True},
    "fp16_compile": {"precision": "fp16", "compile": True},
    "fp32_deterministic": {"precision": "fp32", "deterministic": True},
}


def command(args, name: str, extra: dict) -> list:
    """The training command of one run."""
    flags = dict(SETTINGS, **extra, **{"log-dir": args.out, "run-name": name, "workers": args.workers})
    cmd = [sys.executable, SCRIPT, "--no-random-flip", "--train-root", args.paths["train_root"],
           "--train-annotations", args.paths["train_csv"], "--val-root", args.paths["val_root"],
           "--val-annotations", args.paths["val_csv"], "--class-list", args.paths["classes"]]
    if args.device == "cuda":
        cmd += ["-gpu", "0"]
    for key, value in flags.items():
        cmd += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return cmd


def train_records(run_dir: str) -> list:
    """The run's train records so far."""
    return [r for r in trainer.read_metrics(run_dir) if r.get("kind") == "train"]


def start(cmd, log_path):
    """Start a run in its own process group, its output into log_path."""
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1")), log


def kill_at_second_shape(proc, run_dir: str, timeout: float) -> str:
    """SIGKILL the run's process group once it has logged a step at a second long-cycle shape."""
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        shapes = {(r["frames"], r["crop"]) for r in train_records(run_dir)}
        if len({f for f, _ in shapes}) >= 2 and os.path.exists(os.path.join(run_dir, "checkpoints", "last.pt")):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"killed after {time.time() - t0:.1f} s at shapes {sorted(shapes)}"
        time.sleep(0.2)
    return "not killed: the run ended or timed out first"


def run_one(args, name: str, extra: dict) -> dict:
    """Run (and for the killed run, kill and restart) one configuration; return its row."""
    run_dir = os.path.join(args.out, name)
    log_path = os.path.join(args.out, f"{name}.log")
    cmd = command(args, name, extra)
    timeout = args.compile_timeout if extra.get("compile") else args.timeout
    t0 = time.time()
    proc, log = start(cmd, log_path)
    note = ""
    if name.endswith("_killed"):
        note = kill_at_second_shape(proc, run_dir, timeout)
        log.close()
        proc, log = start(cmd, log_path)
    try:
        rc = proc.wait(timeout=max(1.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = "timeout"
    log.close()
    with open(log_path, errors="replace") as f:
        text = f.read()
    recs = train_records(run_dir)
    losses = [r["loss"] for r in recs]
    frames = sorted({r["frames"] for r in recs})
    results = os.path.join(run_dir, "results.json")
    top1 = None
    if os.path.exists(results):
        with open(results) as f:
            top1 = json.load(f).get("top1")
    resumed = "resumed at epoch" in text and note.startswith("killed")
    ok = (rc == 0 and losses and all(math.isfinite(x) for x in losses) and top1 is not None
          and frames == [4, 8, 16] and (resumed or not name.endswith("_killed")))
    return {"run": name, "ok": bool(ok), "rc": rc, "wall_s": round(time.time() - t0, 1), "steps": len(recs),
            "frames_seen": frames, "shapes": len({(r["batch"], r["frames"], r["crop"]) for r in recs}),
            "last_loss": round(losses[-1], 4) if losses else None, "test": top1,
            "peak_gpu_gb": round(max((r.get("gpu_mem_gb", 0) for r in recs), default=0), 3), "note": note}


def main() -> int:
    """Generate the data, run every configuration, print and write the table; exit 1 if any failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default="logs/gpu_smoke")
    p.add_argument("--data", default="data/gpu_smoke")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per run")
    p.add_argument("--compile-timeout", type=float, default=900.0,
                   help="seconds for the compiled run (one compilation per Multigrid shape, 8 shapes)")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = p.parse_args()
    import synthetic_data
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; use --device cpu to check this script on the CPU")
        return 2
    os.makedirs(args.out, exist_ok=True)
    args.paths = synthetic_data.make_kinetics(args.data, num_classes=3, train_per_class=64, val_per_class=4,
                                              seconds=2, size=(96, 72), difficulty="easy", seed=0,
                                              workers=os.cpu_count() or 1)
    rows = []
    for name in args.runs:
        extra = dict(RUNS[name])
        if args.device == "cpu" and extra.pop("compile", False):
            name = name.replace("_compile", "")
        rows.append(run_one(args, name, extra))
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    lines = [f"gpu_smoke on {device}, torch {torch.__version__}", "",
             "| run | ok | rc | wall s | steps | frames seen | shapes | last loss | test | peak GPU GiB | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['run']} | {'yes' if r['ok'] else 'NO'} | {r['rc']} | {r['wall_s']} | {r['steps']} | "
                     f"{r['frames_seen']} | {r['shapes']} | {r['last_loss']} | {r['test']} | {r['peak_gpu_gb']} | {r['note']} |")
    print("\n".join(lines))
    with open(os.path.join(args.out, "gpu_smoke.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
