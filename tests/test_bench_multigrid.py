"""bench/bench_multigrid.py: the tiny CPU run trains both runs with the real trainer and writes a well-formed JSON, PNG and table.

It checks the machinery, not the speed: the numbers of a 2-epoch X3D-XS run on 36 videos mean nothing.
The same seed run again is skipped, other options in its folder are refused, and the summary over
seeds is checked on that seed's real result with two more seeds derived from it.
"""
import copy
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
import synthetic_data
import train_x3d_kinetics_multigrid as kinetics
import trainer

RUN_KEYS = ("returncode", "process_s", "wall_s", "wall_with_evals_s", "evals_s", "epochs", "iterations", "clips",
            "data_wait", "peak_gpu_mem_gb", "peak_rss_mib", "peak_worker_rss_mib", "final_top1", "evaluations",
            "phases", "epoch_starts", "reach_s", "reach_ratio", "eval_gap_max_s", "flags", "settings")


def _bench(root, *extra):
    """Run the tiny bench in a subprocess on root/out and root/data; the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(BENCH, "bench_multigrid.py"), "--tiny", "--device", "cpu",
                           "--out-dir", str(root / "out"), "--data", str(root / "data"), *extra],
                          capture_output=True, text=True, timeout=600, env=env, check=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(out dir, seed 0's JSON result, stdout) of one `--tiny --device cpu` run in a subprocess."""
    root = tmp_path_factory.mktemp("bench_multigrid")
    done = _bench(root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = root / "out"
    return out, json.loads((out / "seed_0" / "bench_multigrid.json").read_text()), done.stdout


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
        # ru_maxrss of a process that imported torch and trained, and of its one loader worker
        assert 100 < run["peak_rss_mib"] < 8192 and 10 < run["peak_worker_rss_mib"] < 8192, name
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
        evals = run["evaluations"]  # --eval-period 1: a tested checkpoint after every epoch but the last
        assert [e["epoch"] for e in evals] == list(range(1, run["epochs"] + 1)), evals
        assert evals[0]["source"].startswith("epoch_") and evals[-1]["source"] == "final test", evals
        gaps = [b - a for a, b in zip([0.0] + [e["wall_s"] for e in evals], [e["wall_s"] for e in evals])]
        assert run["eval_gap_max_s"] == pytest.approx(max(gaps))
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


def test_both_runs_read_the_frame_store_by_default(tiny):
    """--source store (the default): every video has its .frames file and both runs train and validate from them."""
    out, result, _ = tiny
    store = out.parent / "data_store"
    for split in ("train", "val"):
        videos = sorted(p.stem for p in (out.parent / "data" / split).rglob("*.mp4"))
        assert videos and videos == sorted(p.stem for p in (store / split).rglob("*.frames")), split
    for name in bm.RUNS:
        flags = result["runs"][name]["flags"]
        assert flags[flags.index("--train-root") + 1] == str(store / "train")
        assert flags[flags.index("--val-root") + 1] == str(store / "val")
    assert result["settings"]["source"] == "store"
    assert "read from frame store files" in (out / "seed_0" / "bench_multigrid.md").read_text()


def test_video_the_store_cannot_convert_is_named(tmp_path, capsys):
    """A generated video that no longer decodes stops --source store with exit 2, naming the file and the way out."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split / "growing").mkdir(parents=True)
        (data / split / "growing" / f"{split}_000000_000002.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    args = bm.parse_args(["--tiny", "--data", str(data)])
    with pytest.raises(SystemExit) as stop:
        bm.make_store(args, {"train_root": str(data / "train"), "val_root": str(data / "val")})
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert f"frame store {tmp_path / 'data_store' / 'train'}: 1 of 1 videos under {data / 'train'}" in err
    assert "growing/train_000000_000002.mp4" in err and f"delete {data} to generate it again" in err


def test_png_table_and_run_folders_are_written(tiny):
    """A real PNG; the table printed and saved with one row per run; per-step records carry time and window_s."""
    out, result, stdout = tiny
    import matplotlib.image
    png = out / "bench_multigrid.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(str(png)).shape[:2]
    assert height > 200 and width > 300
    lines = [line for line in result["table"].splitlines() if line.startswith("|")]
    assert lines[0].startswith("| run | seeds | wall s | iterations | clips | data-wait % | peak RSS MiB | "
                               "worker RSS MiB | peak GPU GiB | final top-1 %")
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(bm.RUNS)
    constant_row = [cell.strip() for cell in lines[2].split("|")[1:-1]]
    assert constant_row[1] == "1" and constant_row[2] == f"{result['runs']['constant']['wall_s']:.1f}"
    assert result["table"] in stdout and result["table"] in (out / "seed_0" / "bench_multigrid.md").read_text()
    for name in bm.RUNS:
        records = trainer.read_metrics(str(out / "seed_0" / name))
        train = [r for r in records if r["kind"] == "train"]
        assert train and all(_finite(r["time"]) and _finite(r["window_s"]) for r in train)
        assert not list((out / "seed_0" / name / "checkpoints").glob("epoch_*.pt"))  # tested, then removed
        saved = json.loads((out / "seed_0" / name / "bench_run.json").read_text())
        assert saved["flags"] == result["runs"][name]["flags"]
    summary = json.loads((out / "bench_multigrid.json").read_text())  # the summary over the one seed
    assert summary["summary"]["seeds"] == [0] and summary["table"] == result["table"]
    assert (out / "bench_multigrid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_again_is_skipped_and_other_options_are_refused(tiny, capsys):
    """A finished seed is kept, not retrained; a call with other settings into the same folder stops, naming them."""
    out, result, _ = tiny
    argv = ["--tiny", "--device", "cpu", "--out-dir", str(out), "--data", str(out.parent / "data")]
    before = {name: (out / "seed_0" / name / "bench_run.json").read_text() for name in bm.RUNS}
    assert bm.main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("is already measured in") == 2 and ": training" not in stdout
    assert {name: (out / "seed_0" / name / "bench_run.json").read_text() for name in bm.RUNS} == before
    assert json.loads((out / "seed_0" / "bench_multigrid.json").read_text())["table"] == result["table"]
    with pytest.raises(SystemExit) as stop:
        bm.main(argv + ["--seed", "1", "--max-epoch", "3", "--steps", "0,2"])
    assert stop.value.code == 2
    assert "was measured with other settings: max_epoch=2 (now 3), steps='0,1' (now '0,2')" in capsys.readouterr().err
    assert not (out / "seed_1").exists()
    for name in bm.RUNS:  # runs saved before a setting existed count as its old behaviour
        path = out / "seed_0" / name / "bench_run.json"
        run = json.loads(path.read_text())
        del run["settings"]["constant_batch"]
        path.write_text(json.dumps(run))
    assert bm.main(argv) == 0 and capsys.readouterr().out.count("is already measured in") == 2
    with pytest.raises(SystemExit):
        bm.main(argv + ["--seed", "1", "--constant-batch"])
    assert "other settings: constant_batch=False (now True)" in capsys.readouterr().err
    for name, text in before.items():
        (out / "seed_0" / name / "bench_run.json").write_text(text)


def test_summary_over_seeds_takes_median_and_range(tiny, tmp_path):
    """Three seeds (the real seed 0 and two derived from it): medians and ranges in the JSON, table and picture."""
    _, result, _ = tiny
    shifts = {0: 0.0, 1: 10.0, 2: -4.0}
    for seed, shift in shifts.items():
        derived = copy.deepcopy(result)
        derived["settings"]["seed"] = seed
        for run in derived["runs"].values():
            run["wall_s"] += shift
            for e in run["evaluations"]:
                e["wall_s"] += shift
        derived["runs"]["multigrid"]["reach_s"] = None if seed == 2 else 5.0 + shift
        (tmp_path / f"seed_{seed}").mkdir()
        (tmp_path / f"seed_{seed}" / "bench_multigrid.json").write_text(json.dumps(derived))
    assert bm.write_summary(str(tmp_path)) == 0
    summary = json.loads((tmp_path / "bench_multigrid.json").read_text())["summary"]
    assert summary["seeds"] == [0, 1, 2]
    wall = summary["runs"]["constant"]["wall_s"]
    base = result["runs"]["constant"]["wall_s"]
    assert (wall["median"], wall["min"], wall["max"]) == pytest.approx((base, base - 4, base + 10))
    reach = summary["runs"]["multigrid"]["reach_s"]  # not reached ranks above every time
    assert (reach["median"], reach["min"], reach["max"], reach["missing"]) == (15.0, 5.0, None, 1)
    text = (tmp_path / "bench_multigrid.md").read_text()
    assert f"| constant | 3 | {base:.1f} [{base - 4:.1f}-{base + 10:.1f}] |" in text
    assert "| 15.0 [5.0-not reached] |" in text
    import matplotlib.image
    assert matplotlib.image.imread(str(tmp_path / "bench_multigrid.png")).shape[0] > 200


def test_spread_of_even_counts_and_missing_values():
    """The median of an even count is the mean of the middle two; a missing middle value makes it missing."""
    assert bm.spread([3.0, 1.0, 2.0, 10.0])["median"] == 2.5
    assert bm.spread([1.0, None])["median"] is None and bm.spread([1.0, 2.0, None])["median"] == 2.0
    assert bm.spread([])["median"] is None


def test_cpu_preset_is_the_demo_data_and_settings():
    """--cpu resolves to the demo's dataset (names, difficulty, training count, make_kinetics' defaults) with 120
    held-out videos in its own folder, the demo's model settings, BN splits of the base batch, the frame store
    and max epoch 10 with steps at 6 and 8."""
    args = bm.parse_args(["--cpu"])
    assert args.class_choice == list(kinetics.DEMO_DATASET["classes"])
    assert args.difficulty_spec == synthetic_data.DIFFICULTIES[kinetics.DEMO_DATASET["difficulty"]]
    assert (args.train_per_class, args.val_per_class) == (kinetics.DEMO_DATASET["train_per_class"], 40)
    assert (args.seconds, args.fps, args.size) == (2, 30, (128, 96))  # make_kinetics' defaults, as the demo's
    assert args.data == os.path.join(bm.ROOT, "data", "bench_multigrid_cpu")
    demo = kinetics.DEMO_SETTINGS
    assert (args.version, args.frames, args.crop, args.batch_size) == (
        demo["X3D_VERSION"], demo["FRAMES"], demo["CROP"], demo["BATCH_SIZE"])
    assert args.device == "cpu" and args.eval_period == 1 and args.short_cycle is demo["SHORT_CYCLE"] is False
    assert args.bn_base_size == args.batch_size and args.source == "store"
    assert (args.max_epoch, args.steps) == (10, "0,6,8")


def test_short_cycle_switch_reaches_the_multigrid_plan():
    """--no-short-cycle: the Multigrid run's phases have one shape each; the constant run is unchanged."""
    paths = {"train_root": "t", "train_csv": "t.csv", "val_root": "v", "val_csv": "v.csv", "classes": "c.txt"}
    for short in (True, False):
        args = bm.parse_args(["--cpu", "--short-cycle" if short else "--no-short-cycle"])
        flags = bm.common_flags(args, paths)
        mg = bm.plan_of(bm.run_argv(args, flags, "multigrid"))
        assert mg.short_cycle is short and all(len(p.shapes) == (3 if short else 1) for p in mg.phases)
        assert bm.run_argv(args, flags, "multigrid")[-4:] == ["--eval-period", "1", "--checkpoint-period", "1"]
        constant = bm.plan_of(bm.run_argv(args, flags, "constant"))
        assert not constant.long_cycle and not constant.short_cycle and constant.max_epoch == args.max_epoch


def test_constant_batch_switch_reaches_the_multigrid_plan_only():
    """--constant-batch: the trainer's plan keeps the long cycle's phases at the base batch; the constant run
    gets no such flag."""
    paths = {"train_root": "t", "train_csv": "t.csv", "val_root": "v", "val_csv": "v.csv", "classes": "c.txt"}
    args = bm.parse_args(["--cpu", "--constant-batch"])
    flags = bm.common_flags(args, paths)
    scaled = bm.plan_of(bm.run_argv(bm.parse_args(["--cpu"]), flags, "multigrid"))
    mg = bm.plan_of(bm.run_argv(args, flags, "multigrid"))
    assert mg.constant_batch and [p.end_epoch for p in mg.phases] == [p.end_epoch for p in scaled.phases]
    assert {p.per_gpu_batch for p in mg.phases} == {args.batch_size} != {p.per_gpu_batch for p in scaled.phases}
    assert "--constant-batch" not in bm.run_argv(args, flags, "constant")


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
    (["--eval-period", "-1"], "--eval-period must be 0 (from --evals) or a number of epochs, got -1"),
    (["--classes", "moving right,jumping"], "(['jumping'] unknown)"),
    (["--difficulty", "demo,blur=2"], "difficulty override 'blur=2': expected field=value"),
    (["--tiny", "--cpu"], "not allowed with argument"),
    (["--source", "jpeg"], "--source jpeg: use one of store, mp4"),
])
def test_bad_options_exit_with_a_message_naming_them(argv, message, capsys):
    """Bad options stop before any data or training, naming the option and value."""
    with pytest.raises(SystemExit) as stop:
        bm.parse_args(["--tiny"] + argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the error is for machines without it")
def test_cuda_without_cuda_says_to_use_a_cpu_run(capsys):
    """The default --device cuda on a machine without CUDA says what to run instead."""
    with pytest.raises(SystemExit):
        bm.parse_args([])
    assert "CUDA is not available here; use --cpu (or --tiny) for a CPU run" in capsys.readouterr().err
