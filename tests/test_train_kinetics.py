"""End to end: train_x3d_kinetics_multigrid.py on a generated Kinetics-format dataset, on the CPU.

Every run is the real script in a subprocess: real H.264 files decoded by PyAV, real DataLoader
workers, real checkpoints on disk, real gloo processes for DDP, a real SIGKILL.
"""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_x3d_kinetics_multigrid.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small synthetic Kinetics-format dataset (3 motion classes, 64x48 mp4s)."""
    import synthetic_data
    return synthetic_data.make_kinetics(str(tmp_path_factory.mktemp("k") / "kinetics"),
                                        num_classes=3, train_per_class=24, val_per_class=2,
                                        seconds=1, size=(64, 48), seed=1)


def base_args(data, log_dir, run_name, **overrides):
    """A tiny X3D-XS Multigrid configuration: every long-cycle phase fits the 72 clips.

    BN splits hold 2 samples (bn-base-size 2): with 1 frame at crop 24 the last stage's feature
    map is 1x1x1, and BN needs more than one value per channel.
    """
    args = {
        "train-root": data["train_root"], "train-annotations": data["train_csv"],
        "val-root": data["val_root"], "val-annotations": data["val_csv"],
        "class-list": data["classes"], "x3d-version": "XS", "frames": 4, "rate": 2,
        "crop": 48, "test-crop": 48, "short-side": "52,60", "batch-size": 4,
        "lr-reference-batch": 4, "base-lr": 0.01, "steps": "0,2", "max-epoch": 3,
        "bn-base-size": 2, "workers": 0, "threads": 1, "log-dir": str(log_dir),
        "run-name": run_name, "precise-bn-batches": 2, "test-temporal-views": 2,
        "test-spatial-views": 1, "test-batch": 2, "eval-period": 2, "log-period": 1,
        "checkpoint-iters": 3, "checkpoint-period": 0, "warmup-epochs": 0,
    }
    args.update(overrides)
    out = [sys.executable, SCRIPT, "--deterministic", "--no-random-flip"]
    for k, v in args.items():
        out += [f"--no-{k}"] if v is None else [f"--{k}", str(v)]
    return out


def run(cmd, timeout=600):
    """Run a command; return the CompletedProcess (stdout and stderr as text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def kill_at_first_checkpoint(cmd, run_dir):
    """Start a training command, SIGKILL it once its first last.pt exists; return that checkpoint's path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return last


def records(run_dir, kind=None):
    """metrics.jsonl of a run, optionally of one kind."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if kind is None or r["kind"] == kind]


def model_state(path):
    """The model state dict of a checkpoint file."""
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a, b, atol=0.0):
    """Same keys; every tensor equal (exactly, or within atol)."""
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k].double(), b[k].double(), atol=atol, rtol=0, msg=k)


@pytest.mark.slow
def test_multigrid_run_kill_resume_and_test(data, tmp_path):
    """A Multigrid run through long-cycle shape changes; a SIGKILLed twin resumes to the same weights."""
    full = run(base_args(data, tmp_path, "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    run_dir = tmp_path / "full"
    for name in ("config.json", "log.txt", "metrics.jsonl", "multigrid_schedule.png",
                 "training_curves.png", "results.json", "test_predictions.csv",
                 "checkpoints/last.pt", "checkpoints/best.pt", "checkpoints/final.pt"):
        assert (run_dir / name).exists(), name
    phases = records(run_dir, "phase")
    shapes = {(p["per_gpu_batch"], p["frames"], p["crop"]) for p in phases}
    assert len(shapes) >= 3, phases
    train = records(run_dir, "train")
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    assert {(r["frames"], r["crop"]) for r in train} >= {(1, 24), (4, 48)}
    results = json.loads((run_dir / "results.json").read_text())
    assert results["videos"] == 6 and "temporal" in results["protocol"]
    assert 0.0 <= results["top1"] <= 100.0
    assert "multi-view test" in full.stdout and "Traceback" not in full.stderr
    assert re.search(r"loss .* training \d+/\d+ it, \d+ s left", full.stdout)  # time left, in a log

    # The twin: killed with SIGKILL right after its first mid-epoch checkpoint, then resumed.
    cmd = base_args(data, tmp_path, "killed")
    last = kill_at_first_checkpoint(cmd, tmp_path / "killed")
    killed_step = torch.load(last, map_location="cpu", weights_only=False)["step"]
    final_step = train[-1]["step"]
    assert 0 < killed_step < final_step
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at epoch" in resumed.stdout
    assert_same_weights(model_state(last), model_state(run_dir / "checkpoints" / "last.pt"))
    assert_same_weights(model_state(tmp_path / "killed" / "checkpoints" / "final.pt"),
                        model_state(run_dir / "checkpoints" / "final.pt"))
    assert [r["step"] for r in records(tmp_path / "killed", "train")] == [r["step"] for r in train]

    # From final.pt alone (its run's settings, data paths and class names travel with it): the
    # multi-view test, written beside the run's results and not over them, and --predict of one
    # test video, which prints the run's top class and probability for it.
    final = str(run_dir / "checkpoints" / "final.pt")
    kept = {n: (run_dir / n).read_bytes() for n in ("results.json", "test_predictions.csv")}
    alone = [sys.executable, SCRIPT, "--checkpoint", final, "--threads", "1", "--workers", "0"]
    ev = run(alone + ["--eval-only"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "--x3d-version XS" in ev.stdout and "--val-root" in ev.stdout  # taken from final.pt
    assert json.loads((run_dir / "eval_final" / "results.json").read_text())["top1"] == results["top1"]
    assert (run_dir / "eval_final" / "test_predictions.csv").exists()
    assert {n: (run_dir / n).read_bytes() for n in kept} == kept
    with open(run_dir / "test_predictions.csv") as f:
        row = next(csv.DictReader(f))
    pred = run(alone + ["--predict", row["path"]])
    assert pred.returncode == 0, pred.stderr[-3000:]
    lines = pred.stdout.strip().splitlines()
    assert len(lines) == 1 + 3  # the path, then the top (3) classes
    prob, name = lines[1].split(maxsplit=1)
    assert name == row["top1"] and abs(float(prob) - float(row["top1_prob"])) <= 2e-4, (lines, row)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on one by bench/gpu_smoke.py too)")
def test_gpu_run_killed_mid_epoch_resumes_in_bf16_channels_last(data, tmp_path):
    """On GPU 0: a SIGKILLed bf16 channels-last run resumes (optimizer state on the GPU) and finishes."""
    cmd = base_args(data, tmp_path, "gpu", precision="bf16", workers=2) + ["-gpu", "0", "--channels-last"]
    kill_at_first_checkpoint(cmd, tmp_path / "gpu")
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at epoch" in resumed.stdout
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path / "gpu", "train"))
    assert (tmp_path / "gpu" / "results.json").exists()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(data, tmp_path):
    """Two gloo processes with batch 2 each end with the weights of one process with batch 4.

    Conditions that make the runs comparable: dropout 0; per-sample seeds come from the position
    in the epoch's global permutation, not the rank; ranks take interleaved shares, so a global
    batch of 4 is rank 0's 2 + rank 1's 2; BN splits are per-GPU batch / bn_base_size, 1 per
    sample-pair per rank and 2 in the single process, whose interleaved splits then hold exactly
    the samples of each rank. Only float summation order differs.

    Both runs use PyTorch's depthwise-conv backward (--no-fast-depthwise). With BN splits of 2
    samples on 1x1x1 maps these gradients are ill-conditioned: the two runs' own rounding moves
    some parameter gradients by 5% at step 4 (measured), and any other rounding of the convs (such
    as x3d_kernels', 1-4 ulps from PyTorch's) leads onto a trajectory where that grows past 2e-5.
    x3d_kernels' gradients are checked against PyTorch's in tests/test_x3d_kernels.py.
    """
    common = {"batch-size": 4, "lr-reference-batch": 4, "dropout": 0.0, "bn-base-size": 2,
              "max-epoch": 2, "steps": "0,1", "eval-period": 100, "precise-bn-batches": 0,
              "fast-depthwise": None}
    two = run(base_args(data, tmp_path, "two", **common, **{"cpu-processes": 2}))
    assert two.returncode == 0, two.stderr[-3000:]
    one = run(base_args(data, tmp_path, "one", **common))
    assert one.returncode == 0, one.stderr[-3000:]
    fingerprints = records(tmp_path / "two", "ranks")[-1]["param_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    steps_two = [r["step"] for r in records(tmp_path / "two", "train")]
    assert steps_two == [r["step"] for r in records(tmp_path / "one", "train")]
    a = model_state(tmp_path / "two" / "checkpoints" / "last.pt")
    b = model_state(tmp_path / "one" / "checkpoints" / "last.pt")
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    assert_same_weights({k: a[k] for k in params}, {k: b[k] for k in params}, atol=2e-5)


def _fails(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for n in needles:
        assert n in result.stderr, (n, result.stderr[-2000:])


def test_bad_inputs_give_one_clear_message(data, tmp_path):
    """Missing root, empty annotation file, wrong-architecture checkpoint, missing GPU."""
    missing = str(tmp_path / "nowhere")
    _fails(run(base_args(data, tmp_path, "a", **{"train-root": missing})), missing)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _fails(run(base_args(data, tmp_path, "b", **{"train-annotations": str(empty)})), str(empty))
    import x3d
    other = tmp_path / "x3d_l.pt"
    torch.save({"model": x3d.generate_model("L", n_classes=3).state_dict(), "x3d_version": "L",
                "n_classes": 3, "task": "class"}, other)
    _fails(run(base_args(data, tmp_path, "c", **{"pretrained": str(other)})), str(other))
    if torch.cuda.device_count() == 0:
        _fails(run(base_args(data, tmp_path, "d") + ["-gpu", "0"]), "GPU 0 does not exist")


@pytest.mark.slow
def test_training_loss_falls_on_a_small_training_set(tmp_path):
    """The trainer learns: on 8 videos (2 classes), constant shape, the loss falls well below ln 2.

    The synthetic classes need motion, which a tiny run cannot learn from scratch in seconds; the
    8 videos also differ in texture and colour, which the network can memorise, and that is what
    this checks: gradients, optimizer, LR schedule and data all line up.
    """
    import synthetic_data
    small = synthetic_data.make_kinetics(str(tmp_path / "small"), num_classes=2, train_per_class=4,
                                         val_per_class=1, seconds=1, size=(64, 48),
                                         difficulty="easy", seed=2)
    result = run(base_args(small, tmp_path, "learn", **{
        "long-cycle": None, "short-cycle": None, "lr-policy": "cosine", "steps": "0",
        "max-epoch": 30, "base-lr": 0.01, "eval-period": 100, "checkpoint-iters": 0,
        "dropout": 0.0, "frames": 4, "crop": 32, "test-crop": 32, "short-side": "34,40"}))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["loss"] for r in records(tmp_path / "learn", "train")]
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert first > 0.6 and last < 0.75 * first, (first, last, losses)
