"""CharadesDataset on a real Charades-layout tree: 24 fps JPEG frame folders, an H.264 video, real CSVs.

Every frame is flat gray with a value that encodes its frame number, so the frames a clip holds can
be read back from its pixels and its targets checked against the CSV segments by hand.
"""
import csv
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import charades
from charades import PADDING, CharadesDataset, collate_test, interpolate_scores
from multigrid import ClipRequest
from test_video_io import encode_video, flat_frame, flat_number, write_jpeg_folder

CLASSES = ["c000 Holding a blob", "c001 Moving a blob", "c002 Turning a blob"]
# id, frames on disk (None: an mp4 at 12 fps with that many frames), actions, length in seconds
VIDEOS = [
    ("AAAAA", 70, "c000 0.00 1.00;c001 1.50 2.50", 70 / 24),
    ("BBBBB", 30, "c002 0.20 0.80", 30 / 24),
    ("CCCCC", 50, "", 50 / 24),
    ("DDDDD", None, "c001 0.50 2.00", 30 / 12),
]
MP4_FRAMES = 30


def write_csv(path, rows, header=charades.CSV_COLUMNS):
    """A Charades_v1 CSV with the given (id, actions, length) rows; other columns filled in."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for vid, actions, length in rows:
            full = {"id": vid, "subject": "S1", "scene": "Kitchen", "quality": "6", "relevance": "7",
                    "verified": "Yes", "script": "A, with a comma", "objects": "blob",
                    "descriptions": "x", "actions": actions, "length": f"{length:.2f}"}
            w.writerow([full[c] for c in header])


@pytest.fixture(scope="module")
def ch(tmp_path_factory):
    """The tree: Charades_v1_rgb/<id>/<id>-NNNNNN.jpg (and DDDDD.mp4), train CSV, class list."""
    base = tmp_path_factory.mktemp("charades")
    root = base / "Charades_v1_rgb"
    root.mkdir()
    for vid, frames, _, _ in VIDEOS:
        if frames is None:
            encode_video(root / f"{vid}.mp4", MP4_FRAMES, 64, 48, gop=6, fps=12, make=flat_frame)
        else:
            write_jpeg_folder(root / vid, frames, 64, 48, make=flat_frame, name=f"{vid}-{{:06d}}.jpg")
    write_csv(base / "train.csv", [(v, a, n) for v, _, a, n in VIDEOS])
    (base / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    videos = {v.id: v for v in charades.read_charades_csv(base / "train.csv")}
    return SimpleNamespace(base=base, root=str(root), csv=str(base / "train.csv"),
                           classes=str(base / "classes.txt"), videos=videos)


def make(ch, mode="train", annotations=None, **kwargs):
    """A CharadesDataset over the fixture tree that collects its log lines in `.lines`."""
    lines = []
    kwargs = {"frames": 8, "rate": 2, "crop": 32, "short_side": (36, 44), **kwargs}
    ds = CharadesDataset(ch.root, annotations or ch.csv, mode, classes=ch.classes, log=lines.append, **kwargs)
    ds.lines = lines
    return ds


def numbers(clip):
    """Frame numbers of a (C, T, H, W) clip of flat frames."""
    return [flat_number(clip[:, t]) for t in range(clip.shape[1])]


def expected_frame_targets(video, frames, fps):
    """(C, T) by hand from the CSV segments: class c is on at frame f if start <= f / fps <= end."""
    out = np.zeros((len(CLASSES), len(frames)), np.float32)
    for cls, start, end in video.actions:
        for t, f in enumerate(frames):
            out[cls, t] = float(start <= f / fps <= end)
    return out


def test_index_report_and_nothing_found_names_root_and_expected_path(ch, tmp_path):
    ds = make(ch)
    assert len(ds) == 4 and ds.index_report == {"listed": 4, "found": 4, "missing": 0, "first_missing": []}
    assert "4 listed, 4 found" in ds.lines[0]
    csv_path = tmp_path / "other.csv"
    write_csv(csv_path, [("ZZZZZ", "", 2.0), ("AAAAA", "", 2.0)])
    part = make(ch, annotations=str(csv_path))
    assert part.index_report["missing"] == 1 and "ZZZZZ-000001.jpg" in part.lines[0]
    write_csv(csv_path, [("ZZZZZ", "", 2.0)])
    with pytest.raises(ValueError, match=r"no video of .*other\.csv found under .*Charades_v1_rgb; expected e\.g\. "
                                         r".*ZZZZZ/ZZZZZ-000001\.jpg"):
        make(ch, annotations=str(csv_path))


@pytest.mark.parametrize("row, header, message", [
    (("AAAAA", "c007 0.00 1.00", 2.0), charades.CSV_COLUMNS, r"line 2 \(video AAAAA\).*unknown class 'c007'"),
    (("AAAAA", "c001 2.00 1.00", 2.0), charades.CSV_COLUMNS, r"line 2 \(video AAAAA\).*end 1\.0 < start 2\.0"),
    (("AAAAA", "", 2.0), tuple(c for c in charades.CSV_COLUMNS if c != "actions"),
     r"line 1: missing column\(s\) actions"),
])
def test_bad_csv_raises_naming_the_file_video_and_line(ch, tmp_path, row, header, message):
    path = tmp_path / "bad.csv"
    write_csv(path, [row], header=header)
    with pytest.raises(charades.CharadesFormatError, match=message):
        make(ch, annotations=str(path))


def test_class_out_of_range_without_a_class_list_names_the_video(ch, tmp_path):
    path = tmp_path / "big.csv"
    write_csv(path, [("AAAAA", "c200 0.00 1.00", 2.0)])
    with pytest.raises(charades.CharadesFormatError, match=r"line 2 \(video AAAAA\).*class index 200 out of range for 157"):
        CharadesDataset(ch.root, str(path), "train", frames=4, rate=2, crop=32, short_side=(36, 44), log=print)


@pytest.mark.parametrize("frames, crop, max_rate", [(8, 32, 2), (4, 23, 4), (2, 16, 8), (16, 32, 2)])
def test_train_clips_obey_multigrid_requests_and_targets_match_the_csv(ch, frames, crop, max_rate):
    ds_clip, ds_frames = make(ch), make(ch, target="frames")
    rates = set()
    for seed in range(12):
        for i in range(3):  # the frame folders (24 fps)
            req = ClipRequest(i, frames, crop, max_rate, seed)
            clip, target, index, failures = ds_clip[req]
            assert clip.shape == (3, frames, crop, crop) and clip.dtype == torch.uint8
            assert (index, failures) == (i, 0) and target.dtype == torch.float32
            got = numbers(clip)
            n = VIDEOS[i][1]
            steps = set(np.diff(got).tolist()) - {0}
            if len(steps) == 1:
                rates |= steps
                assert 2 <= steps.pop() <= max_rate
            video = ch.videos[VIDEOS[i][0]]
            span = expected_frame_targets(video, range(got[0], got[-1] + 1), 24).max(1)
            assert target.tolist() == span.tolist(), (req, got)
            clip2, per_frame, _, _ = ds_frames[req]
            assert torch.equal(clip, clip2)
            assert per_frame.shape == (len(CLASSES), frames)
            valid = (per_frame[0] != PADDING).numpy()
            assert valid.any()
            by_hand = expected_frame_targets(video, got, 24)
            assert np.array_equal(per_frame.numpy()[:, valid], by_hand[:, valid])
            # padding only where the clip ran past an end: a clamped first or last frame
            pad = np.flatnonzero(~valid)
            assert all(got[t] in (0, n - 1) for t in pad)
    if max_rate > 2 and frames * max_rate < 30:
        assert len(rates) > 1  # the rate is drawn, not fixed


def test_a_clip_longer_than_the_video_pads_both_ends_and_masks_them(ch):
    ds = make(ch, target="frames", frames=32)
    _, target, _, _ = ds[ClipRequest(1, 32, 32, 2, 3)]  # 30 frames, span 63: start in [-33, 0]
    valid = (target[0] != PADDING).numpy()
    assert 0 < valid.sum() <= 15
    inside = np.flatnonzero(valid)
    assert np.array_equal(inside, np.arange(inside[0], inside[-1] + 1))


def test_same_seed_same_clip_and_the_video_file_is_stepped_at_its_own_rate(ch):
    ds = make(ch, target="frames")
    a, b = ds[ClipRequest(3, 8, 32, 4, 11)], ds[ClipRequest(3, 8, 32, 4, 11)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    got = numbers(make(ch, "val", rate=4)[3][0])  # mp4 at 12 fps: rate 4 at 24 fps = 2 source frames
    assert set(np.diff(got).tolist()) <= {2, 0}
    video = ch.videos["DDDDD"]
    _, target, _, _ = make(ch, "val", rate=4, target="frames")[3]
    valid = (target[0] != PADDING).numpy()
    assert np.array_equal(target.numpy()[:, valid], expected_frame_targets(video, got, 12)[:, valid])


def test_val_is_the_centre_clip_at_the_train_crop(ch):
    ds = make(ch, "val")
    clip, target, index, failures = ds[0]
    got = numbers(clip)
    assert clip.shape == (3, 8, 32, 32) and (index, failures) == (0, 0)
    assert got == list(range(27, 43, 2))  # 70 frames, span 15: start floor((69 - 14) / 2) = 27
    assert torch.equal(clip, ds[0][0])


@pytest.mark.parametrize("spatial", [1, 3])
def test_test_views_cover_the_video_temporal_major(ch, spatial):
    ds = make(ch, "test", target="frames", temporal_views=3, spatial_views=spatial, test_crop=40)
    views, labels, index, info = ds[0]
    assert views.shape == (3 * spatial, 3, 8, 40, 40) and views.dtype == torch.uint8
    assert labels.tolist() == [1.0, 1.0, 0.0] and index == 0
    windows = [numbers(views[k * spatial]) for k in range(3)]
    for k in range(3):
        for j in range(spatial):
            assert numbers(views[k * spatial + j]) == windows[k]
    assert windows[0][0] == 0 and windows[-1][-1] == 69  # PySlowFast Charades: first and last views touch the ends
    assert np.allclose(info["times"], np.array(windows) / 24) and info["num_frames"] == 70
    short = ds[1][3]  # 30 frames, span 15: fits, no padding
    assert np.isfinite(short["times"]).all()
    classify = make(ch, "test", temporal_views=2, spatial_views=1)
    assert len(classify[2]) == 3 and classify[2][1].tolist() == [0.0, 0.0, 0.0]


def test_missing_frames_name_video_line_and_file_and_are_replaced_in_training(ch, tmp_path):
    root = tmp_path / "Charades_v1_rgb"
    shutil.copytree(ch.root, root)
    os.remove(root / "BBBBB" / "BBBBB-000007.jpg")
    os.remove(root / "BBBBB" / "BBBBB-000009.jpg")
    lines = []
    ds = CharadesDataset(str(root), ch.csv, "train", classes=ch.classes, frames=4, rate=2, crop=32,
                         short_side=(36, 44), log=lines.append)
    clip, target, index, failures = ds[ClipRequest(1, 4, 32, 2, 0)]
    assert failures == 1 and index != 1 and clip.shape == (3, 4, 32, 32)
    assert any("BBBBB-000007.jpg (2 of 30 frames missing)" in m and "line 3 (video BBBBB)" in m for m in lines), lines
    test_lines = []
    test = CharadesDataset(str(root), ch.csv, "test", classes=ch.classes, frames=4, rate=2, crop=32,
                           temporal_views=2, spatial_views=1, log=test_lines.append)
    assert test[1][0] is None and "BBBBB-000007.jpg" in test_lines[-1]
    views, labels, indices, failed = collate_test([test[0], test[1], test[2]])
    assert failed == [1] and indices.tolist() == [0, 2] and views.shape[:2] == (2, 2)
    assert labels.shape == (2, 3) and labels.dtype == torch.float32


def test_too_many_failures_in_a_row_raise_naming_the_paths(ch, tmp_path):
    root = tmp_path / "Charades_v1_rgb"
    (root / "AAAAA").mkdir(parents=True)
    (root / "AAAAA" / "AAAAA-000002.jpg").write_bytes(b"x")
    csv_path = tmp_path / "one.csv"
    write_csv(csv_path, [("AAAAA", "", 2.0)])
    ds = CharadesDataset(str(root), str(csv_path), "train", frames=4, rate=2, crop=32, short_side=(36, 44),
                         max_retries=3, log=lambda m: None)
    with pytest.raises(RuntimeError, match=r"3 videos in a row failed.*AAAAA-000001\.jpg"):
        ds[ClipRequest(0, 4, 32, 2, 0)]


def test_collate_test_keeps_the_localization_infos(ch):
    ds = make(ch, "test", target="frames", temporal_views=2, spatial_views=1)
    views, labels, indices, failed, infos = collate_test([ds[0], ds[2]])
    assert views.shape == (2, 2, 3, 8, 32, 32) and failed == [] and indices.tolist() == [0, 2]
    assert [i["num_frames"] for i in infos] == [70, 50]


def test_interpolate_scores_averages_equal_times_and_holds_the_ends():
    times = np.array([[0.0, 1.0, np.nan], [1.0, 2.0, 3.0]])
    flat = np.array([[0.0, 1.0, 9.0, 3.0, 5.0, 7.0]])  # class 0 at times 0, 1, nan, 1, 2, 3
    got = interpolate_scores(times.reshape(-1), flat, [-1.0, 0.5, 1.0, 2.5, 5.0])
    # at t=1 the two outputs 1.0 and 3.0 average to 2.0
    assert got.shape == (5, 1) and got[:, 0].tolist() == [0.0, 1.0, 2.0, 6.0, 7.0]
