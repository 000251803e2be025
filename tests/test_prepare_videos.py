"""prepare_videos (real H.264 files written and decoded with PyAV) and the bench/bench_data.py smoke run."""
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import prepare_videos as pv
from kinetics_multigrid import KineticsDataset
from video_io import read_video_frames

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numbered_frame(i, width, height):
    """Frame i: top half flat gray 20 + 3 * (i mod 75) (survives scaling and the codec), bottom half a colour ramp."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[: height // 2] = 20 + 3 * (i % 75)
    frame[height // 2:] = np.linspace(0, 255, width).astype(np.uint8)[None, :, None]
    frame[height // 2:, :, 1] = 255 - frame[height // 2:, :, 0]
    return frame


def frame_number(frame):
    """Number (mod 75) of a decoded `numbered_frame` (any size), from its top half."""
    frame = torch.as_tensor(frame).double()
    return (float(frame[2: frame.shape[0] // 2 - 2].mean()) - 20) / 3


def write_video(path, num_frames, width=96, height=64, keyframe_interval=250, faststart=False):
    """An H.264 mp4 of `numbered_frame`s at 30 fps (moov atom first with `faststart`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as out:
        stream = pv.add_h264_stream(out, 30, width, height, keyframe_interval, crf=18)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(numbered_frame(i, width, height), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame.reformat(format="yuv420p")))
        out.mux(stream.encode(None))
    return str(path)


@pytest.fixture
def tree(tmp_path):
    """Official-name videos in two label folders (one with a space) under tmp_path/root."""
    root = tmp_path / "root"
    for label, stem, frames in (("air drumming", "abc-def_GHI_000004_000014", 40),
                                ("abseiling", "x_y_z_000000_000010", 50),
                                ("abseiling", "Qq1_000010_000020", 45)):
        write_video(root / label / f"{stem}.mp4", frames)
    return root


def run_main(*argv):
    """prepare_videos.main with progress bars off."""
    return pv.main([str(a) for a in argv] + ["--no-progress"])


def test_official_names_give_a_kinetics_csv_that_loads_with_the_right_labels(tree):
    assert run_main(tree, "--workers", 1) == 0
    csv_path, classes = tree / "annotations" / "train.csv", tree / "annotations" / "classes.txt"
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "label,youtube_id,time_start,time_end,split"
    assert '"air drumming",abc-def_GHI,4,14,train' in lines
    assert classes.read_text().splitlines() == ["abseiling", "air drumming"]
    assert (tree / "annotations" / "bad_videos.txt").read_text() == ""
    ds = KineticsDataset(str(tree), str(csv_path), "train", class_list=str(classes), frames=4, rate=2, crop=32,
                         short_side=(32, 40), log=lambda *_: None)
    got = sorted((os.path.relpath(ds.path(i), tree), ds.label(i)) for i in range(len(ds)))
    assert got == [("abseiling/Qq1_000010_000020.mp4", 0), ("abseiling/x_y_z_000000_000010.mp4", 0),
                   ("air drumming/abc-def_GHI_000004_000014.mp4", 1)]


def test_other_names_give_a_path_list_with_class_indices(tmp_path):
    root = tmp_path / "root"
    write_video(root / "b class" / "clip one.mp4", 20)
    write_video(root / "a" / "two.mp4", 20)
    (root / "a" / "notes.txt").write_text("not a video")
    (root / "a" / ".two.mp4.partial-1.mp4").write_bytes(b"temporary")
    out = tmp_path / "ann"
    assert run_main(root, "--annotations", out, "--split", "val", "--no-check") == 0
    assert (out / "val.txt").read_text().splitlines() == ["a/two.mp4 0", "b class/clip one.mp4 1"]
    ds = KineticsDataset(str(root), str(out / "val.txt"), "val", class_list=str(out / "classes.txt"),
                         frames=4, rate=2, crop=32, log=lambda *_: None)
    assert [(os.path.relpath(ds.path(i), root), ds.label(i)) for i in range(2)] == \
        [("a/two.mp4", 0), ("b class/clip one.mp4", 1)]
    entries, ignored = pv.scan_tree(str(root))
    assert ignored == ["a/notes.txt"] and len(entries) == 2


def test_bad_files_are_named_with_reasons_written_and_fail_unless_dropped(tree, capsys):
    good = tree / "abseiling" / "x_y_z_000000_000010.mp4"
    (tree / "abseiling" / "garbage_000000_000010.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (tree / "abseiling" / "empty_000000_000010.mp4").write_bytes(b"")
    cut = write_video(tree / "tmp" / "cut.mp4", 90, faststart=True)  # header first, so the cut file opens
    data = open(cut, "rb").read()
    (tree / "abseiling" / "cut_000000_000010.mp4").write_bytes(data[: len(data) * 2 // 3])
    os.remove(cut)
    os.rmdir(tree / "tmp")
    assert "of the 90 it states" in pv.check_video(str(tree / "abseiling" / "cut_000000_000010.mp4"))
    assert pv.check_video(str(good)) is None

    assert run_main(tree, "--workers", 2) == 1
    bad = dict(line.split("\t") for line in (tree / "annotations" / "bad_videos.txt").read_text().splitlines())
    assert sorted(bad) == ["abseiling/cut_000000_000010.mp4", "abseiling/empty_000000_000010.mp4",
                           "abseiling/garbage_000000_000010.mp4"]
    assert "not a readable video" in bad["abseiling/garbage_000000_000010.mp4"]
    assert "BAD " + str(tree / "abseiling" / "garbage_000000_000010.mp4") in capsys.readouterr().err
    assert "garbage" in (tree / "annotations" / "train.csv").read_text()  # kept unless dropped

    assert run_main(tree, "--workers", 1, "--drop-bad") == 0
    text = (tree / "annotations" / "train.csv").read_text()
    assert "garbage" not in text and "cut" not in text and "x_y_z" in text


def test_unreadable_and_vanished_files_are_bad_files(tree):
    link = tree / "abseiling" / "gone_000000_000010.mp4"
    link.symlink_to(tree / "nowhere.mp4")
    assert pv.check_video(str(link)) == "no such file"
    if os.geteuid() != 0:  # root reads files whatever their mode
        path = tree / "abseiling" / "Qq1_000010_000020.mp4"
        path.chmod(0)
        try:
            assert pv.check_video(str(path)) == "file is not readable (permissions)"
        finally:
            path.chmod(0o644)


def test_missing_root_and_empty_tree_are_clear_errors(tmp_path, capsys):
    assert run_main(tmp_path / "nope") == 2
    assert f"video root {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty" / "label").mkdir(parents=True)
    (tmp_path / "empty" / "label" / "readme.txt").write_text("x")
    assert run_main(tmp_path / "empty") == 2
    err = capsys.readouterr().err
    assert "no video file" in err and str(tmp_path / "empty" / "<label>" / "<file>.mp4") in err
    with pytest.raises(ValueError, match="is the source root"):
        pv.reencode_tree(str(tmp_path), str(tmp_path), [])


def test_reencode_scales_down_sets_keyframes_and_keeps_every_frame_in_time(tmp_path):
    src = write_video(tmp_path / "src.mp4", 75, width=200, height=120, keyframe_interval=250)
    dst = str(tmp_path / "out" / "dst.mp4")
    assert pv.reencode_video(src, dst, short_side=64, keyframe_interval=30) == "encoded"
    with av.open(dst) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (106, 64)
        assert stream.average_rate == 30 and not container.streams.audio
        frames = list(container.decode(stream))
    assert len(frames) == 75
    assert [i for i, frame in enumerate(frames) if frame.key_frame] == [0, 30, 60]
    assert [round(frame_number(f.to_ndarray(format="rgb24"))) for f in frames] == list(range(75))
    source = read_video_frames(src, range(75)).permute(0, 3, 1, 2).float()
    expected = torch.nn.functional.interpolate(source, size=(64, 106), mode="bilinear", antialias=True)
    decoded = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in frames]).permute(0, 3, 1, 2)
    assert (decoded.float() - expected)[:, :, 4:-4, 4:-4].abs().mean() < 4  # codec + scaler error only
    # the loader seeks in the output: frame 47 is frame 47
    assert abs(frame_number(read_video_frames(dst, [47])[0]) - 47) < 0.5
    # x264 writes its settings into the stream: tune fastdecode = CAVLC and no deblocking filter
    assert re.search(rb"cabac=0 .*deblock=0:", Path(dst).read_bytes())
    # never upscaled: a 64-pixel short side stays when 256 is asked for; tune None keeps x264's defaults
    assert pv.reencode_video(dst, str(tmp_path / "same.mp4"), short_side=256, tune=None) == "encoded"
    with av.open(str(tmp_path / "same.mp4")) as container:
        assert container.streams.video[0].codec_context.height == 64
    assert re.search(rb"cabac=1 .*deblock=1:", (tmp_path / "same.mp4").read_bytes())
    assert pv.scaled_even_size(341, 255, 256) == (340, 256) and pv.scaled_even_size(640, 360, 256) == (456, 256)


@pytest.mark.parametrize("option, value, says", [("--tune", "fast", "invalid choice: 'fast'"),
                                                  ("--short-side", "0", "--short-side must be >= 1")])
def test_bad_reencode_options_stop_before_any_work(tree, capsys, option, value, says):
    with pytest.raises(SystemExit) as stopped:
        run_main(tree, "--reencode", tree.parent / "prepared", option, value)
    assert stopped.value.code == 2 and says in capsys.readouterr().err
    assert not (tree.parent / "prepared").exists()


def test_reencode_in_parallel_is_resumable(tree, capsys):
    out = tree.parent / "prepared"
    assert run_main(tree, "--reencode", out, "--short-side", 32, "--workers", 2) == 0
    assert "3 encoded, 0 already done, 0 failed" in capsys.readouterr().out
    outputs = sorted(str(p.relative_to(out)) for p in out.rglob("*.mp4"))
    assert outputs == ["abseiling/Qq1_000010_000020.mp4", "abseiling/x_y_z_000000_000010.mp4",
                       "air drumming/abc-def_GHI_000004_000014.mp4"]
    assert (out / "annotations" / "train.csv").read_text() == (tree / "annotations" / "train.csv").read_text()
    kept = out / "abseiling" / "x_y_z_000000_000010.mp4"
    mtime = kept.stat().st_mtime_ns
    broken = out / "abseiling" / "Qq1_000010_000020.mp4"
    broken.write_bytes(broken.read_bytes()[:300])  # a killed copy without the rename would look like this
    (out / "abseiling" / ".stale.mp4.partial-99.mp4").write_bytes(b"left by a killed run")
    assert run_main(tree, "--reencode", out, "--short-side", 32, "--workers", 1) == 0
    assert "1 encoded, 2 already done, 0 failed" in capsys.readouterr().out
    assert kept.stat().st_mtime_ns == mtime and pv.check_video(str(broken)) is None
    assert not list(out.rglob(".*partial*"))


def test_bench_quick_writes_a_well_formed_table(tmp_path):
    table = tmp_path / "table.md"
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_data.py"), "--quick", "--out",
                             str(table)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = table.read_text().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[0] == "task" and header[-2:] == ["ratio (cpu)", "decode-only ratio (cpu)"] and len(header) == 10
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:] if line.startswith("|")]
    assert len(rows) == 15 and all(len(row) == 10 for row in rows)
    assert {row[1] for row in rows} == {"mp4 k250", "mp4 k30", "jpeg", "jpeg 640x480", "prepared"}
    for row in rows:
        assert all(float(row[i]) > 0 for i in (2, 3, 4, 6, 7))
        for ratio, numerator in ((row[8], row[2]), (row[9], row[4])):  # the ratios are of the printed rates
            assert ratio.endswith("x") and abs(float(ratio[:-1]) - float(numerator) / float(row[6])) < 0.01
        assert row[5] == ("ours on mp4 k250" if row[1] == "prepared" else "naive")
    assert any(line.startswith("DataLoader worker") and "peak" in line for line in lines)
    assert result.stdout.startswith(lines[0])
