"""frame_store and prepare_videos --frame-store on real H.264 files, real JPEG folders, a real SIGKILL."""
import csv
import os
import signal
import struct
import subprocess
import sys
import time
from fractions import Fraction

import av
import numpy as np
import pytest
import simplejpeg
import torch

import frame_store
import prepare_videos as pv
import transforms as T
from charades import CharadesDataset
from kinetics_multigrid import KineticsDataset
from multigrid import ClipRequest
from test_video_io import coded_frame, decoded_number, encode_video, flat_frame, flat_number, write_jpeg_folder
from video_io import VideoDecodeError, VideoFile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_vfr(path, pts, width=96, height=72):
    """An H.264 mp4 whose frame k is coded_frame(k) shown at time pts[k] / 30 s (gaps: variable rate)."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "16", "preset": "ultrafast"}
        for k, p in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(coded_frame(k, width, height), format="rgb24")
            frame.pts, frame.time_base = p, Fraction(1, 30)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return str(path)


def quiet(*_):
    """A dataset log that drops its lines."""


@pytest.mark.parametrize("pts, short_side", [([0, 1, 2, 4, 5, 8, 9, 10, 13, 14, 15, 16], 72),  # gaps, no resize
                                             (list(range(9)), 48)])  # short, resized
def test_store_frames_follow_presentation_time_and_decode_bit_exact(tmp_path, pts, short_side):
    src = write_vfr(tmp_path / "v.mp4", pts)
    path = tmp_path / "v.frames"
    assert frame_store.write_store(src, str(path), short_side=short_side)[0] == len(pts)
    with VideoFile(src) as video, frame_store.FrameStore(path) as store:
        assert (store.num_frames, store.fps) == (video.num_frames, video.fps)
        wanted = list(range(video.num_frames + 3))  # past the end: as the video path pads
        source, stored = video.read(wanted), store.read(wanted)
        expected = T.resize(source, short_side, short_side * 4 // 3)
        assert stored.shape == expected.shape
        for i in wanted:
            data = store.frame_bytes(min(i, store.num_frames))  # one stored frame past the end
            assert data == frame_store.encode_frame(expected[i].numpy(), frame_store.DEFAULT_QUALITY)
            assert torch.equal(stored[i], torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB", fastupsample=True)))
        if short_side == 72:
            assert [decoded_number(f) for f in stored] == [decoded_number(f) for f in source]
            assert len({decoded_number(f) for f in source}) < len(wanted)  # the gaps repeat frames


def test_a_large_source_is_shrunk_for_the_full_level_not_for_the_small_copy(tmp_path):
    src = encode_video(tmp_path / "big.mp4", 3, 640, 480, gop=250)
    with VideoFile(src) as video:
        full = video.read(range(4))
        for indices, levels in frame_store._chunks(video, [(341, 256), (213, 160)]):
            assert indices == [0, 1, 2, 3]
            # a 2x shrink in the decoder (320x240) keeps >= 160 but would upscale to 256: never taken
            assert torch.equal(levels[0], T.resize(full, 256, 341))
            assert torch.equal(levels[1], T.resize(full, 160, 213))


def test_smaller_reads_never_go_below_the_asked_short_side(tmp_path):
    src = encode_video(tmp_path / "v.mp4", 6, 340, 256, gop=250)
    path = str(tmp_path / "v.frames")
    frame_store.write_store(src, path, small_side=160)
    with frame_store.FrameStore(path) as store:
        assert store.sizes == [(340, 256), (212, 160)]
        shapes = {side: tuple(store.read([1, 2], min_short_side=side).shape[1:3]) for side in (None, 200, 160, 128, 80)}
        assert shapes == {None: (256, 340), 200: (256, 340), 160: (160, 212), 128: (160, 212), 80: (80, 106)}
        assert store.verify() is None


@pytest.fixture(scope="module")
def kinetics_pair(tmp_path_factory):
    """A Kinetics tree (mp4s, a JPEG folder) and its frame store made by prepare_videos --frame-store."""
    base = tmp_path_factory.mktemp("pair")
    root, store = base / "train", base / "store"
    encode_video((root / "a").mkdir(parents=True) or root / "a" / "aaa_000000_000010.mp4", 40, 96, 72, gop=250)
    encode_video(root / "a" / "bbb_000000_000010.mp4", 12, 96, 72, gop=5)
    write_jpeg_folder(root / "b" / "ccc_000000_000010", 25, 96, 72)
    code = pv.main([str(root), "--frame-store", str(store), "--workers", "1", "--no-progress"])
    assert code == 0
    return root, store


def test_a_clip_request_draws_the_same_frames_box_and_flip_from_store_and_source(kinetics_pair):
    root, store = kinetics_pair
    options = dict(frames=8, rate=4, crop=64, short_side=(72, 90), frame_fps=30, log=quiet)
    source = KineticsDataset(str(root), str(root / "annotations" / "train.csv"), **options)
    stored = KineticsDataset(str(store), str(store / "annotations" / "train.csv"), **options)
    assert [os.path.basename(stored.path(i)) for i in range(3)] == \
        ["aaa_000000_000010.frames", "bbb_000000_000010.frames", "ccc_000000_000010.frames"]
    flips = set()
    for seed in range(30):
        request = ClipRequest(seed % 3, (2, 4, 8)[seed % 3], (32, 45, 64)[seed // 3 % 3], 8 * 4 // (2, 4, 8)[seed % 3],
                              seed)
        (idx_a, plan_a), (idx_b, plan_b) = source.plan(request), stored.plan(request)
        assert torch.equal(idx_a, idx_b) and plan_a == plan_b
        flips.add(plan_a.flip)
        a, b = source[request][0], stored[request][0]
        assert a.shape == b.shape and (a.float() - b.float()).abs().mean() < 2.5
    assert flips == {True, False}


def test_charades_reads_a_flat_store_like_its_frame_folders(tmp_path):
    frames_root = tmp_path / "Charades_v1_rgb"
    for vid, count in (("AAAAA", 50), ("BBBBB", 20)):
        write_jpeg_folder(frames_root / vid, count, 64, 48, make=flat_frame, name=f"{vid}-{{:06d}}.jpg")
    with open(tmp_path / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
                         "descriptions", "actions", "length"])
        writer.writerow(["AAAAA", "S", "K", "6", "7", "Yes", "x", "o", "d", "c000 0.00 1.00;c001 1.20 2.00", "2.08"])
        writer.writerow(["BBBBB", "S", "K", "6", "7", "Yes", "x", "o", "d", "c001 0.10 0.50", "0.83"])
    store = tmp_path / "store"
    assert pv.main([str(frames_root), "--frame-store", str(store), "--frame-fps", "24", "--workers", "2",
                    "--no-progress"]) == 0
    assert sorted(os.listdir(store)) == ["AAAAA.frames", "BBBBB.frames", "bad_videos.txt"]
    options = dict(frames=8, rate=2, crop=32, short_side=(36, 44), log=quiet)
    a = CharadesDataset(str(frames_root), str(tmp_path / "train.csv"), **options)
    b = CharadesDataset(str(store), str(tmp_path / "train.csv"), **options)
    for seed in range(8):
        request = ClipRequest(seed % 2, 8, 32, 4, seed)
        (clip_a, target_a, *_), (clip_b, target_b, *_) = a[request], b[request]
        assert [flat_number(clip_a[:, t]) for t in range(8)] == [flat_number(clip_b[:, t]) for t in range(8)]
        assert torch.equal(target_a, target_b)


def test_training_decodes_no_larger_than_the_drawn_short_side(tmp_path):
    root = tmp_path / "k"
    encode_video((root / "a").mkdir(parents=True) or root / "a" / "aaa_000000_000010.mp4", 20, 340, 256, gop=250)
    pv.main([str(root), "--frame-store", str(tmp_path / "s"), "--workers", "1", "--no-progress"])
    ds = KineticsDataset(str(tmp_path / "s"), str(root / "annotations" / "train.csv"), frames=4, rate=2, crop=80,
                         short_side=(91, 228), log=quiet)
    halves = windows = 0
    for seed in range(12):
        request = ClipRequest(0, 4, 80, 2, seed)
        indices, plan = ds.plan(request)
        frames, read_plan = ds._decode(0, 4, 80, 2, torch.Generator().manual_seed(seed))
        y, x, height, width = read_plan.window  # where the decoded part sits in the frame decoded whole
        assert min(height, width) >= plan.short_side  # a proper downscale, never an upscale
        halves += height == 128
        windows += frames.shape[1:3] != (height, width)
        clip = ds[request][0]
        with frame_store.FrameStore(ds.path(0)) as store:
            same_scale = T.apply_train_crop(store.read(indices, min_short_side=plan.short_side), plan, 80)
            full = T.apply_train_crop(store.read(indices), plan, 80)
        assert torch.equal(clip, same_scale)  # decoding part of each frame changes no pixel
        assert (clip.float() - full.float()).abs().mean() < 3
    assert 0 < halves < 12  # short sides <= 128 were decoded at half scale, larger ones at full
    assert windows == 12  # every clip decoded only the MCUs around its crop box


def test_a_truncated_or_foreign_store_is_a_counted_skip_naming_the_file(kinetics_pair, tmp_path):
    _, store = kinetics_pair
    good = store / "a" / "aaa_000000_000010.frames"
    data = good.read_bytes()
    root = tmp_path / "bad"
    (root / "a").mkdir(parents=True)
    (root / "a" / "aaa_000000_000010.frames").write_bytes(data[: len(data) - 500])
    (root / "a" / "bbb_000000_000010.frames").write_bytes(b"not a store" * 50)
    (root / "a" / "ccc_000000_000010.frames").write_bytes(data)
    with pytest.raises(VideoDecodeError, match="truncated"):
        frame_store.FrameStore(root / "a" / "aaa_000000_000010.frames")
    (tmp_path / "short.frames").write_bytes(data[:10])  # cut inside the header
    with pytest.raises(VideoDecodeError, match=r"short\.frames.*truncated \(header"):
        frame_store.FrameStore(tmp_path / "short.frames")
    (root / "list.txt").write_text("a/aaa_000000_000010.frames 0\na/bbb_000000_000010.frames 0\n"
                                   "a/ccc_000000_000010.frames 0\n")
    lines = []
    ds = KineticsDataset(str(root), str(root / "list.txt"), frames=4, crop=32, short_side=(40, 48), log=lines.append)
    for bad in (0, 1):
        clip, _, index, failures = ds[ClipRequest(bad, 4, 32, 5, 0)]
        assert index != bad and failures >= 1
        assert any(ds.path(bad) in line and "replacing" in line for line in lines)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, one byte changed
    (root / "a" / "ccc_000000_000010.frames").write_bytes(bytes(flipped))
    with frame_store.FrameStore(root / "a" / "ccc_000000_000010.frames") as damaged:
        assert "checksum" in damaged.verify()
    # An index whose offsets point past the file's end: every frame that uses one says so when read.
    with frame_store.FrameStore(good) as store:
        levels, count = len(store.sizes), store.num_frames
    at = frame_store._HEAD.size + 8 * levels  # level 0's offsets: frames 0..count, then the level's end
    past = struct.unpack_from("<Q", data, at + 8 * (count + 1))[0] + 1
    damaged_index = bytearray(data)
    for k in range(1, count + 1):
        struct.pack_into("<Q", damaged_index, at + 8 * k, past)
    (root / "a" / "ccc_000000_000010.frames").write_bytes(bytes(damaged_index))
    with frame_store.FrameStore(root / "a" / "ccc_000000_000010.frames") as damaged:
        for frame in (0, 1, count - 1):
            with pytest.raises(VideoDecodeError, match="offsets out of order"):
                damaged.read([frame])


def _make_sources(root, count):
    """`count` mp4s of 340x256, 60 frames, in two label folders; returns their store paths (relative)."""
    for i in range(count):
        encode_video((root / f"l{i % 2}").mkdir(parents=True, exist_ok=True) or root / f"l{i % 2}" / f"v{i}.mp4",
                     60, 340, 256, gop=250)
    return sorted(f"l{i % 2}/v{i}.frames" for i in range(count))


def test_a_killed_preparation_resumes_keeping_finished_files(tmp_path):
    root, out = tmp_path / "src", tmp_path / "out"
    expected = _make_sources(root, 8)
    command = [sys.executable, os.path.join(REPO, "prepare_videos.py"), str(root), "--frame-store", str(out),
               "--workers", "1", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 60
    done = []
    while time.time() < deadline and len(done) < 2 and process.poll() is None:
        done = [p for p in expected if (out / p).exists()]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = [p for p in expected if (out / p).exists()]
    assert 2 <= len(done) < len(expected), "the kill must land mid-way"
    stamps = {p: os.stat(out / p).st_mtime_ns for p in done}
    for p in done:  # what the kill left is complete, never partial
        with frame_store.FrameStore(out / p) as store:
            assert store.verify() is None and store.num_frames == 60
    (out / "l0" / ".v9.frames.partial-12345").write_bytes(b"left by a killed run")
    torn = expected[-1]
    (out / torn).parent.mkdir(exist_ok=True)
    (out / torn).write_bytes((out / done[0]).read_bytes()[:-100])  # e.g. a torn copy: must be redone
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert f"{len(expected) - len(done)} written, {len(done)} already done, 0 unreadable" in result.stdout
    assert {p: os.stat(out / p).st_mtime_ns for p in done} == stamps
    assert not [n for _, _, names in os.walk(out) for n in names if pv.PARTIAL_TAG in n]
    with frame_store.FrameStore(out / torn) as store:
        assert store.verify() is None


def test_unreadable_sources_are_named_and_others_converted(tmp_path, capsys):
    root = tmp_path / "src"
    encode_video((root / "a").mkdir(parents=True) or root / "a" / "good.mp4", 10, 64, 48, gop=250)
    (root / "a" / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    write_jpeg_folder(root / "b" / "frames", 6, 64, 48)
    assert pv.main([str(root), "--frame-store", str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 1
    assert "UNREADABLE " + str(root / "a" / "garbage.mp4") in capsys.readouterr().err
    assert (tmp_path / "out" / "bad_videos.txt").read_text().startswith("a/garbage.mp4\t")
    assert (tmp_path / "out" / "annotations" / "train.txt").read_text().splitlines() == \
        ["a/good.frames 0", "b/frames.frames 1"]
    with frame_store.FrameStore(tmp_path / "out" / "b" / "frames.frames") as store:
        assert (store.num_frames, store.fps) == (6, 30.0)


def test_val_and_test_views_from_the_store_match_the_source(kinetics_pair):
    root, store = kinetics_pair
    for mode in ("val", "test"):
        options = dict(frames=4, rate=4, crop=64, short_side=(72, 90), test_crop=72, temporal_views=2, log=quiet)
        source = KineticsDataset(str(root), str(root / "annotations" / "train.csv"), mode, **options)
        stored = KineticsDataset(str(store), str(store / "annotations" / "train.csv"), mode, **options)
        for index in range(3):
            a, b = source[index][0], stored[index][0]
            assert a.shape == b.shape and (a.float() - b.float()).abs().mean() < 2.5
