"""What a run that trains for days meets: kills during checkpoint writes, full disks, folders it may
not write, corrupted checkpoints, divergence, changed settings, bad flag values and bad data.

Real parts only: the real training script in a subprocess, a real SIGKILL while it writes, a real
full file system (a tmpfs mounted with a size, where the test may mount one), a real write
failure (as root a folder made immutable or covered by a read-only tmpfs, chmod 555 otherwise),
real bytes flipped and cut off in checkpoint files. Every run is a 2-class X3D-XS at 2 frames and crop 24, 4 iterations.
"""
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

import pytest
import torch

import checkpoints
import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_x3d_kinetics_multigrid.py")
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _add_corrupt_video(data, split, label, youtube_id):
    """A listed video of `label` whose file is not a video (decoding it fails)."""
    root, csv = (data["train_root"], data["train_csv"]) if split == "train" else (data["val_root"], data["val_csv"])
    with open(os.path.join(root, label, f"{youtube_id}_000000_000001.mp4"), "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 12)
    with open(csv, "a") as f:
        f.write(f'"{label}",{youtube_id},0,1,{split}\n')


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2 motion classes, 4 training videos each plus one undecodable one (replaced and counted)."""
    import synthetic_data
    paths = synthetic_data.make_kinetics(str(tmp_path_factory.mktemp("k") / "kinetics"), num_classes=2,
                                         train_per_class=4, val_per_class=1, seconds=1, size=(64, 48), seed=1)
    with open(paths["classes"]) as f:
        paths["names"] = [line.strip() for line in f if line.strip()]
    _add_corrupt_video(paths, "train", paths["names"][0], "corruptvideo")
    return paths


def args(data, log_dir, run_name, *extra, **overrides):
    """The tiny run's command line: 2 epochs of 2 iterations, a checkpoint after every iteration.

    One thread on the CPU runs the same arithmetic every time, so reruns end with identical weights
    without --deterministic (whose import of torch's compiler costs seconds per run).
    """
    flags = {
        "train-root": data["train_root"], "train-annotations": data["train_csv"],
        "val-root": data["val_root"], "val-annotations": data["val_csv"],
        "class-list": data["classes"], "x3d-version": "XS", "frames": 2, "rate": 2, "crop": 24,
        "test-crop": 24, "short-side": "26,30", "batch-size": 4, "lr-reference-batch": 4,
        "base-lr": 0.01, "steps": "0", "max-epoch": 2, "bn-base-size": 2, "workers": 0,
        "threads": 1, "log-dir": str(log_dir), "run-name": run_name, "precise-bn-batches": 0,
        "test-temporal-views": 1, "test-spatial-views": 1, "test-batch": 2, "eval-period": 0,
        "log-period": 1, "checkpoint-iters": 1, "checkpoint-period": 1, "warmup-epochs": 0,
    }
    flags.update(overrides)
    out = [sys.executable, SCRIPT, "--no-random-flip", "--no-long-cycle",
           "--no-short-cycle", *extra]
    for k, v in flags.items():
        if v is not None:
            out += [f"--{k}", str(v)]
    return out


def run(cmd):
    """Run a command to its end; the CompletedProcess."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)


def one_line_error(result, *needles):
    """Exit 2, no traceback, exactly one line on stderr, naming every needle; that line."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def state(path):
    """A checkpoint file's dict."""
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_weights_equal(a, b):
    """Every model tensor identical (max abs difference 0)."""
    a, b = state(a)["model"], state(b)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def temp_files(run_dir):
    """Leftover `*.tmp<pid>` files anywhere in a run folder."""
    return [os.path.join(dp, f) for dp, _, fs in os.walk(run_dir) for f in fs if ".tmp" in f]


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to."""
    log_dir = tmp_path_factory.mktemp("base")
    result = run(args(data, log_dir, "base"))
    assert result.returncode == 0, result.stderr[-3000:]
    return log_dir / "base"


def test_uninterrupted_run_stores_class_names_counters_and_checksums(data, baseline):
    """The checkpoint format: class names, train-set size, decode-failure counters, verified checksums."""
    final = checkpoints.load(str(baseline / "checkpoints" / "final.pt"))
    last, note = checkpoints.load(str(baseline / "checkpoints" / "last.pt"))
    assert note == "" and final[1] == ""
    assert last["class_names"] == data["names"] and last["train_samples"] == 9
    failures = last["counters"]["decode_failures"]
    assert failures >= 1  # the corrupt video was drawn at least once in 2 epochs (8 of 9 each)
    train = [r for r in trainer.read_metrics(str(baseline)) if r["kind"] == "train"]
    assert train[-1]["decode_failures"] == failures
    log = (baseline / "log.txt").read_text()
    assert f"decode failures {failures}" in log and f"{failures} decode failures replaced" in log


def _kill_while_writing(cmd, ckpt_dir, after_failures):
    """Start `cmd`; SIGKILL it while a checkpoint temp file exists, once last.pt exists and the log
    reports `after_failures` decode failures. True when the kill left a temp file behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV, cwd=ROOT)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 120
    armed = False
    while proc.poll() is None and time.time() < deadline:
        armed = armed or (any(f"decode failures {after_failures}" in line for line in lines)
                          and os.path.exists(os.path.join(ckpt_dir, "last.pt")))
        if armed and os.path.isdir(ckpt_dir) and any(".tmp" in n for n in os.listdir(ckpt_dir)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.0005)
    proc.wait()
    reader.join()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill:\n" + "".join(lines)[-3000:]
    return any(".tmp" in n for n in os.listdir(ckpt_dir))


def test_sigkill_during_checkpoint_write_resumes_to_identical_weights(data, baseline, tmp_path):
    """A kill mid-write leaves last.pt.tmp<pid>; the same command removes it, resumes with the
    decode-failure count it had, and ends with the uninterrupted run's weights and counters."""
    cmd = args(data, tmp_path, "killed")
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    for _ in range(8):  # a kill can land just after the rename: kill the same command again
        if _kill_while_writing(cmd, ckpt_dir, after_failures=1):
            break
    else:
        pytest.fail("no kill landed inside a checkpoint write in 8 tries")
    killed_at = state(ckpt_dir / "last.pt")
    assert killed_at["counters"]["decode_failures"] >= 1 and killed_at["step"] < 4
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "a write cut short" in resumed.stdout and "resumed at epoch" in resumed.stdout
    assert temp_files(tmp_path / "killed") == []
    assert_weights_equal(ckpt_dir / "final.pt", baseline / "checkpoints" / "final.pt")
    assert state(ckpt_dir / "final.pt")["counters"] == state(baseline / "checkpoints" / "final.pt")["counters"]


@contextlib.contextmanager
def tmpfs(path, size_bytes):
    """A real tmpfs of `size_bytes` mounted at `path` (skips the test where mounting is not allowed)."""
    os.makedirs(path, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True, text=True) if shutil.which("mount") else None
    if made is None or made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): "
                    + (made.stderr.strip() if made else "no mount command"))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_stops_with_one_line_and_the_same_command_resumes(data, baseline, tmp_path):
    """On a file system with room for one checkpoint, the second write fails: one line naming the
    path, the free space and the last good checkpoint, no temp file; with space back, the same
    command ends with the uninterrupted run's weights."""
    size = os.path.getsize(baseline / "checkpoints" / "last.pt")
    with tmpfs(tmp_path / "disk", int(size * 1.5) + 2_000_000) as disk:
        cmd = args(data, disk, "full")
        failed = run(cmd)
        line = one_line_error(failed, f"cannot write {disk}/full/checkpoints/last.pt",
                              "No space left on device", "MB free in",
                              "last good checkpoint: ", "epoch 0 iteration 1 (step 1)")
        assert "rerun the same command" in line
        assert temp_files(disk / "full") == []
        subprocess.run(["mount", "-o", f"remount,size={size * 8}", str(disk)], check=True)
        resumed = run(cmd)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed at epoch 0 iteration 1" in resumed.stdout
        assert_weights_equal(disk / "full" / "checkpoints" / "final.pt", baseline / "checkpoints" / "final.pt")
        assert temp_files(disk / "full") == []


def _lock(folder):
    """Make `folder` unwritable for this process for real; the command that undoes it.

    Root ignores permission bits, so as root the folder is made immutable (chattr +i) or, where
    the file system has no such flag, covered by a read-only tmpfs; otherwise it is chmod 555.
    """
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return ["chmod", "755", str(folder)]
    tries = ((["chattr", "+i", str(folder)], ["chattr", "-i", str(folder)]),
             (["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], ["umount", "-l", str(folder)]))
    errors = []
    for lock, unlock in tries:
        done = subprocess.run(lock, capture_output=True, text=True) if shutil.which(lock[0]) else None
        if done is not None and done.returncode == 0:
            return unlock
        errors.append(f"{lock[0]}: {done.stderr.strip() if done else 'not installed'}")
    pytest.skip("cannot make a folder unwritable for root here (" + "; ".join(errors) + ")")


def test_unwritable_checkpoint_folder_stops_with_one_line(data, tmp_path):
    """A checkpoint folder the run may not write into: one line naming the path and that no
    checkpoint exists yet; no temp file."""
    ckpt_dir = tmp_path / "ro" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    unlock = _lock(ckpt_dir)
    try:
        failed = run(args(data, tmp_path, "ro"))
    finally:
        subprocess.run(unlock, check=True)
    one_line_error(failed, f"cannot write {ckpt_dir}/last.pt", "MB free", "last good checkpoint: none yet",
                   "Make the folder writable")
    assert temp_files(tmp_path / "ro") == []


def _flip_bytes_in_largest_tensor(path, count=2000):
    """Overwrite `count` bytes in the middle of the largest stored tensor of a torch zip file."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(start)
        original = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in original))


def _strip_checksum(path):
    """Rewrite a checkpoint as written before checksums existed (no 'checksum' key)."""
    old = state(path)
    del old["checksum"]
    torch.save(old, path)


def test_corrupt_checkpoints_are_passed_over_for_the_newest_intact_one(data, baseline, tmp_path):
    """last.pt cut in half, bytes flipped in best.pt's and epoch_0002.pt's tensors: each is named,
    the run resumes from epoch_0001.pt (written before checksums: resumed with a note) and ends
    with the uninterrupted run's weights."""
    run_dir = tmp_path / "base"
    shutil.copytree(baseline, run_dir)
    ckpt = run_dir / "checkpoints"
    with open(ckpt / "last.pt", "r+b") as f:
        f.truncate(os.path.getsize(ckpt / "last.pt") // 2)
    _flip_bytes_in_largest_tensor(ckpt / "best.pt")
    _flip_bytes_in_largest_tensor(ckpt / "epoch_0002.pt")
    mtime = os.path.getmtime(ckpt / "epoch_0001.pt")
    _strip_checksum(ckpt / "epoch_0001.pt")
    os.utime(ckpt / "epoch_0001.pt", (mtime, mtime))
    resumed = run(args(data, tmp_path, "base"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout
    assert f"{ckpt}/last.pt cannot be read (truncated or corrupt" in out
    assert f"{ckpt}/best.pt is corrupt: the contents of 'model' do not match" in out
    assert f"{ckpt}/epoch_0002.pt is corrupt" in out
    assert f"{ckpt}/epoch_0001.pt carries no checksum" in out
    assert f"resuming from {ckpt}/epoch_0001.pt" in out and "resumed at epoch 1 iteration 0" in out
    assert_weights_equal(ckpt / "final.pt", baseline / "checkpoints" / "final.pt")


def test_checkpoint_checks_in_process(baseline, tmp_path):
    """save never writes non-finite weights; load names flipped and truncated files; old files note it."""
    good = str(tmp_path / "good.pt")
    shutil.copy(baseline / "checkpoints" / "final.pt", good)
    _flip_bytes_in_largest_tensor(good)
    with pytest.raises(checkpoints.Corrupt, match=r"good\.pt is corrupt: the contents of 'model'"):
        checkpoints.load(good)
    model = state(baseline / "checkpoints" / "final.pt")["model"]
    bad = {"model": {**model, "head.projection.bias": torch.tensor([0.0, float("nan")])}, "step": 7}
    with pytest.raises(checkpoints.NonFinite, match="nan"):
        checkpoints.save(str(tmp_path / "nan.pt"), bad)
    assert os.listdir(tmp_path) == ["good.pt"]
    old = str(tmp_path / "old.pt")
    shutil.copy(baseline / "checkpoints" / "final.pt", old)
    _strip_checksum(old)
    import x3d
    report = trainer._load(x3d.generate_model("XS", n_classes=2), old)
    assert any("carries no checksum" in n for n in report["notes"]), report
    with pytest.raises(trainer.SetupError, match=r"good\.pt is corrupt"):
        trainer._load(x3d.generate_model("XS", n_classes=2), good)


def test_checkpoint_copies_are_independent_files_of_one_state(baseline, tmp_path):
    """save(last, state, [best, epoch]) writes three whole files of the same state; the next save of
    last.pt leaves the copies as they were, and damage to one copy leaves the others intact."""
    first = state(baseline / "checkpoints" / "final.pt")
    last, best, epoch = (str(tmp_path / n) for n in ("last.pt", "best.pt", "epoch_0002.pt"))
    checkpoints.save(last, first, [best, epoch])
    contents = [open(p, "rb").read() for p in (last, best, epoch)]
    assert contents[0] == contents[1] == contents[2]
    assert len({os.stat(p).st_ino for p in (last, best, epoch)}) == 3
    checkpoints.save(last, {**first, "step": 99})
    assert checkpoints.load(last)[0]["step"] == 99
    _flip_bytes_in_largest_tensor(best)
    with pytest.raises(checkpoints.Corrupt, match=r"best\.pt is corrupt"):
        checkpoints.load(best)
    loaded, note = checkpoints.load(epoch)
    assert note == "" and loaded["step"] == first["step"] != 99
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "epoch_0002.pt", "last.pt"]


def test_divergence_stops_with_a_true_account_of_last_pt(data, tmp_path):
    """--base-lr 1e6: one line; last.pt exists only with finite weights, at the step the line names."""
    failed = run(args(data, tmp_path, "div", **{"base-lr": 1e6}))
    line = one_line_error(failed, "non-finite", "Last good checkpoint: ")
    last = tmp_path / "div" / "checkpoints" / "last.pt"
    if last.exists():
        saved = state(last)
        assert f"{last}, epoch {saved['epoch']} iteration {saved['iteration']} (step {saved['step']}), " \
               "finite weights" in line
        assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    else:
        assert "none yet" in line


def test_changed_schedule_is_refused_then_forced(data, baseline, tmp_path):
    """A rerun with another batch size and epoch count lists both and changes nothing; --force-resume
    continues the checkpoint under the new settings."""
    run_dir = tmp_path / "base"
    shutil.copytree(baseline, run_dir)
    before = sorted((p.name, p.stat().st_mtime) for p in run_dir.rglob("*"))
    code, err = _main_in_process(data, tmp_path, run_name="base", **{"batch-size": 2, "max-epoch": 3})
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for needle in ("--batch-size: checkpoint 4, now 2", "--max-epoch: checkpoint 2, now 3", "--force-resume",
                   "--run-name"):
        assert needle in err, (needle, err)
    assert sorted((p.name, p.stat().st_mtime) for p in run_dir.rglob("*")) == before
    forced = run(args(data, tmp_path, "base", "--force-resume", **{"max-epoch": 3}))
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "--force-resume: continuing" in forced.stdout and "resumed at epoch 2 iteration 0" in forced.stdout
    assert state(run_dir / "checkpoints" / "last.pt")["epoch"] == 3


def _main_in_process(data, tmp_path, *extra, run_name="refused", out=None, **overrides):
    """trainer.main of the Kinetics script in this process (for runs that stop before training or
    only evaluate): (exit code, stderr text); stdout goes to `out` when given. torch's thread count
    is restored afterwards."""
    import train_x3d_kinetics_multigrid as script
    argv = args(data, tmp_path, run_name, *extra, **overrides)[2:]
    err, threads = io.StringIO(), torch.get_num_threads()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out or io.StringIO()):
        try:
            trainer.main(script.TASK, script.CONSTANTS, argv)
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            torch.set_num_threads(threads)
    return code, err.getvalue()


@pytest.mark.parametrize("flag,value,needle", [
    ("precision", "fp8", "--precision 'fp8': choose one of fp32, bf16, fp16"),
    ("x3d-version", "xs", "--x3d-version 'xs': choose one of XS"),
    ("log-period", "0", "--log-period 0: must be a whole number >= 1"),
    ("workers", "-1", "--workers -1: must be a whole number >= 0"),
    ("threads", "-1", "--threads -1: must be a whole number >= 0"),
    ("batch-size", "0", "--batch-size 0: must be a whole number >= 1"),
    ("test-spatial-views", "2", "--test-spatial-views 2: choose one of 1, 3"),
    ("short-side", "30,26", "--short-side 30,26: must be empty or MIN,MAX"),
    ("train-root", "/nonexistent/videos", "/nonexistent/videos"),
])
def test_refused_flag_values_leave_no_run_folder(data, tmp_path, flag, value, needle):
    """Each bad value stops with exit 2 and one line naming flag and value, before any folder exists."""
    code, err = _main_in_process(data, tmp_path, **{flag: value})
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "refused").exists()


def test_header_only_csv_is_one_line(data, tmp_path):
    """A Kinetics CSV with only its header names the file; no folder is made."""
    header_only = tmp_path / "train.csv"
    header_only.write_text("label,youtube_id,time_start,time_end,split\n")
    code, err = _main_in_process(data, tmp_path, **{"train-annotations": str(header_only)})
    assert code == 2 and f"{header_only}: only a header" in err, err
    assert not (tmp_path / "refused").exists()


def test_validation_labels_map_by_name_onto_training_classes(data, baseline, tmp_path):
    """Without --class-list, a validation list holding only the second class keeps its index (1, not
    0); an unknown name is an error at start naming file and line; --eval-only and --predict use
    the names stored in the checkpoint."""
    import train_x3d_kinetics_multigrid as script
    second = data["names"][1]
    with open(data["val_csv"]) as f:
        rows = f.read().splitlines()
    subset = tmp_path / "val_subset.csv"
    subset.write_text("\n".join([rows[0]] + [r for r in rows[1:] if r.startswith(f'"{second}"')]) + "\n")
    cfg = trainer.parse_config(script.CONSTANTS, args(data, tmp_path, "labels", **{
        "val-annotations": str(subset), "class-list": None})[2:])
    train, val, test = script.build_datasets(cfg, log=lambda m: None)
    assert train.classes == data["names"] and val.classes == data["names"]
    assert [val.label(i) for i in range(len(val))] == [1] and test.label(0) == 1

    unknown = tmp_path / "val_unknown.csv"
    unknown.write_text(rows[0] + "\n" + rows[1] + '\n"jumping",abcdefghijk,0,1,val\n')
    code, err = _main_in_process(data, tmp_path, **{"val-annotations": str(unknown)})
    assert code == 2 and f"{unknown}:3: label 'jumping' is not in the training classes" in err, err
    assert not (tmp_path / "refused").exists()

    final = str(baseline / "checkpoints" / "final.pt")
    code, err = _main_in_process(data, tmp_path, "--eval-only", **{
        "checkpoint": final, "val-annotations": str(subset), "class-list": None})
    assert code == 0, err
    predictions = (tmp_path / "refused" / "eval_final" / "test_predictions.csv").read_text().splitlines()
    assert predictions[1].split(",")[1] == f'"{second}"', predictions

    video = predictions[1].split(",")[0].strip('"')
    out = io.StringIO()
    code, err = _main_in_process(data, tmp_path, out=out, **{
        "checkpoint": final, "predict": video, "class-list": None, "train-annotations": "/nonexistent.csv"})
    assert code == 0 and sorted(line.split(None, 1)[1] for line in out.getvalue().splitlines()[1:]) \
        == sorted(data["names"]), (out.getvalue(), err)


def test_videos_failing_in_a_row_stop_with_one_line(tmp_path):
    """15 of 16 training videos undecodable: stopping is right, in one line, from a loader worker."""
    import synthetic_data
    bad = synthetic_data.make_kinetics(str(tmp_path / "bad"), num_classes=1, train_per_class=1,
                                       val_per_class=1, seconds=1, size=(64, 48), seed=3)
    with open(bad["classes"]) as f:
        label = f.read().split("\n")[0].strip()
    for i in range(15):
        _add_corrupt_video(bad, "train", label, f"broken{i:05d}xx")
    failed = run(args(bad, tmp_path, "bad", **{"workers": 1, "class-list": None}))
    one_line_error(failed, "10 videos in a row failed to decode", "broken", "The run stopped")


def test_eval_only_of_a_corrupt_checkpoint_is_one_line_and_no_folder(data, baseline, tmp_path):
    """--eval-only verifies the checksum too: flipped bytes stop it before any folder is made."""
    flipped = tmp_path / "flipped.pt"
    shutil.copy(baseline / "checkpoints" / "final.pt", flipped)
    _flip_bytes_in_largest_tensor(flipped)
    code, err = _main_in_process(data, tmp_path, "--eval-only", checkpoint=str(flipped))
    assert code == 2 and f"{flipped} is corrupt" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "refused").exists()


def test_metrics_line_cut_short_by_a_full_disk_is_left_out(tmp_path):
    """A metrics.jsonl whose last append was cut short still reads (resume then rewrites it)."""
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st')
    assert trainer.read_metrics(str(tmp_path)) == [{"kind": "train", "step": 1}]
