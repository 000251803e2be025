"""synthetic_data.py: real formats, determinism, manifests, visible class motion, and that the task needs time."""
import csv
import dataclasses
import json
import math
import os
import re

import av
import numpy as np
import pytest
import simplejpeg
import torch

import synthetic_data as sd

TINY_KINETICS = dict(classes=["moving left", "rotating clockwise", "growing"], train_per_class=2, val_per_class=1,
                     seconds=1, size=(64, 48), keyframe_interval=10, seed=3)
TINY_CHARADES = dict(classes=["moving up", "shrinking", "oscillating horizontally"], train_videos=5,
                     test_videos=3, seconds=(1.5, 2.5), size=(64, 48), seed=5)


def decode(path):
    """All frames of a video as uint8 (T, H, W, 3) and the keyframe flags of its packets in decode order."""
    with av.open(str(path)) as container:
        keyframes = [p.is_keyframe for p in container.demux(video=0) if p.size]
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return frames, keyframes


def tree_bytes(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = handle.read()
    return out


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    """A tiny Kinetics-format dataset."""
    return sd.make_kinetics(tmp_path_factory.mktemp("kinetics"), **TINY_KINETICS)


@pytest.fixture(scope="module")
def charades(tmp_path_factory):
    """A tiny Charades-format dataset."""
    return sd.make_charades(tmp_path_factory.mktemp("charades"), **TINY_CHARADES)


def test_kinetics_layout_csvs_and_class_list(kinetics):
    """Official folder layout, CSV header / quoting / fields, alphabetical class list, nothing else on disk."""
    classes = TINY_KINETICS["classes"]
    with open(kinetics["classes"], encoding="utf-8") as handle:
        assert handle.read().splitlines() == sorted(classes)
    listed, ids = set(), set()
    for key, split, count in (("train_csv", "train", 2), ("val_csv", "val", 1)):
        with open(kinetics[key], encoding="utf-8", newline="") as handle:
            text = handle.read()
        lines = text.splitlines()
        assert lines[0] == "label,youtube_id,time_start,time_end,split"
        assert sum(line.startswith('"moving left",') for line in lines) == count  # spaces quoted, as upstream
        assert sum(line.startswith("growing,") for line in lines) == count
        rows = list(csv.DictReader(lines))
        assert sorted(r["label"] for r in rows) == sorted(classes * count)
        for row in rows:
            assert re.fullmatch(r"[A-Za-z0-9_-]{11}", row["youtube_id"]) and row["split"] == split
            start, end = int(row["time_start"]), int(row["time_end"])
            assert end - start == TINY_KINETICS["seconds"]
            name = f"{row['youtube_id']}_{start:06d}_{end:06d}.mp4"
            path = os.path.join(kinetics[f"{split}_root"], row["label"], name)
            assert os.path.isfile(path), path
            listed.add(path)
            ids.add(row["youtube_id"])
    assert len(ids) == len(listed) == 9
    on_disk = {os.path.join(folder, f) for split in ("train_root", "val_root")
               for folder, _, files in os.walk(kinetics[split]) for f in files}
    assert on_disk == listed  # no temporaries or strays
    with open(kinetics["manifest"], encoding="utf-8") as handle:
        assert json.load(handle)["config"]["seed"] == 3


def test_kinetics_files_are_h264_with_the_requested_keyframes(kinetics):
    """The mp4s are H.264 yuv420p at the requested size and fps, with a keyframe exactly every N frames."""
    path = next(os.path.join(f, n) for f, _, names in os.walk(kinetics["train_root"]) for n in names)
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (stream.width, stream.height, stream.average_rate) == (64, 48, 30)
    frames, keyframes = decode(path)
    assert frames.shape == (30, 48, 64, 3)
    assert [i for i, key in enumerate(keyframes) if key] == [0, 10, 20]


def test_generation_is_deterministic_and_independent_of_workers(kinetics, tmp_path):
    """Same seed: identical bytes with 1 or 2 worker processes; another seed: other videos."""
    again = sd.make_kinetics(tmp_path / "again", workers=2, **TINY_KINETICS)
    assert tree_bytes(again["root"]) == tree_bytes(kinetics["root"])
    other = sd.make_kinetics(tmp_path / "other", **{**TINY_KINETICS, "seed": 4})
    first, second = tree_bytes(kinetics["root"]), tree_bytes(other["root"])
    assert not set(k for k in first if k.endswith(".mp4")) & set(k for k in second if k.endswith(".mp4"))
    spec = sd.plan_kinetics(**{k: v for k, v in TINY_KINETICS.items() if k != "keyframe_interval"},
                            difficulty=sd.DIFFICULTIES["medium"], fps=30)[0]["spec"]
    assert np.array_equal(sd.render_video(spec), sd.render_video(spec))


def test_charades_layout_csvs_and_frames(charades):
    """Charades_v1 CSV columns, ids, action segments within [0, length], 24 fps frame counts and JPEG names."""
    with open(charades["classes"], encoding="utf-8") as handle:
        assert handle.read().splitlines() == [f"c{i:03d} {n}" for i, n in enumerate(TINY_CHARADES["classes"])]
    seen = set()
    for key, count in (("train_csv", 5), ("test_csv", 3)):
        with open(charades[key], encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            assert reader.fieldnames == ["id", "subject", "scene", "quality", "relevance", "verified", "script",
                                         "objects", "descriptions", "actions", "length"]
            rows = list(reader)
        assert len(rows) == count and any(row["actions"] == "" for row in rows)
        for row in rows:
            assert re.fullmatch(r"[A-Z0-9]{5}", row["id"]) and row["id"] not in seen
            seen.add(row["id"])
            length = float(row["length"])
            for action in filter(None, row["actions"].split(";")):
                label, start, end = re.fullmatch(r"c(\d{3}) (\d+\.\d\d) (\d+\.\d\d)", action).groups()
                assert int(label) < 3 and 0.0 <= float(start) <= float(end) <= length
            folder = os.path.join(charades["frames_root"], row["id"])
            names = sorted(os.listdir(folder))
            assert names == [f"{row['id']}-{i:06d}.jpg" for i in range(1, round(length * 24) + 1)]
            with open(os.path.join(folder, names[-1]), "rb") as handle:
                assert simplejpeg.decode_jpeg(handle.read()).shape == (48, 64, 3)
    assert sorted(os.listdir(charades["frames_root"])) == sorted(seen)


def test_charades_default_plan_has_overlaps_several_actions_and_empty_videos():
    """The default Charades plan has videos with 0, 1, 2 and 3 actions and overlapping segments."""
    videos = sd.plan_charades(classes=list(sd.CLASS_POOL[:10]), train_videos=160, test_videos=40,
                              seconds=(3.0, 6.0), fps=24, size=(128, 96), difficulty=sd.DIFFICULTIES["medium"],
                              seed=0)
    counts = [len(v["actions"]) for v in videos]
    assert min(counts) == 0 and max(counts) == 3 and sum(c >= 2 for c in counts) > 40
    overlapping = sum(any(s1 < e2 and s2 < e1 for i, (_, s1, e1) in enumerate(v["actions"])
                          for _, s2, e2 in v["actions"][i + 1:]) for v in videos)
    assert overlapping > 20
    assert all(0 <= s <= e <= v["length"] and e - s >= 1.0 for v in videos for _, s, e in v["actions"])


def test_manifest_makes_a_second_call_a_no_op_resumes_refuses_and_overwrites(tmp_path):
    """No-op when complete, resume after a kill, refuse other settings unless overwrite, never touch foreign data."""
    args = dict(TINY_KINETICS, classes=["moving up"], train_per_class=2)
    paths = sd.make_kinetics(tmp_path / "d", **args)
    before = tree_bytes(paths["root"])
    stamps = {p: os.stat(os.path.join(paths["root"], p)).st_mtime_ns for p in before}
    assert sd.make_kinetics(tmp_path / "d", **args) == paths
    assert {p: os.stat(os.path.join(paths["root"], p)).st_mtime_ns for p in before} == stamps

    with pytest.raises(ValueError, match=r"different settings \(seed: 3 -> 9\).*overwrite=True"):
        sd.make_kinetics(tmp_path / "d", **{**args, "seed": 9})

    # a killed run: marker but no manifest, one video and the CSVs missing, a stray temporary file
    os.rename(paths["manifest"], os.path.join(paths["root"], "synthetic_kinetics.partial.json"))
    victim = next(p for p in before if p.endswith(".mp4"))
    os.remove(os.path.join(paths["root"], victim))
    os.remove(paths["train_csv"])
    stray = os.path.join(os.path.dirname(os.path.join(paths["root"], victim)), ".x.mp4.tmp-123")
    open(stray, "wb").close()
    sd.make_kinetics(tmp_path / "d", **args)
    assert tree_bytes(paths["root"]) == before

    sd.make_kinetics(tmp_path / "d", **{**args, "seed": 9}, overwrite=True)
    with open(paths["manifest"], encoding="utf-8") as handle:
        assert json.load(handle)["config"]["seed"] == 9
    videos = lambda tree: {p for p in tree if p.endswith(".mp4")}  # noqa: E731
    assert len(videos(before)) == 3 and not videos(before) & videos(tree_bytes(paths["root"]))

    os.makedirs(tmp_path / "real" / "train")
    with pytest.raises(ValueError, match="not a dataset this generator wrote"):
        sd.make_kinetics(tmp_path / "real", **args, overwrite=True)

    with open(paths["manifest"], "w", encoding="utf-8") as handle:
        handle.write("{")
    with pytest.raises(ValueError, match="synthetic_kinetics.json is not a valid generator manifest"):
        sd.make_kinetics(tmp_path / "d", **args)


@pytest.mark.parametrize("change, message", [
    (dict(size=(63, 48)), "both even"),
    (dict(classes=["jumping"]), "distinct names"),
    (dict(classes=None, num_classes=13), "num_classes must be in 1..12"),
    (dict(difficulty="brutal"), "unknown difficulty 'brutal'"),
    (dict(difficulty={"noise": 1.0, "blur": 2}), r"unknown difficulty field\(s\) \['blur'\]"),
    (dict(seconds=0), "seconds must be an integer >= 1"),
    (dict(seed=-1), "seed must be a non-negative integer"),
])
def test_bad_arguments_are_named(tmp_path, change, message):
    """Each bad argument is a ValueError naming it, raised before anything is written."""
    with pytest.raises(ValueError, match=message):
        sd.make_kinetics(tmp_path, **{**TINY_KINETICS, **change})
    assert not os.listdir(tmp_path)


def test_command_line_writes_and_reports_errors(tmp_path, capsys):
    """The CLI prints the paths as JSON, and exits 2 with the message on a settings clash."""
    argv = ["charades", "--out", str(tmp_path), "--num-classes", "2", "--train-videos", "1", "--test-videos", "1",
            "--min-seconds", "1", "--max-seconds", "1", "--width", "32", "--height", "32"]
    assert sd.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["frames_root"] == str(tmp_path / "Charades_v1_rgb")
    with pytest.raises(SystemExit) as exit_info:
        sd.main(argv[:-1] + ["34"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_command_line_takes_class_names_and_difficulty_overrides(tmp_path, capsys):
    """--classes names and --difficulty NAME,field=value reach the dataset's manifest; a bad one exits 2 naming it."""
    argv = ["charades", "--out", str(tmp_path), "--classes", "growing,moving right", "--difficulty",
            "demo,speed=1.5,distractors=0:1", "--train-videos", "1", "--test-videos", "1", "--min-seconds", "1",
            "--max-seconds", "1", "--width", "32", "--height", "32"]
    assert sd.main(argv) == 0
    manifest = json.loads(capsys.readouterr().out)["manifest"]
    with open(manifest, encoding="utf-8") as handle:
        config = json.load(handle)["config"]
    assert config["classes"] == ["growing", "moving right"]
    assert config["difficulty"] == {**dataclasses.asdict(sd.DIFFICULTIES["demo"]), "speed": 1.5, "distractors": [0, 1]}
    for flag, value, message in (("--classes", "growing,jumping", "(['jumping'] unknown)"),
                                 ("--difficulty", "demo,actors=many", "'many' is not a number")):
        with pytest.raises(SystemExit) as exit_info:
            sd.main(argv[:argv.index(flag) + 1] + [value] + argv[argv.index(flag) + 2:] + ["--overwrite"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_parse_classes_and_difficulty():
    """A count or names; a preset with typed overrides (actors an int, distractors a range)."""
    assert sd.parse_classes("3") == 3 and sd.parse_classes(" growing , shrinking ") == ["growing", "shrinking"]
    assert sd.class_arguments(3) == {"num_classes": 3} and sd.class_arguments(("growing",)) == {"classes": ["growing"]}
    with pytest.raises(ValueError, match="distinct"):
        sd.parse_classes("growing,growing")
    hard = sd.parse_difficulty("hard,actors=2,noise=0")
    assert hard == dataclasses.replace(sd.DIFFICULTIES["hard"], actors=2, noise=0.0) and type(hard.actors) is int
    assert sd.parse_difficulty("demo") == sd.DIFFICULTIES["demo"]
    for text, message in (("demo,blur=2", "expected field=value"), ("demo,speed", "expected field=value"),
                          ("demo,distractors=1", "low:high"), ("brutal", "unknown difficulty")):
        with pytest.raises(ValueError, match=message):
            sd.parse_difficulty(text)


def shift_all(mask, reduce):
    """Reduce (np.all / np.any) each pixel's 3x3 neighbourhood of a boolean (T, H, W) mask; outside counts as False."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    height, width = mask.shape[1:]
    return reduce([padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)], axis=0)


def object_tracks(frames, background):
    """Per frame: area, centroid x, y, principal-axis angle (degrees) of the pixels that differ from background,
    and whether that region touches the frame border (then its centroid is not the object's)."""
    mask = np.abs(frames.astype(np.int16) - background.astype(np.int16)).sum(-1) > 60
    mask = shift_all(shift_all(mask, np.all), np.any)  # 3x3 opening: drops isolated codec-error pixels
    tracks = []
    for m in mask:
        ys, xs = np.nonzero(m)
        dx, dy = xs - xs.mean(), ys - ys.mean()
        angle = 0.5 * math.degrees(math.atan2(2 * (dx * dy).mean(), (dx * dx).mean() - (dy * dy).mean()))
        clipped = m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()
        tracks.append((len(xs), xs.mean(), ys.mean(), angle, clipped))
    return np.array(tracks)


def measure_motion(tracks, kind):
    """Median per-frame motion over consecutive frames where the object is whole, in the terms of `kind`."""
    area, x, y, angle, clipped = tracks.T
    whole = (clipped[:-1] == 0) & (clipped[1:] == 0)
    if whole.sum() < 8:
        return None
    step = lambda values: np.diff(values)[whole]  # noqa: E731
    if kind == "translate":
        return np.median(step(x)), np.median(step(y))
    if kind == "rotate":
        return np.median((step(angle) + 90) % 180 - 90)  # degrees per frame; clockwise on screen is positive
    if kind == "scale":
        return np.median(step(np.log(area)))
    both = whole[:-1] & whole[1:]
    vx, vy = np.diff(x), np.diff(y)
    turning = (vx[:-1] * vy[1:] - vy[:-1] * vx[1:])[both]  # > 0: clockwise on screen
    return np.median(turning), x[clipped == 0].std(), y[clipped == 0].std()


def test_decoded_videos_show_each_class_motion(tmp_path):
    """Object tracks measured on the decoded mp4s move as each class says (seeds 11-16 all pass, by >= 1.15x)."""
    args = dict(classes=list(sd.CLASS_POOL), train_per_class=1, val_per_class=1, seconds=1, fps=30,
                size=(128, 96), difficulty=sd.DIFFICULTIES["easy"], seed=11)
    paths = sd.make_kinetics(tmp_path, **args)
    per_frame = sd.TRANSLATE_SPEED * 96 / 30  # pixels
    turn = math.degrees(sd.ROTATE_SPEED) / 30  # degrees
    checked = set()
    for video in sd.plan_kinetics(**args):
        name = f"{video['youtube_id']}_{video['time_start']:06d}_{video['time_end']:06d}.mp4"
        frames, _ = decode(os.path.join(paths["root"], video["split"], video["label"], name))
        background = sd.render_video(video["spec"], draw_objects=False)[0]
        kind, parameter = sd.MOTIONS[video["label"]]
        measured = measure_motion(object_tracks(frames, background), kind)
        if measured is None:  # the object touches the frame edge in most frames: its centroid is not measurable
            continue
        checked.add(video["label"])
        message = (video["label"], measured)
        if kind == "translate":
            along = measured[0] * parameter[0] + measured[1] * parameter[1]
            across = measured[0] * parameter[1] - measured[1] * parameter[0]
            assert along > 0.7 * per_frame and abs(across) < 0.2 * along, message
        elif kind == "rotate":
            assert measured * parameter > 0.6 * turn, message
        elif kind == "scale":
            assert measured * parameter > 0.01, message
        elif kind == "oscillate":
            spread = np.array(measured[1:]) @ np.array([parameter, parameter[::-1]]).T
            assert spread[0] > 4 and spread[1] < 1, message
        else:
            assert measured[0] * parameter > 0.1 and min(measured[1:]) > 3, message
    assert checked == set(sd.CLASS_POOL)


def test_charades_objects_move_only_during_their_action(tmp_path):
    """In the JPEG frames the scene's centroid travels right inside each "moving right" segment and stays put outside.

    Measured medians (px/frame): 0.40-0.76 inside, |0.06| at most outside (wobble and JPEG noise).
    """
    paths = sd.make_charades(tmp_path, classes=["moving right"], train_videos=8, test_videos=1, seconds=(4.0, 4.0),
                             size=(128, 96), difficulty="easy", seed=2)
    plan = sd.plan_charades(classes=["moving right"], train_videos=8, test_videos=1, seconds=(4.0, 4.0), fps=24,
                            size=(128, 96), difficulty=sd.DIFFICULTIES["easy"], seed=2)
    checked = 0
    for video in plan:
        folder = os.path.join(paths["frames_root"], video["id"])
        frames = []
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as handle:
                frames.append(simplejpeg.decode_jpeg(handle.read()))
        x = object_tracks(np.stack(frames), sd.render_video(video["spec"], draw_objects=False)[0])[:, 1]
        times = np.arange(len(frames) - 1) / 24
        active = np.zeros(len(times), bool)
        for _, start, end in video["actions"]:
            active |= (times >= start) & (times + 1 / 24 <= end)
        speed = np.diff(x)
        if active.sum() >= 10:
            assert np.median(speed[active]) > 0.25, (video["id"], video["actions"])
            checked += 1
        if (~active).sum() >= 10:
            assert abs(np.median(speed[~active])) < 0.1, (video["id"], video["actions"])
    assert checked >= 5


class TinyNet(torch.nn.Module):
    """Two 3D conv layers with batch norm and a global max pool: enough to read a direction of motion."""

    def __init__(self, classes):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.AvgPool3d((1, 2, 2)),
            torch.nn.Conv3d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm3d(8), torch.nn.ReLU(),
            torch.nn.Conv3d(8, 16, 3, stride=(1, 2, 2), padding=1, bias=False), torch.nn.BatchNorm3d(16),
            torch.nn.ReLU(), torch.nn.AdaptiveMaxPool3d(1), torch.nn.Flatten())
        self.classifier = torch.nn.Linear(16, classes)

    def forward(self, clips):
        """Logits for float clips (N, 3, T, H, W) in [0, 1]."""
        return self.classifier(self.features(clips))


def train_and_score(train, train_labels, val, val_labels, steps=300):
    """Train a TinyNet on uint8 clips (N, T, H, W, 3) with Adam; return its top-1 on the val clips."""
    torch.manual_seed(0)
    model = TinyNet(int(train_labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    as_input = lambda clips: torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(len(train), (16,), generator=generator).numpy()
        loss = torch.nn.functional.cross_entropy(model(as_input(train[batch])), torch.from_numpy(train_labels[batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = model(as_input(val)).argmax(1).numpy()
    return float((predictions == val_labels).mean())


def test_motion_classes_need_time(tmp_path):
    """A 3D net on 8-frame clips separates the four directions; the same net on one repeated frame cannot.

    The "easy" preset (no distractors or noise) keeps this CPU check to seconds: on "medium" the tiny net needs
    600 steps for 0.70 (one frame: 0.225), and a single frame holds no more information at any preset.
    Measured: 0.875 / 0.825 / 0.95 (seeds 1 / 2 / 3) with time against 0.20 / 0.30 / 0.20 from one frame
    (chance 0.25).
    """
    classes = ["moving down", "moving left", "moving right", "moving up"]
    paths = sd.make_kinetics(tmp_path, classes=classes, train_per_class=20, val_per_class=10, seconds=1,
                             size=(64, 48), difficulty="easy", seed=1)
    data = {}
    for split, csv_key in (("train", "train_csv"), ("val", "val_csv")):
        with open(paths[csv_key], encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        clips = [decode(os.path.join(paths[f"{split}_root"], row["label"], f"{row['youtube_id']}_"
                                     f"{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"))[0][0:29:4]
                 for row in rows]  # 8 frames at stride 4
        data[split] = np.stack(clips), np.array([classes.index(row["label"]) for row in rows])
    still = {split: (np.repeat(clips[:, 3:4], 8, axis=1), labels) for split, (clips, labels) in data.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        moving = train_and_score(*data["train"], *data["val"])
        single = train_and_score(*still["train"], *still["val"])
    finally:
        torch.set_num_threads(threads)
    assert moving > 0.7 and single < 0.5, (moving, single)


def test_actors_put_several_objects_in_the_class_motion():
    """difficulty.actors = 3: each Kinetics video holds three objects, all moving the class's way."""
    difficulty = dataclasses.replace(sd.DIFFICULTIES["easy"], actors=3)
    videos = sd.plan_kinetics(classes=["moving left", "moving right"], train_per_class=4, val_per_class=1,
                              seconds=1, fps=30, size=(128, 96), difficulty=difficulty, seed=5)
    for video in videos:
        assert video["spec"].actions == ((video["label"], 0.0, 1.0),) * 3
        frames = sd.render_video(video["spec"]).astype(np.float32)
        background = sd.render_video(video["spec"], draw_objects=False)[0].astype(np.float32)
        covered = (np.abs(frames[0] - background).max(-1) > 30).mean()
        one = sd.render_video(dataclasses.replace(video["spec"], actions=video["spec"].actions[:1]))[0]
        assert covered > 1.5 * (np.abs(one.astype(np.float32) - background).max(-1) > 30).mean(), video["label"]
        steps = np.abs(np.diff(frames, axis=0)).sum(-1)  # (T-1, H, W) motion energy
        columns = (steps * np.arange(128)).sum((1, 2)) / steps.sum((1, 2))
        shift = np.median(np.diff(columns))
        assert shift * (1 if video["label"] == "moving right" else -1) > 0, (video["label"], shift)
