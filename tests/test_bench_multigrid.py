"""bench/bench_multigrid.py: the tiny CPU run trains both runs with the real trainer and writes a well-formed JSON, PNG and table.

It checks the machinery, not the speed: the numbers of a 2-epoch X3D-XS run on 36 videos mean nothing.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import bench_multigrid as bm
import trainer

RUN_KEYS = ("returncode", "process_s", "wall_s", "wall_with_evals_s", "evals_s", "epochs", "iterations", "clips",
            "data_wait", "peak_gpu_mem_gb", "final_top1", "evaluations", "phases", "epoch_starts", "reach_s",
            "reach_ratio", "flags")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(out dir, JSON result, stdout) of one `--tiny --device cpu` run in a subprocess."""
    root = tmp_path_factory.mktemp("bench_multigrid")
    out = root / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(BENCH, "bench_multigrid.py"), "--tiny", "--device", "cpu",
                           "--out-dir", str(out), "--data", str(root / "data")],
                          capture_output=True, text=True, timeout=240, env=env, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out, json.loads((out / "bench_multigrid.json").read_text()), done.stdout


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_json_holds_both_runs_with_finite_numbers(tiny):
    """Setup, dataset and both runs are there; every timing, count and accuracy is a finite number in range."""
    _, result, _ = tiny
    for key in ("created", "device", "torch", "dataset", "protocol", "settings", "target_top1", "runs", "table"):
        assert key in result, key
    assert result["dataset"]["train_videos"] == 36 and result["dataset"]["val_videos"] == 6
    assert "temporal" in result["protocol"] and result["tiny"] is True
    assert set(result["runs"]) == set(bm.RUNS)
    for name, run in result["runs"].items():
        for key in RUN_KEYS:
            assert key in run, (name, key)
        assert run["returncode"] == 0 and run["peak_gpu_mem_gb"] is None, name
        for key in ("process_s", "wall_s", "wall_with_evals_s", "evals_s"):
            assert _finite(run[key]) and run[key] >= 0, (name, key, run[key])
        assert 0 < run["wall_s"] <= run["wall_with_evals_s"] < run["process_s"], name
        assert run["iterations"] > 0 and run["clips"] > 0 and 0 <= run["data_wait"] < 1, name
        assert 0 <= run["final_top1"] <= 100
        for key, value in run["epoch_starts"].items():
            assert value is None or _finite(value), (name, key, value)
    constant, mg = result["runs"]["constant"], result["runs"]["multigrid"]
    assert (constant["epochs"], mg["epochs"]) == (2, 3)  # max epoch 2; Multigrid's schedule makes it 3
    assert mg["iterations"] < constant["iterations"]


def test_evaluations_run_in_wall_clock_order_and_end_with_the_final_test(tiny):
    """Each run has a tested checkpoint and the final test, in increasing wall-clock; reach is measured against the constant run."""
    _, result, _ = tiny
    assert result["target_top1"] == result["runs"]["constant"]["final_top1"]
    for run in result["runs"].values():
        evals = run["evaluations"]
        assert len(evals) == 2 and evals[0]["source"].startswith("epoch_") and evals[-1]["source"] == "final test", evals
        assert all(0 <= e["top1"] <= 100 and _finite(e["wall_s"]) for e in evals)
        assert [e["wall_s"] for e in evals] == sorted(e["wall_s"] for e in evals)
        assert evals[-1]["wall_s"] == run["wall_s"] and evals[-1]["top1"] == run["final_top1"]
    constant = result["runs"]["constant"]
    assert constant["reach_s"] is not None and constant["reach_s"] <= constant["wall_s"]
    assert constant["reach_ratio"] == pytest.approx(constant["reach_s"] / constant["wall_s"])


def test_multigrid_run_lists_its_shape_changes_with_their_timings(tiny):
    """The Multigrid run's phase starts mark long-cycle shape changes with finite timings; the constant run has none."""
    _, result, _ = tiny
    phases = result["runs"]["multigrid"]["phases"]
    changes = [p for p in phases if p["shape_change"]]
    assert len(changes) >= 2, phases
    for p in changes:
        assert p["from"] != p["to"] and len(p["to"]) == 3 and p["short_cycle"][-1] == [p["to"][0], p["to"][2]]
        for key in ("at_s", "eval_before_s", "bookkeeping_s", "first_wait_s", "first_step_s"):
            assert _finite(p[key]) and p[key] >= 0, (key, p)
    assert [p["at_s"] for p in phases] == sorted(p["at_s"] for p in phases)
    assert not any(p["shape_change"] for p in result["runs"]["constant"]["phases"])


def test_png_table_and_run_folders_are_written(tiny):
    """A real PNG; the table printed and saved with one row per run; per-step records carry time and window_s."""
    out, result, stdout = tiny
    import matplotlib.image
    png = out / "bench_multigrid.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(str(png)).shape[:2]
    assert height > 200 and width > 300
    lines = [line for line in result["table"].splitlines() if line.startswith("|")]
    assert lines[0].startswith("| run | wall s | iterations | clips | data-wait % | peak GiB | final top-1 %")
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(bm.RUNS)
    assert result["table"] in stdout and result["table"] in (out / "bench_multigrid.md").read_text()
    for name in bm.RUNS:
        records = trainer.read_metrics(str(out / name))
        train = [r for r in records if r["kind"] == "train"]
        assert train and all(_finite(r["time"]) and _finite(r["window_s"]) for r in train)
        assert not list((out / name / "checkpoints").glob("epoch_*.pt"))  # tested, then removed


def test_timeline_takes_evaluations_out_of_the_clock():
    """Two epochs of 1 s with a 5 s evaluation and 0.5 s of bookkeeping between them: 2.5 s of training clock."""
    records = [
        {"kind": "train", "epoch": 0, "iteration": 1, "time": 101.0, "window_s": 1.0, "data_wait": 0.5,
         "batch": 2, "frames": 4, "crop": 48},
        {"kind": "val", "epoch": 1, "time": 106.0},
        {"kind": "train", "epoch": 1, "iteration": 1, "time": 107.5, "window_s": 1.0, "data_wait": 0.1,
         "batch": 2, "frames": 4, "crop": 48},
    ]
    tl = bm.timeline(records)
    first, second = tl["epochs"]
    assert (first["start"], first["end"], first["eval_s"]) == (100.0, 101.0, 5.0)
    assert second["bookkeeping_s"] == pytest.approx(0.5) and second["first_wait_s"] == pytest.approx(0.1)
    assert tl["clock"](second["end"]) == pytest.approx(2.5) and tl["clock"](first["end"]) == pytest.approx(1.0)


@pytest.mark.parametrize("argv,message", [
    (["--evals", "0"], "--evals must be at least 1, got 0"),
    (["--size", "big"], "--size 'big': expected WIDTHxHEIGHT"),
    (["--device", "tpu"], "--device tpu: use cuda (one GPU) or cpu"),
    (["--runs", "fast"], "invalid choice: 'fast'"),
])
def test_bad_options_exit_with_a_message_naming_them(argv, message, capsys):
    """Bad options stop before any data or training, naming the option and value."""
    with pytest.raises(SystemExit) as stop:
        bm.parse_args(["--tiny"] + argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the error is for machines without it")
def test_cuda_without_cuda_says_to_use_the_tiny_cpu_run(capsys):
    """The default --device cuda on a machine without CUDA says what to run instead."""
    with pytest.raises(SystemExit):
        bm.parse_args([])
    assert "CUDA is not available here; use --tiny --device cpu" in capsys.readouterr().err
