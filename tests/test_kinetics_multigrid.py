"""KineticsDataset on a real Kinetics-layout tree: H.264 mp4/mkv, a JPEG frame folder, a corrupt file."""
import csv
import json
import os
from types import SimpleNamespace

import pytest
import torch

import transforms as T
from kinetics_multigrid import KineticsDataset, collate_test
from test_video_io import encode_video, flat_frame, flat_number, write_jpeg_folder

from multigrid import ClipRequest

CLASSES = ["abseiling", "playing cards", "zumba"]
# (label, youtube id, start, end, what is on disk)
VIDEOS = [
    ("abseiling", "aaa", 0, 10, "flat69"),
    ("abseiling", "bbb", 5, 15, "ramp90"),
    ("playing cards", "ccc", 1, 11, "flat10"),
    ("playing cards", "ddd", 2, 12, "jpeg40"),
    ("zumba", "eee", 3, 13, "garbage"),
    ("zumba", "fff", 4, 14, "mkv50"),
    ("zumba", "ggg", 6, 16, "missing"),
]


def ramp_frame(i, width, height):
    """A horizontal ramp 0..255 (the frame index is not needed for spatial checks)."""
    return torch.linspace(0, 255, width).to(torch.uint8).view(1, width, 1).expand(height, width, 3).numpy()


def stem(youtube_id, start, end):
    """Official clip stem."""
    return f"{youtube_id}_{start:06d}_{end:06d}"


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    """A train folder with label folders (spaces -> '_'), plus the same list as CSV, path list, JSON."""
    base = tmp_path_factory.mktemp("k400")
    root = base / "train"
    for label, vid, start, end, kind in VIDEOS:
        folder = root / label.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        name = stem(vid, start, end)
        if kind == "flat69":
            encode_video(folder / f"{name}.mp4", 69, 96, 72, gop=12, make=flat_frame)
        elif kind == "ramp90":
            encode_video(folder / f"{name}.mp4", 90, 340, 256, gop=250, make=ramp_frame)
        elif kind == "flat10":
            encode_video(folder / f"{name}.mp4", 10, 96, 72, gop=12, make=flat_frame)
        elif kind == "jpeg40":
            write_jpeg_folder(folder / name, 40, 80, 60, make=flat_frame, name=f"{name}-{{:06d}}.jpg")
        elif kind == "mkv50":
            encode_video(folder / f"{name}.mkv", 50, 96, 72, gop=25, fps=25, make=flat_frame)
        elif kind == "garbage":
            (folder / f"{name}.mp4").write_bytes(os.urandom(3000))
    with open(base / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
        for label, vid, start, end, _ in VIDEOS:
            writer.writerow([label, vid, start, end, "train"])
    with open(base / "train_list.txt", "w") as handle:
        for label, vid, start, end, kind in VIDEOS:
            ext = "" if kind == "jpeg40" else ".mkv" if kind == "mkv50" else ".mp4"
            handle.write(f"{label.replace(' ', '_')}/{stem(vid, start, end)}{ext} {CLASSES.index(label)}\n")
    entries = {vid: {"subset": "training", "annotations": {"label": label, "segment": [start, end]}}
               for label, vid, start, end, _ in VIDEOS}
    entries["zzz"] = {"subset": "validation", "annotations": {"label": "zumba", "segment": [1, 2]}}
    (base / "train.json").write_text(json.dumps(entries))
    (base / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    return SimpleNamespace(base=base, root=str(root), csv=str(base / "train.csv"),
                           list=str(base / "train_list.txt"), json=str(base / "train.json"),
                           labels=str(base / "labels.txt"))


def dataset(k, mode="train", annotations=None, **kwargs):
    """A KineticsDataset over the fixture tree that collects its log lines in `.lines`."""
    lines = []
    ds = KineticsDataset(k.root, annotations or k.csv, mode, log=lines.append, **kwargs)
    ds.lines = lines
    return ds


def index_of(ds, youtube_id):
    """Dataset index of a youtube id."""
    return next(i for i in range(len(ds)) if youtube_id in ds.path(i))


def frame_numbers(clip):
    """Frame numbers of a (C, T, H, W) clip of flat frames."""
    return [flat_number(clip[:, t]) for t in range(clip.shape[1])]


def test_annotation_formats_round_trip_to_the_same_paths_and_labels(kinetics):
    from_csv = dataset(kinetics)
    from_list = dataset(kinetics, annotations=kinetics.list, class_list=kinetics.labels)
    from_json = dataset(kinetics, annotations=kinetics.json, class_list=kinetics.labels)
    pairs = [[(ds.path(i), ds.label(i)) for i in range(len(ds))] for ds in (from_csv, from_list, from_json)]
    assert pairs[0] == pairs[1] == pairs[2] and len(pairs[0]) == 6
    assert from_csv.classes == CLASSES and from_csv.num_classes == 3
    assert [label for _, label in pairs[0]] == [0, 0, 1, 1, 2, 2]
    assert os.path.isdir(pairs[0][3][0]) and pairs[0][5][0].endswith(".mkv")
    missing = os.path.join(kinetics.root, "zumba", stem("ggg", 6, 16) + ".mp4")
    assert from_csv.index_report == {"listed": 7, "found": 6, "missing": 1, "first_missing": [missing]}
    assert "7 listed, 6 found" in from_csv.lines[0] and missing in from_csv.lines[0]
    unlabelled = kinetics.base / "test.csv"  # the official test CSV has no label column
    unlabelled.write_text("youtube_id,time_start,time_end,split\n" + "".join(
        f"{vid},{start},{end},test\n" for _, vid, start, end, _ in VIDEOS))
    test = dataset(kinetics, "test", annotations=str(unlabelled), class_list=kinetics.labels)
    assert [test.path(i) for i in range(len(test))] == [path for path, _ in pairs[0]]
    assert [test.label(i) for i in range(len(test))] == [-1] * 6 and test.classes == CLASSES
    with pytest.raises(ValueError, match=r"zumba/zzz_000001_000002\.mp4"):  # val mode: validation subset only
        dataset(kinetics, "val", annotations=kinetics.json, class_list=kinetics.labels)


def test_nothing_found_names_the_root_and_an_expected_path(kinetics, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no video .* found under .*empty.*abseiling/aaa_000000_000010\.mp4"):
        KineticsDataset(str(tmp_path / "empty"), kinetics.csv, log=lambda line: None)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        KineticsDataset(str(tmp_path / "nowhere"), kinetics.csv)


@pytest.mark.parametrize("text,classes,message", [
    ("name,id,start,end,split\nabseiling,aaa,0,10,train\n", None, r":1: header .* is not a Kinetics CSV header"),
    ("label,youtube_id,time_start,time_end,split\nabseiling,aaa,zero,10,train\n", None, r":2: time_start"),
    ("label,youtube_id,time_start,time_end,split\nabseiling,aaa,0,10,train\nskydiving,bbb,5,15,train\n",
     "abseiling\nplaying cards\nzumba\n", r"\.csv:3: label 'skydiving' is not in class list .*labels"),
    ("abseiling/aaa_000000_000010.mp4 7\n", "abseiling\nzumba\n", r"\.csv:1: label 7 outside 0\.\.1"),
    ("abseiling/aaa_000000_000010.mp4\n", None, r"\.csv:1: expected 'path label'"),
    ("\n\n", None, "empty annotation file"),
    ("abseiling/aaa_000000_000010.mp4 0\n", "abseiling\nzumba\nabseiling\n", r"labels\.txt:3: class 'abseiling' "
                                                                            r"already listed on line 1"),
])
def test_bad_annotations_raise_errors_naming_file_and_line(kinetics, tmp_path, text, classes, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    class_list = None
    if classes:
        class_list = tmp_path / "labels.txt"
        class_list.write_text(classes)
    with pytest.raises(ValueError, match=message):
        KineticsDataset(kinetics.root, str(path), class_list=class_list and str(class_list), log=lambda line: None)


def test_train_clips_have_every_multigrid_shape(kinetics):
    ds = dataset(kinetics)
    index = index_of(ds, "bbb")
    for frames in (4, 8, 16):
        for crop in (112, 158, 224):
            clip, label, got, failures = ds[ClipRequest(index, frames, crop, 5 * (16 // frames), seed=frames + crop)]
            assert clip.shape == (3, frames, crop, crop) and clip.dtype == torch.uint8 and clip.is_contiguous()
            assert (label, got, failures) == (0, index, 0)
    clip, label, got, failures = ds[1]  # a plain index: the default shape
    assert clip.shape == (3, 16, 224, 224) and (label, got, failures) == (0, 1, 0)


def test_train_rate_is_drawn_from_base_to_max_rate_and_clips_follow_the_seed(kinetics):
    ds = dataset(kinetics, frames=4, rate=5)
    index = index_of(ds, "aaa")
    rates, starts = set(), set()
    for seed in range(60):
        numbers = frame_numbers(ds[ClipRequest(index, 4, 64, 8, seed)][0])
        span = numbers[-1] - numbers[0] + 1  # linspace(start, start + span - 1, 4), span = 4 * rate
        assert span % 4 == 0 and numbers == sorted(numbers)
        rates.add(span // 4)
        starts.add(numbers[0])
    assert rates == {5, 6, 7, 8} and len(starts) > 15
    request = ClipRequest(index_of(ds, "bbb"), 4, 112, 10, 1234)
    assert torch.equal(ds[request][0], ds[request][0])
    assert not torch.equal(ds[request][0], ds[request._replace(seed=99)][0])
    assert torch.equal(ds[request][0], ds[SimpleNamespace(**request._asdict())][0])  # duck typing


def test_random_flip_off_keeps_every_clip_unmirrored(tmp_path):
    """Same requests with and without the flip: equal, or mirrored where the flip was drawn."""
    import synthetic_data
    k = synthetic_data.make_kinetics(str(tmp_path / "k"), num_classes=1, train_per_class=1,
                                     val_per_class=1, seconds=1, size=(64, 48), seed=3)
    flipping, plain = (KineticsDataset(k["train_root"], k["train_csv"], "train", frames=4, rate=2,
                                       crop=32, short_side=(48, 48), random_flip=flip,
                                       log=lambda line: None) for flip in (True, False))
    mirrored = 0
    for seed in range(12):
        request = ClipRequest(0, 4, 32, 2, seed)
        a, b = flipping[request][0], plain[request][0]
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
        mirrored += not torch.equal(a, b)
    assert 0 < mirrored < 12


def test_train_clips_do_not_depend_on_the_worker(kinetics):
    ds = dataset(kinetics, frames=4)
    requests = [ClipRequest(i, 4, 64, 10, 1000 + i) for i in (0, 1, 2, 3, 5, 1)]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=requests, num_workers=2)
    for request, (clip, label, index, failures) in zip(requests, loader):
        assert torch.equal(clip, ds[request][0]) and index == request.index


def test_frame_folder_and_mkv_clips_sample_time_at_their_frame_rate(kinetics):
    ds = dataset(kinetics, frames=4, rate=5, frame_fps=15)
    numbers = frame_numbers(ds[ClipRequest(index_of(ds, "ddd"), 4, 64, 5, 0)][0])
    assert numbers[-1] - numbers[0] + 1 == 10  # 4 x 5 frames at 30 fps = 10 frames at 15 fps
    numbers = frame_numbers(ds[ClipRequest(index_of(ds, "fff"), 4, 64, 5, 0)][0])
    assert numbers[-1] - numbers[0] in (15, 16)  # span 4 * 5 / 30 * 25 = 16.67 frames at 25 fps


def test_a_short_video_is_padded_by_repeating_its_last_frame(kinetics):
    ds = dataset(kinetics, frames=8)
    numbers = frame_numbers(ds[ClipRequest(index_of(ds, "ccc"), 8, 64, 5, 0)][0])
    assert numbers[0] == 0 and numbers == sorted(numbers) and numbers[-3:] == [9, 9, 9]


def test_a_corrupt_video_is_replaced_counted_and_logged(kinetics):
    ds = dataset(kinetics, frames=4)
    bad = index_of(ds, "eee")
    request = ClipRequest(bad, 4, 64, 5, 7)
    clip, label, index, failures = ds[request]
    assert index != bad and failures >= 1 and label == ds.label(index) and clip.shape == (3, 4, 64, 64)
    assert any(ds.path(bad) in line and "replacing" in line for line in ds.lines)
    assert ds[request][2] == index  # the replacement is drawn from the request's seed


def test_too_many_failures_in_a_row_raise_naming_the_paths(tmp_path):
    (tmp_path / "zumba").mkdir()
    for vid in ("aaa", "bbb"):
        (tmp_path / "zumba" / f"{stem(vid, 0, 10)}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    (tmp_path / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                        "zumba,aaa,0,10,train\nzumba,bbb,0,10,train\n")
    ds = KineticsDataset(str(tmp_path), str(tmp_path / "train.csv"), max_retries=3, log=lambda line: None)
    with pytest.raises(RuntimeError, match=r"3 videos in a row failed to decode: .*aaa_000000_000010\.mp4"):
        ds[ClipRequest(0, 4, 64, 5, 0)]
    with pytest.raises(ValueError, match="max_rate"):
        ds[ClipRequest(0, 4, 64, 4, 0)]
    with pytest.raises(TypeError, match="ClipRequest"):
        ds["0"]


@pytest.mark.parametrize("youtube_id, size", [("aaa", (72, 96)), ("ddd", (60, 80))])  # mp4, JPEG folder
def test_the_decode_step_alone_gives_the_source_frames_a_clip_is_cut_from(kinetics, youtube_id, size):
    ds = dataset(kinetics, frames=4, rate=5)
    index = index_of(ds, youtube_id)
    for seed in (3, 4, 5):
        frames = ds.read_frames(index, 4, 64, 10, torch.Generator().manual_seed(seed))
        assert frames.shape == (4, *size, 3) and frames.dtype == torch.uint8
        clip = ds[ClipRequest(index, 4, 64, 10, seed)][0]  # the same seed draws the same rate and window first
        assert [flat_number(frame) for frame in frames] == frame_numbers(clip)
    test = dataset(kinetics, "test", frames=4, rate=5, crop=56, short_side=(56, 60), temporal_views=3)
    frames = test.read_test_frames(index)
    views = test[index][0]
    assert frames.shape == (12, *size, 3)
    assert [flat_number(frame) for frame in frames] == [n for view in views[::3] for n in frame_numbers(view)]


def test_val_returns_the_centre_window_centre_crop(kinetics):
    ds = dataset(kinetics, "val", frames=4, rate=5, crop=64, short_side=(72, 90))
    clip, label, index, failures = ds[index_of(ds, "aaa")]
    assert clip.shape == (3, 4, 64, 64) and failures == 0 and label == 0
    assert frame_numbers(clip) == T.center_window(69, 4, 5, 30.0, 30).tolist()


def test_test_views_cover_the_video_temporal_major(kinetics):
    ds = dataset(kinetics, "test", frames=4, rate=5, crop=112, short_side=(128, 160), temporal_views=3)
    views, label, index = ds[index_of(ds, "aaa")]
    assert views.shape == (9, 3, 4, 112, 112) and views.dtype == torch.uint8 and label == 0
    windows = T.uniform_windows(69, 4, 5, 30.0, 30, 3)
    for view in range(9):
        assert frame_numbers(views[view]) == windows[view // 3].tolist()
    spatial = dataset(kinetics, "test", frames=4, rate=5, crop=160, short_side=(180, 200), temporal_views=3)
    three_views, _, _ = spatial[index_of(spatial, "bbb")]  # ramp 0..255 over 340 columns; short side 256 -> 160
    column = three_views[:, 0, 0].float().mean(dim=1)  # (V, S): mean value of each output column, channel 0, frame 0
    for view, offset in ((0, 0), (1, 26), (2, 52)):  # start / centre ceil(52 / 2) / end of the 212-wide frame
        source_x = (offset + torch.arange(160) + 0.5) * 340 / 212 - 0.5
        expected = source_x * 255 / 339 - 0.5  # the ramp was floored to uint8
        assert (column[view] - expected).abs().max() < 3  # H.264 error on this ramp is up to 2
    single = dataset(kinetics, "test", frames=4, rate=5, crop=160, short_side=(180, 200), temporal_views=2,
                     spatial_views=1)
    views, _, _ = single[index_of(single, "bbb")]
    assert views.shape == (2, 3, 4, 160, 160)
    assert torch.equal(views[0, :, 0], three_views[1, :, 0])  # same first frame, same centre crop


def test_collate_test_drops_and_reports_undecodable_videos(kinetics):
    ds = dataset(kinetics, "test", frames=4, rate=5, crop=64, short_side=(72, 90), temporal_views=2)
    bad = index_of(ds, "eee")
    views, labels, indices, failed = collate_test([ds[i] for i in range(len(ds))])
    assert failed == [bad] and views.shape == (5, 6, 3, 4, 64, 64) and views.dtype == torch.uint8
    assert indices.tolist() == [i for i in range(6) if i != bad] and labels.tolist() == [0, 0, 1, 1, 2]
    assert any(ds.path(bad) in line for line in ds.lines)
    empty = collate_test([ds[bad]])
    assert empty[0].numel() == 0 and empty[3] == [bad]


def test_absolute_paths_in_a_list_need_no_folder_scan(kinetics, tmp_path):
    video = os.path.join(kinetics.root, "abseiling", stem("aaa", 0, 10) + ".mp4")
    (tmp_path / "one.txt").write_text(f"{video} 0\n")
    ds = KineticsDataset("/", str(tmp_path / "one.txt"), "test", frames=4, crop=64, short_side=(72, 90),
                         temporal_views=1, spatial_views=1, log=lambda line: None)
    views, label, index = ds[0]
    assert ds.path(0) == video and views.shape == (1, 3, 4, 64, 64) and (label, index) == (0, 0)
