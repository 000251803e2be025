"""End to end: train_x3d_charades.py and train_x3d_charades_loc.py on a generated Charades-format dataset.

Every run is the real script in a subprocess: real JPEG frame folders, real checkpoints on disk, the
real scoring command on the submission file each run writes.
"""
import json
import math
import os
import subprocess
import sys

import pytest
from test_train_kinetics import _fails

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"classify": os.path.join(ROOT, "train_x3d_charades.py"),
           "localize": os.path.join(ROOT, "train_x3d_charades_loc.py")}
SUBMISSIONS = {"classify": "submission_classify.txt", "localize": "submission_localize.txt"}
OFFICIAL = {"classify": "classify_map", "localize": "localize_map"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small synthetic Charades-format dataset: 2 motion classes at the demos' speed and size, 64x48
    frames, 1.5-2 s videos."""
    import synthetic_data
    return synthetic_data.make_charades(str(tmp_path_factory.mktemp("c") / "charades"),
                                        classes=["moving left", "moving right"], train_videos=16,
                                        test_videos=8, seconds=(1.5, 2.0), size=(64, 48),
                                        difficulty="demo", seed=3)


def base_args(kind, data, log_dir, run_name, **overrides):
    """A tiny X3D-XS configuration, constant shape (Multigrid off, as the scripts' defaults).

    On PyTorch's depthwise-conv kernels (--no-fast-depthwise): whether 48 iterations from scratch
    learn left vs right depends on the float trajectory (see the end-to-end test); with
    x3d_kernels' rounding (gradients as close to float64 as PyTorch's, tests/test_x3d_kernels.py)
    this budget tested at 0.72 and 96 iterations at 0.68, against the 0.906 asked.
    """
    args = {
        "frames-root": data["frames_root"], "train-annotations": data["train_csv"],
        "test-annotations": data["test_csv"], "class-list": data["classes"], "pretrained": "",
        "x3d-version": "XS", "frames": 8, "rate": 4, "crop": 32, "test-crop": 32,
        "short-side": "36,44", "batch-size": 4, "lr-reference-batch": 4, "base-lr": 0.05,
        "steps": "0,10", "max-epoch": 12, "warmup-epochs": 0.5, "warmup-start-lr": 0.01,
        "dropout": 0.0, "workers": 0, "threads": 1, "log-dir": str(log_dir), "run-name": run_name,
        "precise-bn-batches": 2, "test-temporal-views": 2, "test-spatial-views": 1,
        "test-batch": 4, "eval-period": 3, "log-period": 2, "checkpoint-iters": 0,
        "checkpoint-period": 0,
    }
    args.update(overrides)
    out = [sys.executable, SCRIPTS[kind], "--deterministic", "--no-fast-depthwise"]
    for k, v in args.items():
        out += [f"--{k}={v}"]
    return out


def run(cmd, timeout=300):
    """Run a command; return the CompletedProcess (stdout and stderr as text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def records(run_dir, kind):
    """metrics.jsonl records of one kind."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def train_score_resume(kind, data, tmp_path, run_name, **overrides):
    """Train, check the run folder, score the submission with the CLI, rerun (resume); return results.json."""
    cmd = base_args(kind, data, tmp_path, run_name, **overrides)
    first = run(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / run_name
    for name in ("config.json", "log.txt", "metrics.jsonl", "training_curves.png", "results.json",
                 SUBMISSIONS[kind], "checkpoints/last.pt", "checkpoints/best.pt", "checkpoints/final.pt"):
        assert (run_dir / name).exists(), name
    train = records(run_dir, "train")
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    assert [r["epoch"] for r in records(run_dir, "val")] == [3, 6, 9, 12]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["videos"] == 8 and results["failed_videos"] == 0
    scored = run([sys.executable, os.path.join(ROOT, "charades.py"), kind, "--annotations",
                  data["test_csv"], "--submission", str(run_dir / SUBMISSIONS[kind]),
                  "--classes", data["classes"]])
    assert scored.returncode == 0, scored.stderr
    assert scored.stdout.strip() == f"mAP: {results[OFFICIAL[kind]]:.6f}"

    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "resumed at epoch 12" in again.stdout
    assert len(records(run_dir, "train")) == len(train)  # nothing retrained
    assert json.loads((run_dir / "results.json").read_text())[OFFICIAL[kind]] == results[OFFICIAL[kind]]
    return results


@pytest.mark.slow
def test_classify_then_localize_train_resume_and_submissions_score_the_same(data, tmp_path):
    """Classification from scratch, then localization fine-tuned from its final.pt (the usual order).

    48 iterations of 4 clips at LR 0.05, on the "demo" difficulty (2x speed, 1.6x objects). With
    the old budget (24 iterations at LR 0.1, "easy" difficulty) this learned left vs right on one
    machine (mAP 1.000 vs 0.806 random) and not on another (0.905: the trajectory depends on the
    CPU's floating-point path, as the Kinetics demo's does); the localization fine-tune at LR 0.1
    for 48 iterations went below random (0.46 vs 0.53). Measured with these settings on the second
    machine: classification 0.958 vs 0.806, localization 0.734 vs 0.535.
    """
    cls = train_score_resume("classify", data, tmp_path, "cls")
    assert cls["classify_map"] > cls["random_scores_map"] + 0.1, cls
    loc = train_score_resume("localize", data, tmp_path, "loc",
                             pretrained=str(tmp_path / "cls" / "checkpoints" / "final.pt"))
    assert loc["localize_map"] > loc["random_scores_localize_map"] + 0.05, loc
    assert "not official" in loc["frame_map_protocol"] and 0 < loc["frame_map"] <= 1
    lines = (tmp_path / "loc" / SUBMISSIONS["localize"]).read_text().splitlines()
    assert len(lines) == 8 * 25 and [line.split()[1] for line in lines[:25]] == [str(j) for j in range(1, 26)]


def test_bad_inputs_give_one_clear_message(data, tmp_path):
    """Missing frames root, a CSV with an unknown class, the default pretrained file absent."""
    missing = str(tmp_path / "nowhere")
    _fails(run(base_args("classify", data, tmp_path, "a", **{"frames-root": missing})), missing, "--frames-root")
    bad = tmp_path / "bad.csv"
    text = open(data["test_csv"]).read().splitlines()
    header, row = text[0], text[1].rsplit(",", 2)
    bad.write_text(header + "\n" + f"{row[0]},c009 0.00 1.00,{row[2]}\n")
    _fails(run(base_args("localize", data, tmp_path, "b", **{"test-annotations": str(bad)})),
           str(bad), "line 2", "unknown class 'c009'")
    _fails(run(base_args("classify", data, tmp_path, "c", pretrained=str(tmp_path / "x3d_m.pt"))),
           "x3d_m.pt: no such file")
