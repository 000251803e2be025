"""Kinetics: annotation readers, training clips for any (T, S) Multigrid asks for, multi-view test clips.

Annotations, detected by content: the official Kinetics CSV (`label,youtube_id,time_start,time_end,
split[,is_cc]`, the test CSV without `label`), `path label` lists (PySlowFast, mmaction2; also
mmaction2's rawframe `path num_frames label`), and x3d-multigrid's JSON `{id: {"subset",
"annotations": {"label", "segment"}}}` with its labels file passed as `class_list`.
Videos are found by file stem anywhere one or two levels under `root`, so label folders with spaces
or underscores, mp4/webm/mkv/avi files, frame store files (`.frames`, `frame_store`) and JPEG frame
folders of the same stem all work.
Every clip leaves a worker as uint8 (C, T, H, W); `transforms.normalize` runs on the training device.
"""
import csv
import json
import operator
import os
import random
from typing import NamedTuple

import numpy as np
import torch
import torch.utils.data

import transforms as T
import video_io
from video_io import IMAGE_EXTENSIONS, READABLE_EXTENSIONS, VideoDecodeError, open_video, read_drawn

from multigrid import ClipRequest, check_request  # noqa: F401 - ClipRequest: the request type; any object with its five fields works

CSV_COLUMNS = ("youtube_id", "time_start", "time_end")
JSON_SUBSETS = {"train": ("training", "train"), "val": ("validation", "val"), "test": ("validation", "val")}


class Annotation(NamedTuple):
    """One annotated video: the expected path (relative to root), its stems, label and source line."""
    path: str
    stems: tuple
    label: object  # class name (str), class index (int), or None when unlabelled
    where: str  # "file:line" (or "file key 'id'") for error messages


def _kinetics_stem(youtube_id, start, end):
    """Official clip file stem `<youtube_id>_<start:06d>_<end:06d>`."""
    return f"{youtube_id}_{int(start):06d}_{int(end):06d}"


def read_kinetics_csv(path):
    """Annotations of an official Kinetics CSV (labelled or test); raises ValueError naming file and line."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise ValueError(f"{path}: empty annotation file")
    header = [name.strip() for name in rows[0]]
    if not all(name in header for name in CSV_COLUMNS):
        raise ValueError(f"{path}:1: header {','.join(header)!r} is not a Kinetics CSV header; expected "
                         "'label,youtube_id,time_start,time_end,split[,is_cc]' (test CSV: without label)")
    column = {name: header.index(name) for name in header}
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < len(header) - ("is_cc" in header):
            raise ValueError(f"{path}:{line}: {len(row)} fields, header has {len(header)}: {row}")
        try:
            start, end = int(float(row[column["time_start"]])), int(float(row[column["time_end"]]))
        except ValueError:
            raise ValueError(f"{path}:{line}: time_start/time_end must be numbers, got "
                             f"{row[column['time_start']]!r}, {row[column['time_end']]!r}") from None
        stem = _kinetics_stem(row[column["youtube_id"]].strip(), start, end)
        label = row[column["label"]].strip() if "label" in column else None
        out.append(Annotation(f"{label}/{stem}.mp4" if label else f"{stem}.mp4", (stem,), label or None,
                              f"{path}:{line}"))
    if not out:
        raise ValueError(f"{path}: only a header, no videos listed")
    return out


def _is_int(text):
    """True for an optionally signed decimal integer."""
    return text.lstrip("-").isdigit()


def read_path_list(path):
    """Annotations of a `path label` list (label a class name or index); blank and # lines skipped."""
    out = []
    with open(path, encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            text = text.strip()
            if not text or text.startswith("#"):
                continue
            fields = text.split()
            if len(fields) >= 3 and _is_int(fields[-1]) and _is_int(fields[-2]):
                video = text.rsplit(None, 2)[0]  # mmaction2 rawframes: path num_frames label
            elif len(fields) >= 2:
                video = text.rsplit(None, 1)[0]
            else:
                raise ValueError(f"{path}:{line}: expected 'path label', got {text!r}")
            label = int(fields[-1]) if _is_int(fields[-1]) else fields[-1]
            stem = os.path.splitext(os.path.basename(video.rstrip("/")))[0]
            out.append(Annotation(video, (stem,), label, f"{path}:{line}"))
    if not out:
        raise ValueError(f"{path}: empty annotation file")
    return out


def read_x3d_json(path, subsets):
    """Annotations of x3d-multigrid's JSON for entries whose subset is in `subsets`."""
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{id: {{subset, annotations}}}}")
    out = []
    for key, value in data.items():
        where = f"{path} key {key!r}"
        if not isinstance(value, dict) or "subset" not in value:
            raise ValueError(f"{where}: expected {{'subset': ..., 'annotations': {{'label', 'segment'}}}}")
        if value["subset"] not in subsets:
            continue
        note = value.get("annotations") or {}
        label, segment = note.get("label"), note.get("segment")
        stems = (key,)
        if segment is not None:
            try:
                stems = (_kinetics_stem(key, segment[0], segment[1]), key)
            except (TypeError, ValueError, IndexError):
                raise ValueError(f"{where}: segment must be [start, end], got {segment!r}") from None
        folder = f"{label.replace(' ', '_')}/" if label else ""
        out.append(Annotation(f"{folder}{stems[0]}.mp4", stems, label, where))
    if not out:
        raise ValueError(f"{path}: no entry with subset in {list(subsets)}")
    return out


def read_annotations(path, mode="train"):
    """Annotations of any supported file, the format detected by content (JSON subset chosen by mode)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        head = handle.read(4096)
    first = head.strip().splitlines()[0] if head.strip() else ""
    if not first:
        raise ValueError(f"{path}: empty annotation file")
    if first.startswith("{"):
        return read_x3d_json(path, JSON_SUBSETS[mode])
    if "," in first:  # `path label` lists have no commas; anything else with commas must be a CSV
        return read_kinetics_csv(path)
    return read_path_list(path)


def read_class_list(path):
    """Class names, one per line in index order; raises ValueError on duplicates or an empty file."""
    with open(path, encoding="utf-8") as handle:
        names = [line.strip() for line in handle]
    classes, seen = [], {}
    for line, name in enumerate(names, start=1):
        if not name:
            continue
        if name in seen:
            raise ValueError(f"{path}:{line}: class {name!r} already listed on line {seen[name]}")
        seen[name] = line
        classes.append(name)
    if not classes:
        raise ValueError(f"{path}: empty class list")
    return classes


def _class_key(name):
    """Matching key that treats spaces and underscores alike (label folders may use either)."""
    return name.replace("_", " ").strip()


def assign_labels(annotations, classes=None, class_file=None, source=None):
    """(classes, label indices) for annotations: names map through `classes` (else alphabetical order of
    the names), integer labels are indices; unlabelled entries get -1. Unknown labels raise ValueError
    naming the file and line, and `source` (where `classes` came from; default: the class list file)."""
    source = source or (f"class list {class_file}" if class_file else "the class list")
    given = [a.label for a in annotations if a.label is not None]
    if given and all(isinstance(label, int) for label in given):
        classes = classes or [str(i) for i in range(max(given) + 1)]
        for a in annotations:
            if a.label is not None and not 0 <= a.label < len(classes):
                raise ValueError(f"{a.where}: label {a.label} outside 0..{len(classes) - 1} "
                                 f"({len(classes)} classes of {source})")
        return classes, [-1 if a.label is None else a.label for a in annotations]
    names = [str(label) for label in given]
    classes = classes or sorted(set(names))
    index = {_class_key(name): i for i, name in enumerate(classes)}
    labels = []
    for a in annotations:
        if a.label is None:
            labels.append(-1)
            continue
        key = _class_key(str(a.label))
        if key not in index:
            raise ValueError(f"{a.where}: label {a.label!r} is not in {source} ({len(classes)} classes); "
                             "fix the annotation or add the class")
        labels.append(index[key])
    return classes, labels


def scan_root(root):
    """{stem: [paths]} of every video file, frame store file and frame folder one or two levels under `root`."""
    found = {}

    def add(stem, path):
        """Record one candidate path for a stem."""
        found.setdefault(stem, []).append(path)

    for entry in os.scandir(root):
        name, ext = os.path.splitext(entry.name)
        if entry.is_file() and ext.lower() in READABLE_EXTENSIONS:
            add(name, entry.path)
        elif entry.is_dir():
            try:
                children = list(os.scandir(entry.path))
            except OSError:  # an unreadable folder holds nothing we can load
                continue
            if any(child.name.lower().endswith(IMAGE_EXTENSIONS) for child in children):
                add(entry.name, entry.path)  # a frame folder right under root
                continue
            for child in children:
                stem, ext = os.path.splitext(child.name)
                if child.is_file() and ext.lower() in READABLE_EXTENSIONS:
                    add(stem, child.path)
                elif child.is_dir():
                    add(child.name, child.path)  # a frame folder inside a label folder
    return found


def _resolve(annotation, found):
    """Path of an annotated video under root, or None: the stem match in `found` (from `scan_root`),
    preferring the label's folder."""
    for stem in annotation.stems:
        paths = found.get(stem)
        if paths:
            if annotation.label is not None and len(paths) > 1:
                key = _class_key(str(annotation.label))
                paths = sorted(paths, key=lambda p: _class_key(os.path.basename(os.path.dirname(p))) != key)
            return paths[0]
    return None


def _request_fields(request):
    """(index, frames, crop, max_rate, seed) of a ClipRequest or any object with those attributes."""
    try:
        return (operator.index(request.index), int(request.frames), int(request.crop),
                int(request.max_rate), int(request.seed))
    except (AttributeError, TypeError):
        raise TypeError(f"expected an int index or a ClipRequest(index, frames, crop, max_rate, seed), "
                        f"got {request!r}") from None


class KineticsDataset(torch.utils.data.Dataset):
    """Kinetics clips: 'train' (any ClipRequest shape), 'val' (one centre clip), 'test' (all views).

    Training follows PySlowFast's Kinetics loader with Multigrid: rate from [rate, max_rate]
    inclusive (16x5 asked at 4 frames: [5, 20]); window start uniform in [0, frames - span] with
    span = rate * T / 30 * fps; short side from [round(min * crop / default crop), max] (X3D-M at
    crop 112: [128, 320]); random crop; flip with p = 0.5. Test views as PySlowFast: window k of K
    starts at (frames - span) * k / K; crops at the start / centre / end of the long side.
    Deliberate difference: 'val' takes the centre window and centre crop (PySlowFast samples val
    clips at random like training), so the per-epoch validation number does not jitter.
    """

    def __init__(self, root, annotations, mode="train", *, class_list=None, classes=None, classes_from=None,
                 frames=16, rate=5, crop=224,
                 short_side=(256, 320), inverse_uniform=False, test_crop=None, temporal_views=10,
                 spatial_views=3, target_fps=30, max_retries=10, seed=0, frame_fps=30.0, random_flip=True,
                 log=print):
        """Read the annotations, find every video under `root`, log and keep the index report.

        `classes` (names in label order, e.g. the training set's or a checkpoint's) maps labels by
        name and wins over `class_list`; `classes_from` says where they came from, for errors.
        `frame_fps` is the rate JPEG frame folders were extracted at (files carry no rate).
        `random_flip=False` turns off the training flip, for classes that a mirror image swaps
        (the synthetic dataset's moving left / right, rotating clockwise / counterclockwise).
        """
        if mode not in ("train", "val", "test"):
            raise ValueError(f"mode must be 'train', 'val' or 'test', got {mode!r}")
        if spatial_views not in (1, 3):
            raise ValueError(f"spatial_views must be 1 (centre) or 3 (start/centre/end), got {spatial_views}")
        if mode == "train" and (short_side[0] < crop or short_side[0] > short_side[1]):
            raise ValueError(f"short_side {tuple(short_side)} must satisfy crop {crop} <= min <= max")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"video root {root} does not exist or is not a folder")
        self.root, self.mode, self.log = str(root), mode, log
        self.frames, self.rate, self.crop = int(frames), int(rate), int(crop)
        self.short_side, self.inverse_uniform = (int(short_side[0]), int(short_side[1])), bool(inverse_uniform)
        self.test_crop = int(test_crop or crop)
        self.temporal_views, self.spatial_views = int(temporal_views), int(spatial_views)
        self.target_fps, self.frame_fps = float(target_fps), float(frame_fps)
        self.max_retries, self.seed = int(max_retries), int(seed)
        self.random_flip = bool(random_flip)
        self._rng, self._rng_owner = None, None

        entries = read_annotations(annotations, mode)
        names = list(classes) if classes else read_class_list(class_list) if class_list else None
        self.classes, labels = assign_labels(entries, names, class_list,
                                             classes_from if classes else None)
        found = None  # the folder scan runs only if some listed path does not exist as written
        paths, kept, missing = [], [], []
        for entry, label in zip(entries, labels):
            path = os.path.join(self.root, entry.path)
            if not os.path.exists(path):
                found = scan_root(self.root) if found is None else found
                path = _resolve(entry, found)
            if path is None:
                missing.append(os.path.join(self.root, entry.path))
            else:
                paths.append(path)
                kept.append(label)
        self.index_report = {"listed": len(entries), "found": len(paths), "missing": len(missing),
                             "first_missing": missing[:10]}
        log(f"kinetics {mode}: {annotations}: {len(entries)} listed, {len(paths)} found under {self.root}, "
            f"{len(missing)} missing" + (f" (first: {', '.join(missing[:3])})" if missing else ""))
        if not paths:
            raise ValueError(f"no video of {annotations} found under {self.root}; expected e.g. {missing[0]} "
                             "(<root>/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4 or a frame folder)")
        # numpy arrays, not Python lists: forked DataLoader workers then share them without copy-on-read
        self._paths = np.array([p.encode("utf-8") for p in paths])
        self._labels = np.array(kept, dtype=np.int64)

    @property
    def num_classes(self):
        """Number of classes."""
        return len(self.classes)

    def __len__(self):
        """Number of videos found."""
        return len(self._labels)

    def path(self, i):
        """Path of video i."""
        return self._paths[i].decode("utf-8")

    def label(self, i):
        """Class index of video i (-1 when unlabelled)."""
        return int(self._labels[i])

    def _own_seed(self):
        """A seed from the dataset's RNG, distinct per DataLoader worker (mixed with its torch seed)."""
        info = torch.utils.data.get_worker_info()
        owner = (os.getpid(), None if info is None else info.seed)
        if self._rng_owner != owner:
            self._rng_owner = owner
            self._rng = random.Random(self.seed if info is None else self.seed * 1_000_003 + info.seed)
        return self._rng.getrandbits(63)

    def __getitem__(self, item):
        """train: ClipRequest or int -> (clip, label, index, failures); val: int -> same; test: int ->
        (views or None, label, index)."""
        if self.mode == "train":
            if isinstance(item, (int, np.integer)) or (isinstance(item, torch.Tensor) and item.dim() == 0):
                return self._with_retries(operator.index(item), self.frames, self.crop, self.rate,
                                          self._own_seed())
            return self._with_retries(*_request_fields(item))
        if not isinstance(item, (int, np.integer)):
            raise TypeError(f"{self.mode} mode takes an int index, got {item!r}")
        index = operator.index(item)
        if self.mode == "val":
            return self._with_retries(index, self.frames, self.crop, self.rate, self.seed + index)
        try:
            return self._test_views(index), self.label(index), index
        except VideoDecodeError as error:
            self.log(f"kinetics test: excluding {error.path}: {error.reason}")
            return None, self.label(index), index

    def _with_retries(self, index, frames, crop, max_rate, seed):
        """One clip; an undecodable video is replaced by a sample drawn from the same generator."""
        check_request(index, frames, crop, max_rate, len(self), self.rate)
        clip, index, failures = video_io.read_with_retries(
            lambda i, g: self._clip(i, frames, crop, max_rate, g), index, len(self), seed,
            self.max_retries, self.log, f"kinetics {self.mode}")
        return clip, self.label(index), index, failures

    def _decode(self, index, frames, crop, max_rate, generator):
        """(uint8 (frames, H, W, 3) source frames, TrainCrop or None) of video `index`. Training draws
        everything before decoding, in PySlowFast's order (rate, window, short side, crop offsets,
        flip), so the frames are decoded only as large as the drawn short side needs (store levels,
        libjpeg / swscale 1/2, 1/4, 1/8) and never smaller (video_io.read_drawn)."""
        with open_video(self.path(index), self.frame_fps) as video:
            if self.mode == "train":
                indices = self._draw_window(video, frames, max_rate, generator)
                return read_drawn(video, indices, self._spatial_draw(crop, generator), generator)
            indices = T.center_window(video.num_frames, frames, self.rate, video.fps, self.target_fps)
            return video.read(indices, min_short_side=crop), None

    def _draw_window(self, video, frames, max_rate, generator):
        """Frame indices of a training clip of the open `video`: rate from [rate, max_rate]
        (random.randint, PySlowFast), then a random window."""
        rate = int(torch.randint(self.rate, max_rate + 1, (), generator=generator).item())
        return T.random_window(video.num_frames, frames, rate, video.fps, self.target_fps, generator)

    def _spatial_draw(self, crop, generator):
        """draw(height, width) -> TrainCrop: a training clip's short side, crop box and flip at `crop`."""
        short_range = T.multigrid_short_side_range(self.short_side, crop, self.crop)
        return lambda height, width: T.draw_train_crop(height, width, crop, short_range, generator,
                                                       self.inverse_uniform, self.random_flip)

    def plan(self, request):
        """(frame indices, TrainCrop) that a training ClipRequest draws, without decoding the clip:
        the same for a video and for its frame store or frame folder when they share size and rate."""
        index, frames, crop, max_rate, seed = _request_fields(request)
        generator = torch.Generator().manual_seed(seed)
        with open_video(self.path(index), self.frame_fps) as video:
            indices = self._draw_window(video, frames, max_rate, generator)
            return indices, self._spatial_draw(crop, generator)(video.height, video.width)

    def read_frames(self, index, frames, crop, max_rate, generator):
        """The decode step of one clip alone: uint8 (frames, H, W, 3) source frames of video `index`
        (train: random rate and window, decoded at the scale the drawn short side allows; val: centre
        window), before any spatial transform."""
        return self._decode(index, frames, crop, max_rate, generator)[0]

    def read_test_frames(self, index):
        """The decode step of the test views alone: uint8 (temporal_views * frames, H, W, 3), window-major."""
        with open_video(self.path(index), self.frame_fps) as video:
            windows = T.uniform_windows(video.num_frames, self.frames, self.rate, video.fps, self.target_fps,
                                        self.temporal_views)
            return video.read(windows.flatten(), min_short_side=self.test_crop)

    def _clip(self, index, frames, crop, max_rate, generator):
        """uint8 (3, frames, crop, crop) from video `index` (train: random; val: centre)."""
        clip, plan = self._decode(index, frames, crop, max_rate, generator)
        if plan is None:
            return T.to_cthw(T.scale_uniform_crop(clip, crop, 1))
        return T.apply_train_crop(clip, plan, crop)

    def _test_views(self, index):
        """uint8 (temporal_views * spatial_views, 3, frames, test_crop, test_crop), temporal-major."""
        return T.multi_view_crops(self.read_test_frames(index), self.frames, self.test_crop, self.spatial_views)


def collate_test(batch):
    """DataLoader collate_fn for test mode: (views (B, V, 3, T, S, S) uint8, labels (B,), indices (B,),
    failed indices); undecodable videos (views None) are dropped and listed in `failed`."""
    good = [sample for sample in batch if sample[0] is not None]
    failed = [int(sample[2]) for sample in batch if sample[0] is None]
    views = torch.stack([sample[0] for sample in good]) if good else torch.empty(0, dtype=torch.uint8)
    labels = torch.tensor([sample[1] for sample in good], dtype=torch.int64)
    indices = torch.tensor([sample[2] for sample in good], dtype=torch.int64)
    return views, labels, indices, failed
