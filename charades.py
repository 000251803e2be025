"""Charades: annotation readers, clip / per-frame targets, the official metrics and their scoring command.

Scoring a submission file against an annotation CSV (prints ``mAP: <fraction>``, e.g. ``mAP: 0.351234``):

    python charades.py classify --annotations Charades_v1_test.csv --submission cls.txt [--classes Charades_v1_classes.txt]
    python charades.py localize --annotations Charades_v1_test.csv --submission loc.txt [--classes Charades_v1_classes.txt]

The official numbers follow ``Charades_v1_classify.m`` / ``Charades_v1_localize.m`` (docs/reference.md).
The dense per-frame mAP of x3d-multigrid / Super-Events is a different number and is always labelled
as such. PySlowFast's Charades ``get_map`` uses scikit-learn's average precision (ties grouped, videos
without actions kept as negatives), so it can differ from the official mAP; this repo reports the official one.
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.utils.data

import transforms as T
import video_io
from multigrid import check_request
from video_io import READABLE_EXTENSIONS, VideoDecodeError, open_video, read_drawn, read_image_frames

NUM_CLASSES = 157
FPS = 24
LOCALIZATION_POINTS = 25
CSV_COLUMNS = ("id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
               "descriptions", "actions", "length")
REQUIRED_COLUMNS = ("id", "actions", "length")
_CLASS_CODE = re.compile(r"^c(\d+)$")


class CharadesFormatError(ValueError):
    """Malformed Charades annotation, class list or submission file; the message names file, line and value."""


@dataclass
class CharadesVideo:
    """One annotated video: id, length in seconds, actions as (class index, start s, end s), source file and line."""

    id: str
    length: float
    actions: list[tuple[int, float, float]] = field(default_factory=list)
    line: int = 0
    path: str = ""

    @property
    def classes(self) -> set[int]:
        """The set of class indices annotated anywhere in the video."""
        return {c for c, _, _ in self.actions}

    def where(self) -> str:
        """'file, line N (video ID)' for error messages."""
        return f"{self.path}, line {self.line} (video {self.id})"


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------

def _open_text(path, what: str):
    """Open a UTF-8 text file (a BOM is skipped) or raise FileNotFoundError naming it and what it should be."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path} (check the path)")
    return open(path, "r", encoding="utf-8-sig", newline="")


def read_classes(path) -> list[tuple[str, str]]:
    """Read Charades_v1_classes.txt (``c000 Holding some clothes`` per line) into [(code, description)] in file order."""
    classes, seen = [], {}
    with _open_text(path, "Charades class list") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split(None, 1)
            if len(parts) < 2 or not _CLASS_CODE.match(parts[0]):
                raise CharadesFormatError(
                    f"{path}, line {n}: expected 'cNNN description', found {line!r}")
            if parts[0] in seen:
                raise CharadesFormatError(
                    f"{path}, line {n}: class {parts[0]!r} already defined on line {seen[parts[0]]}")
            seen[parts[0]] = n
            classes.append((parts[0], parts[1].strip()))
    if not classes:
        raise CharadesFormatError(f"{path}: no classes found (expected lines like 'c000 Holding some clothes')")
    return classes


def _class_lookup(classes):
    """Map class code -> index from read_classes() output, a list of codes, a class-file path, or None (code digits)."""
    if classes is None:
        return None
    if isinstance(classes, (str, os.PathLike)):
        classes = read_classes(classes)
    codes = [c[0] if isinstance(c, (tuple, list)) else c for c in classes]
    return {code: i for i, code in enumerate(codes)}


def _parse_float(text: str, where: str, name: str) -> float:
    """Parse a finite float or raise CharadesFormatError naming where and the value."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise CharadesFormatError(f"{where}: {name} is not a finite number: {text!r}")
    return value


def _parse_actions(text: str, where: str, lookup) -> list[tuple[int, float, float]]:
    """Parse an ``actions`` field ('c092 11.90 21.20;c147 0.00 12.60', may be empty) into [(class, start, end)]."""
    text = text.strip()
    if not text:
        return []
    actions = []
    for k, item in enumerate(text.split(";"), 1):
        here = f"{where}: action {k} {item.strip()!r}"
        parts = item.split()
        if len(parts) != 3:
            raise CharadesFormatError(f"{here}: expected 'cNNN start end'")
        code, start, end = parts
        if lookup is not None:
            if code not in lookup:
                raise CharadesFormatError(f"{here}: unknown class {code!r} (not in the class list)")
            cls = lookup[code]
        else:
            m = _CLASS_CODE.match(code)
            if not m:
                raise CharadesFormatError(f"{here}: unknown class {code!r} (expected a code like c092)")
            cls = int(m.group(1))
        start, end = _parse_float(start, here, "start"), _parse_float(end, here, "end")
        if end < start:
            raise CharadesFormatError(f"{here}: end {end} < start {start}; fix or remove the action")
        actions.append((cls, start, end))
    return actions


def read_charades_csv(path, classes=None) -> list[CharadesVideo]:
    """Read Charades_v1_train.csv / Charades_v1_test.csv into [CharadesVideo] in file order.

    ``classes`` (read_classes() output, a list of codes or the class-file path) maps codes to indices
    and rejects unknown codes; without it the index is the code's number (c092 -> 92), as the official
    scripts do. Only the id, actions and length columns are required.
    """
    lookup = _class_lookup(classes)
    path = os.fspath(path)
    videos, seen = [], {}
    with _open_text(path, "Charades annotation CSV") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise CharadesFormatError(f"{path}: empty file (expected the header {','.join(CSV_COLUMNS)})")
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise CharadesFormatError(
                f"{path}, line 1: missing column(s) {', '.join(missing)}; found {','.join(header)}; "
                f"expected the Charades_v1 header {','.join(CSV_COLUMNS)}")
        col = {name: header.index(name) for name in REQUIRED_COLUMNS}
        line = reader.line_num
        for row in reader:
            start_line, line = line + 1, reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise CharadesFormatError(
                    f"{path}, line {start_line}: expected {len(header)} fields, found {len(row)}")
            vid = row[col["id"]].strip()
            if not vid:
                raise CharadesFormatError(f"{path}, line {start_line}: empty id")
            where = f"{path}, line {start_line} (video {vid})"
            if vid in seen:
                raise CharadesFormatError(f"{where}: duplicate id, first on line {seen[vid]}")
            seen[vid] = start_line
            length = _parse_float(row[col["length"]], where, "length")
            if length <= 0:
                raise CharadesFormatError(f"{where}: length must be > 0 seconds, found {length}")
            actions = _parse_actions(row[col["actions"]], where, lookup)
            videos.append(CharadesVideo(vid, length, actions, start_line, path))
    if not videos:
        raise CharadesFormatError(f"{path}: no videos after the header")
    return videos


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------

def _check_class(video: CharadesVideo, cls: int, num_classes: int) -> None:
    """Raise if an action's class index does not fit the model's class count."""
    if not 0 <= cls < num_classes:
        raise CharadesFormatError(
            f"{video.where()}: class index {cls} out of range for {num_classes} classes")


def span_targets(video: CharadesVideo, t0: float, t1: float, num_classes: int) -> np.ndarray:
    """Multi-hot (C,) float32: the classes active anywhere in [t0, t1] seconds (inclusive overlap)."""
    if t1 < t0:
        raise ValueError(f"span_targets: t1 {t1} < t0 {t0} for video {video.id}")
    out = np.zeros(num_classes, np.float32)
    for cls, start, end in video.actions:
        _check_class(video, cls, num_classes)
        if start <= t1 and end >= t0:
            out[cls] = 1.0
    return out


def frame_targets(video: CharadesVideo, times, num_classes: int, strict: bool = False) -> np.ndarray:
    """Per-time multi-hot (C, len(times)) float32; class c is on at t if start <= t <= end.

    ``strict=True`` uses start < t < end, the bounds of the dense x3d-multigrid / Super-Events targets.
    """
    times = np.asarray(times, np.float64).reshape(-1)
    out = np.zeros((num_classes, times.size), np.float32)
    for cls, start, end in video.actions:
        _check_class(video, cls, num_classes)
        on = (start < times) & (times < end) if strict else (start <= times) & (times <= end)
        out[cls, on] = 1.0
    return out


def localization_points(length: float) -> np.ndarray:
    """The 25 official time points (25,) float64: t_j = (j-1)/25 * length, j = 1..25 (this operation order)."""
    return np.arange(LOCALIZATION_POINTS, dtype=np.float64) / LOCALIZATION_POINTS * float(length)


def dense_frame_times(num_frames: int, length: float) -> np.ndarray:
    """Times (num_frames,) of the dense per-frame protocol: frame f (0-based) at f / (num_frames / length)."""
    return np.arange(num_frames, dtype=np.float64) / (num_frames / float(length))


def localization_targets(videos: Sequence[CharadesVideo], num_classes: int) -> np.ndarray:
    """Official localization labels (V, 25, C) float32 at localization_points() with inclusive bounds."""
    out = np.zeros((len(videos), LOCALIZATION_POINTS, num_classes), np.float32)
    for i, v in enumerate(videos):
        out[i] = frame_targets(v, localization_points(v.length), num_classes).T
    return out


def video_labels(labels, num_classes: int) -> np.ndarray:
    """Video-level labels (V, C) float32 from CharadesVideos or iterables of class indices."""
    out = np.zeros((len(labels), num_classes), np.float32)
    for i, item in enumerate(labels):
        if isinstance(item, CharadesVideo):
            for cls in item.classes:
                _check_class(item, cls, num_classes)
            item = item.classes
        for cls in item:
            if not 0 <= int(cls) < num_classes:
                raise ValueError(f"labels[{i}]: class index {cls} out of range for {num_classes} classes")
            out[i, int(cls)] = 1.0
    return out


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

class MeanAP(NamedTuple):
    """A mean average precision and its per-class APs (C,) float64, NaN for classes left out (no positives)."""

    map: float
    per_class_ap: np.ndarray
    protocol = "mAP"

    def __str__(self) -> str:
        """'<protocol>: <fraction>'."""
        return f"{self.protocol}: {self.map:.6f}"


class ClassifyMAP(MeanAP):
    """The official Charades_v1_classify mAP."""

    __slots__ = ()
    protocol = "Charades_v1_classify mAP (official)"


class LocalizeMAP(MeanAP):
    """The official Charades_v1_localize mAP (25 points per video)."""

    __slots__ = ()
    protocol = "Charades_v1_localize mAP (official, 25 points per video)"


class FrameMAP(MeanAP):
    """The dense per-frame mAP of x3d-multigrid / Super-Events; not an official Charades number."""

    __slots__ = ()
    protocol = "dense per-frame mAP (x3d-multigrid / Super-Events protocol, not official Charades_v1_localize)"


def _check_scores(scores: np.ndarray, what: str) -> None:
    """Reject NaN scores, naming the first one."""
    bad = np.argwhere(np.isnan(scores))
    if bad.size:
        raise ValueError(f"{what}: NaN score at index {tuple(int(i) for i in bad[0])}")


def _check_binary(labels: np.ndarray, shape: tuple, what: str) -> np.ndarray:
    """Return labels as float64 0/1 of the given shape, or raise naming the mismatch."""
    labels = np.asarray(labels, np.float64)
    if labels.shape != shape:
        raise ValueError(f"{what}: labels have shape {labels.shape}, scores {shape}")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"{what}: labels must be 0/1")
    return labels


def ranked_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-column AP (C,) of THUMOSeventclspr: rows ranked by a stable sort of -score (ties in row order),
    AP = mean over positives of the precision at their rank; NaN for columns without positives."""
    ap = np.full(scores.shape[1], np.nan)
    ranks = np.arange(1, scores.shape[0] + 1, dtype=np.float64)
    for c in range(scores.shape[1]):
        truth = labels[np.argsort(-scores[:, c], kind="stable"), c]
        npos = truth.sum()
        if npos > 0:
            ap[c] = (np.cumsum(truth) / ranks)[truth == 1].sum() / npos
    return ap


def _mean_ap(kind: type, ap: np.ndarray, what: str) -> MeanAP:
    """Wrap per-class APs as ``kind``, mean over classes with positives; raise if there are none."""
    if np.all(np.isnan(ap)):
        raise ValueError(f"{what}: no class has a positive, mAP is undefined")
    return kind(float(np.nanmean(ap)), ap)


def classify_map(scores, labels) -> ClassifyMAP:
    """Official Charades_v1_classify mAP of scores (V, C) against labels (V, C) 0/1, class sets or CharadesVideos.

    Videos without any action are scored -inf (the official script never looks them up), ties are
    broken by row (annotation-file) order, classes without positives are left out (NaN in per_class_ap;
    the official script would average a NaN).
    """
    scores = np.array(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"classify_map: scores must be (videos, classes), got shape {scores.shape}")
    _check_scores(scores, "classify_map")
    if not isinstance(labels, np.ndarray) or labels.ndim != 2:
        labels = video_labels(labels, scores.shape[1])
    labels = _check_binary(labels, scores.shape, "classify_map")
    scores[labels.sum(1) == 0] = -np.inf
    return _mean_ap(ClassifyMAP, ranked_ap(scores, labels), "classify_map")


def localize_map(scores, targets) -> LocalizeMAP:
    """Official Charades_v1_localize mAP of scores (V, 25, C) against targets (V, 25, C) 0/1 or CharadesVideos.

    AP per class over all 25 points of all videos in (video, point) order, points without labels kept
    as negatives, ties broken by that order; classes without positives left out (the official script
    would average a NaN).
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 3 or scores.shape[1] != LOCALIZATION_POINTS:
        raise ValueError(f"localize_map: scores must be (videos, {LOCALIZATION_POINTS}, classes), got {scores.shape}")
    _check_scores(scores, "localize_map")
    if not isinstance(targets, np.ndarray):
        targets = localization_targets(targets, scores.shape[2])
    targets = _check_binary(targets, scores.shape, "localize_map")
    flat = (-1, scores.shape[2])
    return _mean_ap(LocalizeMAP, ranked_ap(scores.reshape(flat), targets.reshape(flat)), "localize_map")


def frame_map(scores, targets, count_empty_classes_as_zero: bool = False) -> FrameMAP:
    """Dense per-frame mAP (x3d-multigrid / Super-Events; NOT the official localization mAP).

    scores, targets: per-video (C, T_v) arrays (model output layout, targets from frame_targets with
    strict=True at dense_frame_times()), or one (C, N) array. AP per class over all frames of all
    videos. Both upstream repos use torchnet's APMeter (unstable sort: ties in arbitrary order; here
    in frame order). Classes without positive frames are left out as Super-Events does; x3d-multigrid
    averages them as 0 (``count_empty_classes_as_zero=True``). Both agree when every class has a positive.
    """
    if isinstance(scores, np.ndarray) and scores.ndim == 2:
        scores, targets = [scores], [targets]
    scores = np.concatenate([np.asarray(s, np.float64) for s in scores], axis=1).T
    targets = np.concatenate([np.asarray(t, np.float64) for t in targets], axis=1).T
    _check_scores(scores, "frame_map")
    targets = _check_binary(targets, scores.shape, "frame_map")
    ap = ranked_ap(scores, targets)
    if count_empty_classes_as_zero:
        ap = np.nan_to_num(ap, nan=0.0)
    return _mean_ap(FrameMAP, ap, "frame_map")


def random_baseline(metric, shape, labels, seeds: int = 10) -> float:
    """Chance level: mean over `seeds` of metric(uniform random scores of `shape`, labels).map."""
    return float(np.mean([metric(np.random.default_rng(s).random(shape), labels).map
                          for s in range(seeds)]))


# ----------------------------------------------------------------------------------------------
# Submission files
# ----------------------------------------------------------------------------------------------

def _write_lines(path, lines: Iterable[str]) -> None:
    """Write lines to path atomically (temp file + rename)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_ids(ids: Sequence[str], n: int) -> None:
    """Submission ids: one per row, non-empty, no whitespace, unique."""
    if len(ids) != n:
        raise ValueError(f"submission: {len(ids)} ids for {n} score rows")
    seen = set()
    for vid in ids:
        if not vid or any(ch.isspace() for ch in vid) or vid in seen:
            raise ValueError(f"submission: bad or duplicate video id {vid!r}")
        seen.add(vid)


def _format_scores(row: np.ndarray) -> str:
    """Scores as the shortest text that reads back to the same float64 (keeps ranks and ties exact)."""
    return " ".join(map(repr, row.tolist()))


def write_classify_submission(path, ids: Sequence[str], scores) -> None:
    """Write an official classification submission: one line ``id score_1 .. score_C`` per video."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"write_classify_submission: scores must be (videos, classes), got {scores.shape}")
    _check_ids(ids, scores.shape[0])
    _check_scores(scores, "write_classify_submission")
    _write_lines(path, (f"{vid} {_format_scores(row)}" for vid, row in zip(ids, scores)))


def write_localize_submission(path, ids: Sequence[str], scores) -> None:
    """Write an official localization submission: ``id framenumber score_1 .. score_C`` for frames 1..25."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 3 or scores.shape[1] != LOCALIZATION_POINTS:
        raise ValueError(f"write_localize_submission: scores must be (videos, {LOCALIZATION_POINTS}, classes), "
                         f"got {scores.shape}")
    _check_ids(ids, scores.shape[0])
    _check_scores(scores, "write_localize_submission")
    _write_lines(path, (f"{vid} {j + 1} {_format_scores(row[j])}"
                        for vid, row in zip(ids, scores) for j in range(LOCALIZATION_POINTS)))


def _parse_scores(tokens: list, where: str) -> np.ndarray:
    """Parse score tokens to float64, naming the first bad one (NaN is rejected, +-inf allowed)."""
    try:
        row = np.array(tokens, dtype=np.float64)
    except ValueError:
        row = None
    if row is None or np.isnan(row).any():
        for k, tok in enumerate(tokens, 1):
            try:
                ok = not np.isnan(float(tok))
            except ValueError:
                ok = False
            if not ok:
                raise CharadesFormatError(f"{where}: score {k} is not a number: {tok!r}")
    return row


def read_submission(kind: str, path, num_classes: int | None = None) -> tuple:
    """Read a classify / localize submission into ({id or (id, frame): scores (C,)}, C).

    Without num_classes, C is the first line's score count and every line must match it.
    """
    if kind not in ("classify", "localize"):
        raise ValueError(f"kind must be 'classify' or 'localize', got {kind!r}")
    lead = 1 if kind == "classify" else 2
    fmt = "id score_1 .. score_C" if kind == "classify" else "id framenumber score_1 .. score_C"
    rows, first = {}, {}
    count_source = "the class list" if num_classes is not None else None
    with _open_text(path, f"{kind} submission") as f:
        for n, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            where = f"{path}, line {n}"
            if len(tokens) <= lead:
                raise CharadesFormatError(f"{where}: expected '{fmt}', found {line.strip()[:80]!r}")
            key = tokens[0]
            if kind == "localize":
                if not re.fullmatch(r"\d+", tokens[1]) or not 1 <= int(tokens[1]) <= LOCALIZATION_POINTS:
                    raise CharadesFormatError(
                        f"{where}: framenumber must be an integer 1..{LOCALIZATION_POINTS} (1-based), "
                        f"found {tokens[1]!r}")
                key = (key, int(tokens[1]))
            if num_classes is None:
                num_classes, count_source = len(tokens) - lead, f"line {n}"
            if len(tokens) - lead != num_classes:
                raise CharadesFormatError(
                    f"{where}: expected {num_classes} scores (as {count_source}), found {len(tokens) - lead}")
            if key in first:
                raise CharadesFormatError(f"{where}: duplicate entry {key!r}, first on line {first[key]}")
            first[key] = n
            rows[key] = _parse_scores(tokens[lead:], where)
    if not rows:
        raise CharadesFormatError(f"{path}: empty submission (expected lines '{fmt}')")
    return rows, num_classes


def _gather(rows: dict, keys: list, num_classes: int, what: str, path) -> np.ndarray:
    """Stack the submission rows of keys (N, C); a missing key is scored -inf as the official scripts do."""
    out = np.full((len(keys), num_classes), -np.inf)
    missing = []
    for i, key in enumerate(keys):
        row = rows.get(key)
        if row is None:
            missing.append(key)
        else:
            out[i] = row
    if missing:
        warnings.warn(f"{path}: {len(missing)} {what} missing from the submission, scored -inf "
                      f"(first: {missing[0]!r})", stacklevel=3)
    extra = len(rows) - (len(keys) - len(missing))
    if extra:
        warnings.warn(f"{path}: {extra} submission lines name {what} not in the annotations, ignored", stacklevel=3)
    return out


def score_submission(kind: str, annotations, submission, classes=None) -> float:
    """Score a submission file against an annotation CSV with the official classify / localize mAP."""
    if isinstance(classes, (str, os.PathLike)):
        classes = read_classes(classes)
    videos = read_charades_csv(annotations, classes)
    rows, num_classes = read_submission(kind, submission, None if classes is None else len(classes))
    if kind == "classify":
        scores = _gather(rows, [v.id for v in videos], num_classes, "videos", submission)
        return classify_map(scores, videos).map
    keys = [(v.id, j) for v in videos for j in range(1, LOCALIZATION_POINTS + 1)]
    scores = _gather(rows, keys, num_classes, "(video, frame) entries", submission)
    return localize_map(scores.reshape(len(videos), LOCALIZATION_POINTS, num_classes), videos).map


# ----------------------------------------------------------------------------------------------
# Datasets: classification clips (span targets, K temporal x 1 or 3 spatial test views) and
# localization clips (per-frame targets aligned with the network's output frames).
# ----------------------------------------------------------------------------------------------

PADDING = -1.0  # per-frame target value of clip positions outside the video (masked out of the loss)


class _FrameList(video_io._Source):
    """The JPEG frames of one Charades video (``<id>-000001.jpg`` ..., contiguous), read like a video."""

    def __init__(self, folder: str, video: CharadesVideo, fps: float):
        """List the folder; raise VideoDecodeError naming the video, its CSV line and the first missing frame."""
        pattern = re.compile(rf"^{re.escape(video.id)}-(\d+)\.(jpe?g|png)$", re.IGNORECASE)
        try:
            names = os.listdir(folder)
        except OSError as e:
            raise VideoDecodeError(folder, f"cannot list frame folder ({e.strerror}); {video.where()}") from None
        numbered = {}
        for name in names:
            m = pattern.match(name)
            if m:
                numbered[int(m.group(1))] = name
        if not numbered:
            raise VideoDecodeError(folder, f"no frames named {video.id}-000001.jpg ...; {video.where()}")
        last = max(numbered)
        if len(numbered) != last or min(numbered) != 1:
            first = next(k for k in range(1, last + 1) if k not in numbered)
            raise VideoDecodeError(
                folder, f"missing frame {os.path.join(folder, f'{video.id}-{first:06d}.jpg')} "
                        f"({last - len(numbered)} of {last} frames missing); {video.where()}")
        self.files = [os.path.join(folder, numbered[k]) for k in range(1, last + 1)]
        self.num_frames, self.fps = last, float(fps)

    @functools.cached_property
    def size(self):
        """(width, height) of the frames, from the first frame's header (read once)."""
        return video_io.image_size(self.files[0])

    @property
    def width(self):
        """Frame width."""
        return self.size[0]

    @property
    def height(self):
        """Frame height."""
        return self.size[1]

    def read(self, indices, *, min_short_side=None):
        """uint8 (T, H, W, 3) frames at in-range `indices`."""
        return read_image_frames([self.files[int(i)] for i in indices], min_short_side=min_short_side)


def clip_positions(start: float, frames: int, step: float) -> np.ndarray:
    """Source-frame positions (frames,) float64 of a clip: start + i * step (PySlowFast Charades ``get_seq_frames``)."""
    return start + np.arange(frames, dtype=np.float64) * step


def interpolate_scores(times, scores, query) -> np.ndarray:
    """Scores (Q, C) at query times (Q,) from per-output scores (C, N) at times (N,) (NaN = padding, dropped).

    Outputs at the same time are averaged; between outputs the scores are interpolated linearly,
    before the first / after the last output they are held constant (np.interp).
    """
    times = np.asarray(times, np.float64).reshape(-1)
    scores = np.asarray(scores, np.float64).reshape(-1, times.size)
    keep = np.isfinite(times)
    if not keep.any():
        raise ValueError("interpolate_scores: no output time inside the video")
    uniq, inverse = np.unique(times[keep], return_inverse=True)
    summed = np.zeros((scores.shape[0], uniq.size))
    np.add.at(summed.T, inverse, scores[:, keep].T)
    mean = summed / np.bincount(inverse, minlength=uniq.size)
    query = np.asarray(query, np.float64).reshape(-1)
    return np.stack([np.interp(query, uniq, row) for row in mean], axis=1)


class CharadesDataset(torch.utils.data.Dataset):
    """Charades clips from ``Charades_v1_rgb/<id>/<id>-NNNNNN.jpg`` frames (or ``<root>/<id>.mp4`` videos,
    ``<root>/<id>.frames`` frame store files).

    mode 'train' takes an int or a multigrid.ClipRequest and returns (clip uint8 (3, T, S, S),
    target, index, failures); 'val' takes an int and returns the same for the centre clip at the
    train crop; 'test' returns (views uint8 (K * spatial_views, 3, T, test_crop, test_crop)
    temporal-major, video labels float32 (C,), index), plus, for target='frames', a dict
    {'times': (K, T) float64 seconds of each clip frame, NaN where the clip runs past the video;
    'num_frames', 'fps'} for localization; views is None for an undecodable video.
    target='clip': float32 (C,) classes active anywhere in the sampled span (span_targets, from the
    first to the last frame read); target='frames': float32 (C, T), frame_targets at each sampled
    frame's time (inclusive bounds, the official localization ones), PADDING (-1) where the clip runs
    past either end of the video.

    Sampling follows PySlowFast's Charades loader: ``rate`` counts frames at ``fps`` (24, the frame
    rate of Charades_v1_rgb; a video file at another rate is stepped by rate * its fps / fps);
    positions start + i * rate, clamped to the video (a 64x2 clip spans 127 frames); training draws
    the rate from [rate, max_rate] and an integer start from [0, n - span] (from [n - span, 0] when
    the clip is longer than the video, so it pads at both ends); test window k of K starts at
    round(k * max(n - span, 0) / (K - 1)), so the first and last views touch the video's ends.
    Spatial augmentation is KineticsDataset's: short side from [round(min * crop / default crop),
    max], random crop, flip; test crops at start / centre / end of the long side.
    """

    def __init__(self, frames_root, annotations, mode="train", *, classes=None, frames=16, rate=5, crop=224,
                 short_side=(256, 320), test_crop=None, temporal_views=10, spatial_views=3, fps=FPS,
                 target="clip", inverse_uniform=False, max_retries=10, seed=0, random_flip=True, log=print):
        """Read the CSV (and class list), find every video under frames_root, log the index report.

        `random_flip=False` turns off the training flip, for classes that a mirror image swaps.
        """
        if mode not in ("train", "val", "test"):
            raise ValueError(f"mode must be 'train', 'val' or 'test', got {mode!r}")
        if target not in ("clip", "frames"):
            raise ValueError(f"target must be 'clip' or 'frames', got {target!r}")
        if spatial_views not in (1, 3):
            raise ValueError(f"spatial_views must be 1 (centre) or 3 (start/centre/end), got {spatial_views}")
        if mode == "train" and not crop <= short_side[0] <= short_side[1]:
            raise ValueError(f"short_side {tuple(short_side)} must satisfy crop {crop} <= min <= max")
        if not os.path.isdir(frames_root):
            raise FileNotFoundError(f"Charades frames root {frames_root} does not exist or is not a folder")
        self.root, self.mode, self.target, self.log = os.fspath(frames_root), mode, target, log
        self.frames, self.rate, self.crop = int(frames), int(rate), int(crop)
        self.short_side, self.inverse_uniform = (int(short_side[0]), int(short_side[1])), bool(inverse_uniform)
        self.test_crop = int(test_crop or crop)
        self.temporal_views, self.spatial_views = int(temporal_views), int(spatial_views)
        self.fps, self.max_retries, self.seed = float(fps), int(max_retries), int(seed)
        self.random_flip = bool(random_flip)
        self.classes = read_classes(classes) if classes else None
        self.num_classes = len(self.classes) if self.classes else NUM_CLASSES
        listed = read_charades_csv(annotations, self.classes)
        for v in listed:
            for cls, _, _ in v.actions:
                _check_class(v, cls, self.num_classes)
        self.videos, self._paths, missing = [], [], []
        for v in listed:
            path = self._find(v.id)
            if path is None:
                missing.append(os.path.join(self.root, v.id, f"{v.id}-000001.jpg"))
            else:
                self.videos.append(v)
                self._paths.append(path)
        self.index_report = {"listed": len(listed), "found": len(self.videos), "missing": len(missing),
                             "first_missing": missing[:10]}
        log(f"charades {mode}: {annotations}: {len(listed)} listed, {len(self.videos)} found under "
            f"{self.root}, {len(missing)} missing" + (f" (first: {', '.join(missing[:3])})" if missing else ""))
        if not self.videos:
            raise ValueError(f"no video of {annotations} found under {self.root}; expected e.g. {missing[0]} "
                             f"(<root>/<id>/<id>-000001.jpg frames, <root>/<id>.mp4 or <root>/<id>.frames)")

    def _find(self, vid: str):
        """The frame folder, video file or frame store file of a video id under the root, or None."""
        folder = os.path.join(self.root, vid)
        if os.path.isdir(folder):
            return folder
        for ext in READABLE_EXTENSIONS:
            if os.path.isfile(folder + ext):
                return folder + ext
        return None

    def __len__(self) -> int:
        """Number of videos found."""
        return len(self.videos)

    def path(self, i: int) -> str:
        """Frame folder or video file of video i."""
        return self._paths[i]

    def labels(self, i: int) -> np.ndarray:
        """Video-level multi-hot labels (C,) float32 of video i."""
        return video_labels([self.videos[i]], self.num_classes)[0]

    def _open(self, i: int):
        """The frames of video i as a source with num_frames, fps and read(); raises VideoDecodeError."""
        path = self._paths[i]
        if os.path.isdir(path):
            return _FrameList(path, self.videos[i], self.fps)
        return open_video(path)

    def __getitem__(self, item):
        """train: ClipRequest or int; val / test: int. See the class docstring for what comes back."""
        if self.mode == "train":
            if isinstance(item, (int, np.integer)):
                seed = int(torch.randint(2**62, ()).item())  # global RNG: DataLoader seeds it per worker
                item = (int(item), self.frames, self.crop, self.rate, seed)
            else:
                item = (int(item.index), int(item.frames), int(item.crop), int(item.max_rate), int(item.seed))
            return self._with_retries(*item)
        if not isinstance(item, (int, np.integer)):
            raise TypeError(f"{self.mode} mode takes an int index, got {item!r}")
        index = int(item)
        if self.mode == "val":
            return self._with_retries(index, self.frames, self.crop, self.rate, self.seed + index)
        try:
            views, info = self._test_views(index)
        except VideoDecodeError as error:
            self.log(f"charades test: excluding {error.path}: {error.reason}")
            views, info = None, None
        out = (views, self.labels(index), index)
        return out + (info,) if self.target == "frames" else out

    def _with_retries(self, index, frames, crop, max_rate, seed):
        """One clip; an undecodable video is replaced by one drawn from the same generator (counted)."""
        check_request(index, frames, crop, max_rate, len(self), self.rate)
        (clip, target), index, failures = video_io.read_with_retries(
            lambda i, g: self._clip(i, frames, crop, max_rate, g), index, len(self), seed,
            self.max_retries, self.log, f"charades {self.mode}")
        return clip, target, index, failures

    def _step(self, video_fps: float, rate: int) -> float:
        """Source frames between two clip frames."""
        return rate * video_fps / self.fps

    def _clip(self, index, frames, crop, max_rate, generator):
        """(uint8 (3, frames, crop, crop), target) of video index (train: random; val: centre)."""
        with self._open(index) as src:
            n = src.num_frames
            if self.mode == "train":
                rate = int(torch.randint(self.rate, max_rate + 1, (), generator=generator).item())
                step = self._step(src.fps, rate)
                lo, hi = sorted((0, int(math.floor(n - 1 - (frames - 1) * step))))
                start = int(torch.randint(lo, hi + 1, (), generator=generator).item())
            else:
                step = self._step(src.fps, self.rate)
                start = int(math.floor((n - 1 - (frames - 1) * step) / 2))
            pos = clip_positions(start, frames, step)
            idx = np.clip(np.floor(pos), 0, n - 1).astype(np.int64)
            if self.mode == "train":  # spatial draws before decoding: decode no larger than they need
                short_range = T.multigrid_short_side_range(self.short_side, crop, self.crop)
                clip, plan = read_drawn(src, idx, lambda height, width: T.draw_train_crop(
                    height, width, crop, short_range, generator, self.inverse_uniform, self.random_flip), generator)
            else:
                clip, plan = src.read(idx, min_short_side=crop), None
        target = self._target(index, pos, idx, n, src.fps)
        if plan is None:
            return T.to_cthw(T.scale_uniform_crop(clip, crop, 1)), target
        return T.apply_train_crop(clip, plan, crop), target

    def _target(self, index, pos, idx, n, fps):
        """span_targets over the frames read (target='clip') or per-frame targets with PADDING (target='frames')."""
        video = self.videos[index]
        if self.target == "clip":
            return torch.from_numpy(span_targets(video, idx[0] / fps, idx[-1] / fps, self.num_classes))
        out = frame_targets(video, idx / fps, self.num_classes)
        out[:, (pos < 0) | (pos > n - 1)] = PADDING
        return torch.from_numpy(out)

    def _test_views(self, index):
        """(uint8 (K * spatial, 3, T, S, S) temporal-major, {'times' (K, T), 'num_frames', 'fps'})."""
        k_views = self.temporal_views
        with self._open(index) as src:
            n, step = src.num_frames, self._step(src.fps, self.rate)
            gap = max(n - 1 - (self.frames - 1) * step, 0.0)
            starts = [round(gap / (k_views - 1) * k) for k in range(k_views)] if k_views > 1 else [int(gap // 2)]
            pos = np.stack([clip_positions(s, self.frames, step) for s in starts])
            idx = np.clip(np.floor(pos), 0, n - 1).astype(np.int64)
            frames = src.read(idx.reshape(-1), min_short_side=self.test_crop)
            fps = src.fps
        times = np.where((pos < 0) | (pos > n - 1), np.nan, idx / fps)
        views = T.multi_view_crops(frames, self.frames, self.test_crop, self.spatial_views)
        return views, {"times": times, "num_frames": n, "fps": fps}


def collate_test(batch):
    """DataLoader collate_fn for test mode: (views (B, V, 3, T, S, S) uint8, labels (B, C) float32,
    indices (B,) int64, failed indices[, infos]); undecodable videos are dropped and listed in failed.
    The infos list (per-video dicts) comes only from target='frames' datasets."""
    good = [s for s in batch if s[0] is not None]
    failed = [int(s[2]) for s in batch if s[0] is None]
    views = torch.stack([s[0] for s in good]) if good else torch.empty(0, dtype=torch.uint8)
    labels = torch.from_numpy(np.stack([s[1] for s in good])) if good else torch.empty(0)
    indices = torch.tensor([s[2] for s in good], dtype=torch.int64)
    out = (views, labels, indices, failed)
    return out + ([s[3] for s in good],) if batch and len(batch[0]) == 4 else out


# ----------------------------------------------------------------------------------------------
# Datasets from a training script's settings (train_x3d_charades.py, train_x3d_charades_loc.py)
# ----------------------------------------------------------------------------------------------

def _dataset_of(cfg, annotations_flag: str, mode: str, target: str, log) -> CharadesDataset:
    """One CharadesDataset of the settings; a missing path is a ValueError naming its flag."""
    annotations = getattr(cfg, annotations_flag.replace("-", "_"))
    for flag, path in (("frames-root", cfg.frames_root), ("class-list", cfg.class_list),
                       (annotations_flag, annotations)):
        if path and not os.path.exists(path):
            raise ValueError(f"Charades --{flag} {path!r} does not exist: set --{flag} (or the "
                             "constant at the top of the script), or run --demo")
    return CharadesDataset(
        cfg.frames_root, annotations, mode, classes=cfg.class_list or None, frames=cfg.frames,
        rate=cfg.rate, crop=cfg.crop, short_side=tuple(cfg.short_side), test_crop=cfg.test_crop,
        temporal_views=cfg.test_temporal_views, spatial_views=cfg.test_spatial_views, fps=cfg.fps,
        target=target, inverse_uniform=cfg.inverse_uniform, seed=cfg.seed,
        random_flip=cfg.random_flip, log=log)


# The path settings of the Charades scripts in the order of their flags: all of them for training,
# the test-data ones for --eval-only (checked before anything is read, see trainer.check_paths).
DATA_SETTINGS = ("frames_root", "train_annotations", "test_annotations", "class_list")
TEST_DATA = ("frames_root", "test_annotations", "class_list")


def build_datasets(cfg, log, test_only: bool = False, target: str = "clip") -> tuple:
    """(train, val, test) of a training script's settings; val (centre clips) and test (all views) read the test CSV.

    target: 'clip' (classification) or 'frames' (localization). Bad paths or files: ValueError.
    """
    test = _dataset_of(cfg, "test-annotations", "test", target, log)
    if test_only:
        return None, None, test
    train = _dataset_of(cfg, "train-annotations", "train", target, log)
    val = _dataset_of(cfg, "test-annotations", "val", target, log)
    if train.num_classes != test.num_classes:
        raise ValueError(f"{cfg.train_annotations} and {cfg.test_annotations} disagree on the class "
                         f"count ({train.num_classes} vs {test.num_classes})")
    return train, val, test


def use_demo_dataset(cfg, root: str, **dataset) -> None:
    """--demo: write the synthetic Charades-format dataset under root; point the settings' paths at it.

    dataset: options of synthetic_data.make_charades (classes, difficulty, ...).
    """
    import synthetic_data
    paths = synthetic_data.make_charades(root, overwrite=True, workers=os.cpu_count() or 1, progress=True,
                                         **dataset)
    cfg.frames_root, cfg.class_list = paths["frames_root"], paths["classes"]
    cfg.train_annotations, cfg.test_annotations = paths["train_csv"], paths["test_csv"]


def main(argv=None) -> int:
    """Command line: score a submission file and print 'mAP: <fraction>'."""
    parser = argparse.ArgumentParser(
        description="Score a Charades submission with the official Charades_v1_classify / "
                    "Charades_v1_localize mAP; prints 'mAP: <fraction>'.")
    parser.add_argument("kind", choices=("classify", "localize"))
    parser.add_argument("--annotations", required=True, help="Charades_v1_test.csv")
    parser.add_argument("--submission", required=True, help="submission file written by this repo or another")
    parser.add_argument("--classes", default=None,
                        help="Charades_v1_classes.txt; without it the class count comes from the submission")
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = score_submission(args.kind, args.annotations, args.submission, args.classes)
        except (CharadesFormatError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"mAP: {value:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
