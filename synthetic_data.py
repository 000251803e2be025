"""The embedded default: synthetic action datasets written in the real Kinetics and Charades formats.

Every class is a *motion* of a textured object over a random textured background, so one frame
cannot tell the classes apart and a 3D network has to use time. The pool of classes, in the order
`num_classes` takes them (S = the frame's short side, speeds before the difficulty's jitter):

- moving left / right / up / down: translates at 0.3 S per second. Positions live on a torus box
  (0.15 S inside the frame edges), so an object that leaves at one side re-enters at the other.
- rotating clockwise / counterclockwise: turns about its centre at 150 degrees per second (as seen on screen).
- growing / shrinking: its size runs a sawtooth between 0.75x and 1.33x its base size, 1.2 s per tooth.
- oscillating horizontally / vertically: swings about a point, amplitude 0.12 S, 1.5 Hz (inside the box).
- orbiting clockwise / counterclockwise: circles a point, radius 0.10 S, 1 Hz (inside the box).

Single frames carry no label: positions are uniform over the same box for every class (swings and
orbits are squeezed inside it, which rounds their position law off near its edges only), sizes
follow the same log-uniform law (what a sawtooth shows at a random time), angles are uniform, and
each pair of opposite classes is the other one played backwards. Objects are star-shaped blobs with
an elongated outline (so rotation shows) and a random plaid texture in random colours; every object
also jitters a little ("idle" motion, an Ornstein-Uhlenbeck wobble), and `Difficulty` adds distractor
objects that only jitter, per-frame pixel noise and speed jitter. `Difficulty.actors` puts several
objects in a Kinetics video, all performing its class motion: the CPU demo uses 3, because X3D's
global pooling averages a small moving object away and the loss then sits at ln(classes) for
hundreds of iterations before it finds the motion (measured: X3D-XS 4x34 on 512 demo clips left
that plateau about 40% sooner with 3 actors than with 1).

Kinetics layout (`make_kinetics`): `<root>/{train,val}/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4`
(H.264, yuv420p, 30 fps, one keyframe every `keyframe_interval` frames, scene-cut keyframes off),
`<root>/annotations/{train,validate}.csv` with header `label,youtube_id,time_start,time_end,split`
(split `train` / `val` as in the official files; labels containing spaces are quoted, as there), and
`<root>/annotations/classes.txt` (alphabetical, one name a line).
Charades layout (`make_charades`): `<root>/Charades_v1_rgb/<id>/<id>-000001.jpg` (24 fps JPEGs),
`<root>/Charades_v1_{train,test}.csv` with the official 11 columns and `actions` like
`c003 1.20 3.40;c001 0.00 2.10`, and `<root>/Charades_v1_classes.txt` (`c000 moving left`).
Each action is one object that performs its class motion during [start, end] and only jitters
outside it; every video also holds one jittering object, so the frames between actions still move.

Generation is deterministic from the seed (each video from its own seed, so the worker count does not
change a byte on one machine), every file is written to a temporary name and renamed, and
`<root>/synthetic_<kind>.json` is written last. Calling again with the same configuration is a no-op
on a complete dataset and resumes an interrupted one (finished files are kept); a different
configuration is refused unless `overwrite=True`, which deletes only this generator's own outputs. A
directory that holds this kind's outputs without this generator's markers is always refused.

Defaults, measured on the 2-core CPU machine (one process, load average about 4 from other jobs):
Kinetics 10 classes x (50 train + 10 val) videos of 2 s at 30 fps, 128x96: 600 mp4s, 7.5 MB, 60 s;
Charades 10 classes, 160 train + 40 test videos of 3-6 s at 24 fps, 128x96: 21,359 JPEGs, 69 MB, 36 s.
"""
import argparse
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import string
import sys
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction

import numpy as np

FORMAT_VERSION = 1

# name -> (kind, parameter): translation direction (x, y) in image coordinates (y points down),
# rotation / scale / orbit sign (+1 = clockwise on screen or growing), oscillation axis.
MOTIONS = {
    "moving left": ("translate", (-1.0, 0.0)),
    "moving right": ("translate", (1.0, 0.0)),
    "moving up": ("translate", (0.0, -1.0)),
    "moving down": ("translate", (0.0, 1.0)),
    "rotating clockwise": ("rotate", 1.0),
    "rotating counterclockwise": ("rotate", -1.0),
    "growing": ("scale", 1.0),
    "shrinking": ("scale", -1.0),
    "oscillating horizontally": ("oscillate", (1.0, 0.0)),
    "oscillating vertically": ("oscillate", (0.0, 1.0)),
    "orbiting clockwise": ("orbit", 1.0),
    "orbiting counterclockwise": ("orbit", -1.0),
}
CLASS_POOL = tuple(MOTIONS)
# The CPU demos' classes (Kinetics and Charades): three motions of different kind (README says why).
DEMO_MOTIONS = ("moving right", "rotating clockwise", "growing")

TRANSLATE_SPEED = 0.30      # short sides per second
ROTATE_SPEED = math.radians(150.0)  # radians per second
LOG_SCALE_RANGE = (math.log(0.75), math.log(4.0 / 3.0))
SCALE_PERIOD = 1.2          # seconds per sawtooth tooth
OSCILLATE_AMPLITUDE = 0.12  # short sides
OSCILLATE_FREQUENCY = 1.5   # Hz
ORBIT_RADIUS = 0.10         # short sides
ORBIT_FREQUENCY = 1.0       # Hz
BASE_RADIUS = (0.10, 0.14)  # object radius before its log scale, in short sides
IDLE_RATE = 3.0             # 1/s, mean reversion of the idle wobble
BOX_MARGIN = 0.15           # short sides between the torus box and the frame edge

KINETICS_OUTPUTS = ("train", "val", "annotations")
CHARADES_OUTPUTS = ("Charades_v1_rgb", "Charades_v1_train.csv", "Charades_v1_test.csv",
                    "Charades_v1_classes.txt")
KINETICS_HEADER = ("label", "youtube_id", "time_start", "time_end", "split")
CHARADES_HEADER = ("id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
                   "descriptions", "actions", "length")
YOUTUBE_ALPHABET = string.ascii_letters + string.digits + "_-"
CHARADES_ALPHABET = string.ascii_uppercase + string.digits
SCENES = ("Stripes", "Clouds", "Plaid", "Marble", "Waves", "Mottled")
TMP_TAG = ".tmp-"


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How hard the motion task is: speed jitter, distractors, noise, idle wobble, contrast, speed, size."""

    speed_jitter: float = 0.2       # each motion's speed is scaled by U(1 - j, 1 + j)
    distractors: tuple = (0, 1)     # inclusive range of jitter-only extra objects per video
    noise: float = 1.0              # std of per-frame Gaussian pixel noise (0..255 scale)
    idle_motion: float = 0.6        # std of the idle position wobble, pixels (angle: degrees x 2)
    min_contrast: float = 75.0      # minimum RGB distance between object and background mean colours
    speed: float = 1.0              # every class motion runs this many times faster
    size: float = 1.0               # objects are this many times larger
    actors: int = 1                 # Kinetics: objects that perform the video's class motion together


DIFFICULTIES = {
    "easy": Difficulty(speed_jitter=0.1, distractors=(0, 0), noise=0.0, idle_motion=0.3, min_contrast=90.0),
    "medium": Difficulty(),
    "hard": Difficulty(speed_jitter=0.4, distractors=(1, 3), noise=6.0, idle_motion=2.5, min_contrast=35.0),
    # The CPU demo's: large objects moving fast, so X3D-XS learns the motions in minutes from scratch.
    "demo": Difficulty(speed_jitter=0.1, distractors=(0, 0), noise=0.0, idle_motion=0.3, min_contrast=90.0,
                       speed=2.0, size=1.6, actors=3),
}


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """Everything needed to render one video: seed, size, frame count and its (motion, start s, end s) actions."""

    entropy: tuple
    width: int
    height: int
    fps: int
    frames: int
    actions: tuple
    difficulty: Difficulty
    idle_objects: int = 0


def resolve_difficulty(difficulty):
    """Return a `Difficulty` from a preset name, a dict of fields or a `Difficulty`."""
    if isinstance(difficulty, Difficulty):
        return difficulty
    if isinstance(difficulty, str):
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"unknown difficulty {difficulty!r}: use one of {sorted(DIFFICULTIES)}")
        return DIFFICULTIES[difficulty]
    if isinstance(difficulty, dict):
        fields = {f.name for f in dataclasses.fields(Difficulty)}
        unknown = sorted(set(difficulty) - fields)
        if unknown:
            raise ValueError(f"unknown difficulty field(s) {unknown}: known fields are {sorted(fields)}")
        values = dict(difficulty)
        if "distractors" in values:
            values["distractors"] = tuple(values["distractors"])
        return Difficulty(**values)
    raise ValueError(f"difficulty must be a name, a dict or a Difficulty, got {difficulty!r}")


def parse_difficulty(text: str) -> Difficulty:
    """A `Difficulty` from command-line text: a preset name, then optional field=value overrides.

    "demo" is the CPU demo's preset; "demo,speed=1.5,actors=2" changes two of its fields;
    distractors take a range as low:high ("medium,distractors=1:3").
    """
    name, *overrides = [part.strip() for part in text.split(",")]
    values = dataclasses.asdict(resolve_difficulty(name))
    kinds = {f.name: f.type for f in dataclasses.fields(Difficulty)}
    for item in overrides:
        field, sep, value = item.partition("=")
        field = field.strip()
        if not sep or field not in kinds:
            raise ValueError(f"difficulty override {item!r}: expected field=value with a field from {sorted(kinds)}")
        try:
            if field == "distractors":
                low, high = (int(v) for v in value.split(":"))
                values[field] = (low, high)
            else:
                values[field] = int(value) if kinds[field] is int else float(value)
        except ValueError:
            raise ValueError(f"difficulty override {item!r}: {value!r} is not a "
                             f"{'low:high range of integers' if field == 'distractors' else 'number'}") from None
    return Difficulty(**values)


def parse_classes(text: str):
    """Command-line classes: a count ("10": the first N of CLASS_POOL) or comma-separated names; an int or a list."""
    if text.strip().isdigit():
        return int(text)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MOTIONS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"classes {text!r}: give a count or distinct comma-separated names from {list(CLASS_POOL)}"
                         + (f" ({unknown} unknown)" if unknown else ""))
    return names


def class_arguments(classes) -> dict:
    """`make_kinetics` / `make_charades` keyword for a `parse_classes` result: num_classes=N or classes=[names]."""
    return {"num_classes": classes} if isinstance(classes, int) else {"classes": list(classes)}


# ----------------------------------------------------------------------------------------------
# rendering


def _plaid(rng, waves, frequency):
    """Random plaid texture parameters: `waves` sinusoids with random direction, frequency and phase."""
    angles = rng.uniform(0.0, 2.0 * math.pi, waves)
    freqs = rng.uniform(*frequency, waves) * 2.0 * math.pi
    return np.stack([freqs * np.cos(angles), freqs * np.sin(angles), rng.uniform(0, 2 * math.pi, waves)], 1)


def _plaid_value(params, u, v):
    """Evaluate a plaid at coordinates (u, v); values in [0, 1]."""
    total = np.zeros(np.broadcast(u, v).shape, np.float32)
    for kx, ky, phase in params:
        total += np.sin(kx * u + ky * v + phase)
    return total * (0.5 / len(params)) + 0.5


def _smooth_noise(rng, height, width, cells):
    """Bilinearly upsampled random grid of `cells` x `cells` values in [0, 1]."""
    grid = rng.uniform(0.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    ys = np.linspace(0, cells, height, dtype=np.float32)
    xs = np.linspace(0, cells, width, dtype=np.float32)
    rows = np.stack([np.interp(xs, np.arange(cells + 1), g) for g in grid])
    return np.stack([np.interp(ys, np.arange(cells + 1), rows[:, i]) for i in range(width)], 1)


def _palette(rng, reference, min_contrast):
    """Two random RGB colours whose mean is at least `min_contrast` from `reference` (best of 100 draws)."""
    best, best_distance = None, -1.0
    for _ in range(100):
        colours = rng.uniform(0.0, 255.0, (2, 3)).astype(np.float32)
        if np.linalg.norm(colours[0] - colours[1]) < 40.0:
            continue
        distance = float(np.linalg.norm(colours.mean(0) - reference)) if reference is not None else 1e9
        if distance >= min_contrast:
            return colours
        if distance > best_distance:
            best, best_distance = colours, distance
    return best if best is not None else colours


def _background(rng, width, height):
    """A static random texture in two random colours, float32 (H, W, 3)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    plaid = _plaid_value(_plaid(rng, int(rng.integers(2, 4)), (1 / 40, 1 / 10)), xx, yy)
    noise = _smooth_noise(rng, height, width, int(rng.integers(3, 10)))
    mix = rng.uniform(0.3, 0.7)
    value = mix * plaid + (1 - mix) * noise
    colours = _palette(rng, None, 0.0)
    return colours[0] + (colours[1] - colours[0]) * value[..., None]


def _wrap(value, low, high):
    """Wrap a coordinate onto the torus interval [low, high)."""
    return low + (value - low) % (high - low)


class _Object:
    """One textured blob: appearance, rest pose, idle wobble track and (optionally) its class motion."""

    def __init__(self, rng, spec, background_mean, motion=None, start=0.0, end=0.0):
        short = min(spec.width, spec.height)
        difficulty = spec.difficulty
        self.short, self.motion, self.start, self.end = short, motion, start, end
        self.base_radius = short * rng.uniform(*BASE_RADIUS) * difficulty.size
        self.harmonics = np.array([[k, a, rng.uniform(0, 2 * math.pi)] for k, a in
                                   ((2, rng.uniform(0.25, 0.4)), (3, rng.uniform(0.0, 0.15)),
                                    (4, rng.uniform(0.0, 0.1)))], np.float32)
        self.reach = 1.0 + float(self.harmonics[:, 1].sum())
        self.colours = _palette(rng, background_mean, difficulty.min_contrast)
        self.texture = _plaid(rng, int(rng.integers(2, 4)), (0.6, 1.8))
        margin = BOX_MARGIN * short
        self.box = (margin, spec.width - margin, margin, spec.height - margin)
        self.centre = np.array([rng.uniform(self.box[0], self.box[1]), rng.uniform(self.box[2], self.box[3])])
        self.angle = rng.uniform(0, 2 * math.pi)
        self.log_scale = rng.uniform(*LOG_SCALE_RANGE)
        self.speed = rng.uniform(1 - difficulty.speed_jitter, 1 + difficulty.speed_jitter) * difficulty.speed
        self.phase = rng.uniform(0, 2 * math.pi)
        self.wobble = self._idle_track(rng, spec)

    @staticmethod
    def _idle_track(rng, spec):
        """Ornstein-Uhlenbeck wobble (dx px, dy px, dangle rad) per frame with stationary std = idle_motion."""
        kappa = min(IDLE_RATE / spec.fps, 1.0)
        sigma = math.sqrt(2 * kappa - kappa * kappa)
        steps = rng.standard_normal((spec.frames, 3)) * sigma
        track = np.zeros((spec.frames, 3))
        state = rng.standard_normal(3)
        for i in range(spec.frames):
            state = state * (1 - kappa) + steps[i]
            track[i] = state
        return track * np.array([1.0, 1.0, math.radians(2.0)]) * spec.difficulty.idle_motion

    def _inside(self, reach):
        """The rest centre squeezed into the box shrunk by `reach` (x, y pixels), so a swing never wraps."""
        low, high = np.array(self.box[0::2]), np.array(self.box[1::2])
        return low + reach + (self.centre - low) * (high - low - 2 * reach) / (high - low)

    def pose(self, index, fps):
        """Centre x, y (pixels), angle (radians) and radius (pixels) at frame `index`."""
        tau = min(max(index / fps - self.start, 0.0), self.end - self.start) * self.speed
        centre, angle, log_scale = self.centre.copy(), self.angle, self.log_scale
        kind, parameter = MOTIONS[self.motion] if self.motion else (None, None)
        if kind == "translate":
            centre += np.array(parameter) * TRANSLATE_SPEED * self.short * tau
        elif kind == "rotate":
            angle += parameter * ROTATE_SPEED * tau
        elif kind == "scale":
            low, high = LOG_SCALE_RANGE
            log_scale = _wrap(log_scale + parameter * (high - low) / SCALE_PERIOD * tau, low, high)
        elif kind == "oscillate":
            centre = self._inside(np.abs(parameter) * OSCILLATE_AMPLITUDE * self.short)
            swing = math.sin(2 * math.pi * OSCILLATE_FREQUENCY * tau + self.phase)
            centre += np.array(parameter) * OSCILLATE_AMPLITUDE * self.short * swing
        elif kind == "orbit":
            centre = self._inside(np.full(2, ORBIT_RADIUS * self.short))
            turn = self.phase + parameter * 2 * math.pi * ORBIT_FREQUENCY * tau
            centre += ORBIT_RADIUS * self.short * np.array([math.cos(turn), math.sin(turn)])
        x = _wrap(centre[0], self.box[0], self.box[1]) + self.wobble[index, 0]
        y = _wrap(centre[1], self.box[2], self.box[3]) + self.wobble[index, 1]
        return x, y, angle + self.wobble[index, 2], self.base_radius * math.exp(log_scale)

    def draw(self, frame, index, fps):
        """Alpha-blend the object at frame `index` into `frame` (float32 H, W, 3) in place."""
        cx, cy, angle, radius = self.pose(index, fps)
        height, width = frame.shape[:2]
        reach = radius * self.reach + 1.5
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, width)
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, height)
        if x0 >= x1 or y0 >= y1:
            return
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
        cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        u = (cos * dx + sin * dy) / np.float32(radius)
        v = (cos * dy - sin * dx) / np.float32(radius)
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        boundary = np.ones_like(phi)
        for k, amplitude, phase in self.harmonics:
            boundary += amplitude * np.cos(k * phi + phase)
        alpha = np.clip((boundary - rho) * np.float32(radius) + 0.5, 0.0, 1.0)[..., None]
        colour = self.colours[0] + (self.colours[1] - self.colours[0]) * _plaid_value(self.texture, u, v)[..., None]
        region = frame[y0:y1, x0:x1]
        region += alpha * (colour - region)


def render_video(spec, draw_objects=True):
    """Render a `VideoSpec` to uint8 frames (T, H, W, 3) RGB; `draw_objects=False` gives the bare background."""
    rng = np.random.default_rng(np.random.SeedSequence(list(spec.entropy)))
    background = _background(rng, spec.width, spec.height)
    mean = background.reshape(-1, 3).mean(0)
    low, high = spec.difficulty.distractors
    extra = int(rng.integers(low, high + 1)) + spec.idle_objects
    idle = [_Object(rng, spec, mean) for _ in range(extra)]
    actors = [_Object(rng, spec, mean, motion, start, end) for motion, start, end in spec.actions]
    frames = np.empty((spec.frames, spec.height, spec.width, 3), np.float32)
    for index in range(spec.frames):
        frames[index] = background
        if draw_objects:
            for obj in idle + actors:
                obj.draw(frames[index], index, spec.fps)
    if spec.difficulty.noise > 0:
        frames += rng.standard_normal(frames.shape, np.float32) * np.float32(spec.difficulty.noise)
    frames += 0.5
    return np.clip(frames, 0, 255, out=frames).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# writing files atomically


def _temp_path(path):
    """A hidden temporary sibling of `path` that `_clean_temporaries` recognises."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}{TMP_TAG}{os.getpid()}")


def _write_text(path, text):
    """Write a text file atomically."""
    tmp = _temp_path(path)
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def rgb_to_yuv420p(image):
    """BT.601 limited-range conversion of uint8 RGB (H, W, 3) to a planar yuv420p array (H * 3 / 2, W).

    Done here rather than by the encoder's swscale so the bytes fed to x264 do not depend on the FFmpeg build
    (PyAV's in-encoder conversion even differed between the first and later files of one process).
    """
    rgb = image.astype(np.float32)
    height, width = image.shape[:2]
    luma = rgb @ np.array([65.481, 128.553, 24.966], np.float32) / 255 + 16
    pooled = rgb.reshape(height // 2, 2, width // 2, 2, 3).mean((1, 3))
    chroma = pooled @ np.array([[-37.797, 112.0], [-74.203, -93.786], [112.0, -18.214]], np.float32) / 255 + 128
    planes = np.concatenate([luma.ravel(), chroma[..., 0].ravel(), chroma[..., 1].ravel()])
    return np.clip(planes + 0.5, 0, 255).astype(np.uint8).reshape(height * 3 // 2, width)


def write_mp4(path, frames, fps, keyframe_interval, crf=20):
    """Encode uint8 RGB frames (T, H, W, 3) to an H.264 yuv420p mp4 with a fixed keyframe interval, atomically."""
    import av

    tmp = _temp_path(path)
    with av.open(tmp, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        # mbtree off: with it, x264's SIMD code made the bytes depend on leftover heap contents (measured:
        # 64x48, 96x72, 32x32 gave different files on repeated encodes in one process); without it, never.
        stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params":
                          f"keyint={keyframe_interval}:min-keyint={keyframe_interval}:scenecut=0:mbtree=0"}
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(image), format="yuv420p")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    os.replace(tmp, path)


def write_jpegs(folder, video_id, frames, quality=90):
    """Write frames as `<folder>/<id>-000001.jpg`..., into a temporary folder renamed at the end."""
    import simplejpeg

    tmp = _temp_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for index, image in enumerate(frames, 1):
        data = simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="RGB",
                                      colorsubsampling="420")
        with open(os.path.join(tmp, f"{video_id}-{index:06d}.jpg"), "wb") as handle:
            handle.write(data)
    os.rename(tmp, folder)


def _remove(path):
    """Delete a file or a folder tree if it exists."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _clean_temporaries(root, names):
    """Remove temporary files / folders a killed run left in `root` next to or inside its outputs `names`."""
    for name in os.listdir(root):
        if name.startswith(".") and TMP_TAG in name and name[1:].split(TMP_TAG)[0] in names:
            _remove(os.path.join(root, name))
    for name in names:
        for folder, dirs, files in os.walk(os.path.join(root, name)):
            for entry in files + dirs:
                if entry.startswith(".") and TMP_TAG in entry:
                    _remove(os.path.join(folder, entry))


def _render_job(job):
    """Worker entry: render one video and write it (mp4 file or JPEG folder); skip finished outputs."""
    kind, spec, path, options = job
    if os.path.exists(path):
        return path
    frames = render_video(spec)
    if kind == "mp4":
        write_mp4(path, frames, spec.fps, options["keyframe_interval"])
    else:
        write_jpegs(path, os.path.basename(path), frames)
    return path


def _run_jobs(jobs, workers, progress, description):
    """Run render jobs in order, on `workers` spawned processes when > 1, with optional progress.

    Progress (`progress.Progress`): a tqdm bar in a terminal, plain lines with the time left otherwise.
    """
    from progress import Progress

    bar = Progress(len(jobs), description, unit="videos", active=progress)
    if workers <= 1:
        for job in jobs:
            _render_job(job)
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            for _ in pool.map(_render_job, jobs, chunksize=1):
                bar.update()
    bar.close()


# ----------------------------------------------------------------------------------------------
# manifests: no-op, resume, refuse


def _prepare_root(root, kind, config, outputs, overwrite):
    """Decide what to do with `root`: return True when the dataset is complete, else get it ready to (re)generate."""
    manifest = os.path.join(root, f"synthetic_{kind}.json")
    partial = os.path.join(root, f"synthetic_{kind}.partial.json")
    recorded = None
    for marker in (manifest, partial):
        if os.path.exists(marker):
            try:
                with open(marker, encoding="utf-8") as handle:
                    recorded = json.load(handle)["config"]
            except (ValueError, KeyError) as error:
                raise ValueError(f"{marker} is not a valid generator manifest ({error!r}); delete it and the "
                                 f"dataset beside it, or choose another directory") from error
            break
    present = [name for name in outputs if os.path.exists(os.path.join(root, name))]
    if recorded is None and present:
        raise ValueError(f"{root} already holds {present} but no {os.path.basename(manifest)}: it is not a "
                         f"dataset this generator wrote, so it will not touch it; choose a new or empty --out")
    if recorded is not None and recorded != config:
        if not overwrite:
            changed = sorted(k for k in set(config) | set(recorded) if config.get(k) != recorded.get(k))
            raise ValueError(f"{root} holds a synthetic {kind} dataset made with different settings "
                             f"({', '.join(f'{k}: {recorded.get(k)!r} -> {config.get(k)!r}' for k in changed)}); "
                             f"pass overwrite=True (--overwrite) to replace it, or choose another directory")
        for path in [os.path.join(root, name) for name in outputs] + [manifest, partial]:
            _remove(path)
        recorded = None
    if recorded is not None and os.path.exists(manifest):
        return True
    os.makedirs(root, exist_ok=True)
    _clean_temporaries(root, outputs + (os.path.basename(manifest), os.path.basename(partial)))
    _write_text(partial, json.dumps({"generator": "synthetic_data.py", "config": config}, indent=1))
    return False


def _finish(root, kind, config, counts):
    """Write the manifest last (atomically) and drop the partial marker."""
    _write_text(os.path.join(root, f"synthetic_{kind}.json"),
                json.dumps({"generator": "synthetic_data.py", "config": config, "counts": counts}, indent=1))
    os.remove(os.path.join(root, f"synthetic_{kind}.partial.json"))


def _check_common(size, fps, classes, num_classes, seed):
    """Validate size / fps / class choice / seed shared by both datasets; return (width, height, class names)."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    width, height = (int(v) for v in size)
    if width % 2 or height % 2 or min(width, height) < 32:
        raise ValueError(f"size must be (width, height), both even and >= 32 for yuv420p, got {tuple(size)}")
    if int(fps) < 1:
        raise ValueError(f"fps must be a positive integer, got {fps}")
    if classes is None:
        if not 1 <= num_classes <= len(CLASS_POOL):
            raise ValueError(f"num_classes must be in 1..{len(CLASS_POOL)}, got {num_classes}")
        classes = CLASS_POOL[:num_classes]
    unknown = [name for name in classes if name not in MOTIONS]
    if unknown or len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct names from {list(CLASS_POOL)}, got {list(classes)}")
    return width, height, list(classes)


def _random_ids(rng, count, length, alphabet):
    """`count` distinct random strings of `length` characters from `alphabet`."""
    ids, seen = [], set()
    while len(ids) < count:
        candidate = "".join(rng.choice(list(alphabet), length))
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


# ----------------------------------------------------------------------------------------------
# Kinetics


def plan_kinetics(*, classes, train_per_class, val_per_class, seconds, fps, size, difficulty, seed):
    """The Kinetics videos as dicts (split, label, youtube_id, time_start, time_end, spec), deterministic in seed."""
    width, height = size
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, 0]))
    per_split = (("train", train_per_class), ("val", val_per_class))
    total = len(classes) * (train_per_class + val_per_class)
    ids = iter(_random_ids(rng, total, 11, YOUTUBE_ALPHABET))
    videos = []
    for split_index, (split, count) in enumerate(per_split):
        for label in sorted(classes):
            for _ in range(count):
                start = int(rng.integers(0, 300))
                entropy = (seed, 1, split_index + 1, len(videos))
                spec = VideoSpec(entropy, width, height, fps, seconds * fps,
                                 ((label, 0.0, float(seconds)),) * difficulty.actors, difficulty)
                videos.append(dict(split=split, label=label, youtube_id=next(ids), time_start=start,
                                   time_end=start + seconds, spec=spec))
    return videos


def kinetics_csv_text(rows):
    """Official Kinetics CSV text: header, then rows; labels with spaces (or quotes, commas) are quoted."""
    lines = [",".join(KINETICS_HEADER)]
    for row in rows:
        label = row["label"]
        if any(ch in label for ch in ' ,"'):
            label = '"' + label.replace('"', '""') + '"'
        lines.append(f"{label},{row['youtube_id']},{row['time_start']},{row['time_end']},{row['split']}")
    return "\n".join(lines) + "\n"


def make_kinetics(root, *, num_classes=10, classes=None, train_per_class=50, val_per_class=10, seconds=2,
                  fps=30, size=(128, 96), keyframe_interval=250, difficulty="medium", seed=0, workers=1,
                  overwrite=False, progress=False):
    """Generate (or find complete) a synthetic Kinetics-format dataset under `root`; return its paths as a dict."""
    width, height, classes = _check_common(size, fps, classes, num_classes, seed)
    for name, value, minimum in (("train_per_class", train_per_class, 1), ("val_per_class", val_per_class, 1),
                                 ("seconds", seconds, 1), ("keyframe_interval", keyframe_interval, 1)):
        if int(value) != value or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    difficulty = resolve_difficulty(difficulty)
    root = os.path.abspath(root)
    paths = dict(root=root, train_root=os.path.join(root, "train"), val_root=os.path.join(root, "val"),
                 train_csv=os.path.join(root, "annotations", "train.csv"),
                 val_csv=os.path.join(root, "annotations", "validate.csv"),
                 classes=os.path.join(root, "annotations", "classes.txt"),
                 manifest=os.path.join(root, "synthetic_kinetics.json"))
    config = dict(format_version=FORMAT_VERSION, classes=sorted(classes), train_per_class=train_per_class,
                  val_per_class=val_per_class, seconds=seconds, fps=fps, size=[width, height],
                  keyframe_interval=keyframe_interval, difficulty=dataclasses.asdict(difficulty), seed=seed)
    config = json.loads(json.dumps(config))
    if _prepare_root(root, "kinetics", config, KINETICS_OUTPUTS, overwrite):
        return paths
    videos = plan_kinetics(classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                           seconds=seconds, fps=fps, size=(width, height), difficulty=difficulty, seed=seed)
    jobs = []
    for video in videos:
        folder = os.path.join(root, video["split"], video["label"])
        os.makedirs(folder, exist_ok=True)
        name = f"{video['youtube_id']}_{video['time_start']:06d}_{video['time_end']:06d}.mp4"
        jobs.append(("mp4", video["spec"], os.path.join(folder, name), {"keyframe_interval": keyframe_interval}))
    _run_jobs(jobs, workers, progress, f"writing {len(jobs)} synthetic Kinetics-format videos to {root}")
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, key in (("train", "train_csv"), ("val", "val_csv")):
        _write_text(paths[key], kinetics_csv_text([v for v in videos if v["split"] == split]))
    _write_text(paths["classes"], "".join(f"{name}\n" for name in sorted(classes)))
    _finish(root, "kinetics", config, {"train": len(classes) * train_per_class, "val": len(classes) * val_per_class})
    return paths


# ----------------------------------------------------------------------------------------------
# Charades


def _charades_actions(rng, num_classes, length, max_actions):
    """Draw 1..max_actions distinct-class segments (class index, start, end) in [0, length], 2 decimals."""
    count = int(rng.integers(1, min(max_actions, num_classes) + 1))
    actions = []
    for label in rng.choice(num_classes, count, replace=False):
        duration = rng.uniform(min(1.5, length), max(min(1.5, length), 0.7 * length))
        start = round(rng.uniform(0.0, length - duration), 2)
        actions.append((int(label), start, round(min(start + duration, length), 2)))
    return actions


def plan_charades(*, classes, train_videos, test_videos, seconds, fps, size, difficulty, seed,
                  none_fraction=0.1, max_actions=3):
    """List the Charades videos as dicts (split, id, actions [(class index, start, end)], length, frames, spec)."""
    width, height = size
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2, 0]))
    ids = iter(_random_ids(rng, train_videos + test_videos, 5, CHARADES_ALPHABET))
    videos = []
    for split_index, (split, count) in enumerate((("train", train_videos), ("test", test_videos))):
        empty = set(rng.choice(count, max(1, round(none_fraction * count)), replace=False).tolist())
        for index in range(count):
            frames = int(round(rng.uniform(*seconds) * fps))
            length = frames / fps
            actions = [] if index in empty else _charades_actions(rng, len(classes), length, max_actions)
            entropy = (seed, 2, split_index + 1, len(videos))
            spec = VideoSpec(entropy, width, height, fps, frames,
                             tuple((classes[c], s, e) for c, s, e in actions), difficulty, idle_objects=1)
            videos.append(dict(split=split, id=next(ids), actions=actions, length=length, frames=frames,
                               subject="".join(rng.choice(list(CHARADES_ALPHABET), 4)),
                               scene=SCENES[int(rng.integers(len(SCENES)))], spec=spec))
    return videos


def _charades_row(video, classes):
    """One Charades_v1 CSV row (dict) for a planned video."""
    names = [classes[c] for c, _, _ in video["actions"]]
    script = ("Nothing happens: a blob wobbles in place." if not names else
              "A textured blob is " + ", while another is ".join(names) + ".")
    return dict(id=video["id"], subject=video["subject"], scene=video["scene"], quality="6", relevance="7",
                verified="Yes", script=script, objects="blob", descriptions=script,
                actions=";".join(f"c{c:03d} {s:.2f} {e:.2f}" for c, s, e in video["actions"]),
                length=f"{video['length']:.2f}")


def make_charades(root, *, num_classes=10, classes=None, train_videos=160, test_videos=40, seconds=(3.0, 6.0),
                  fps=24, size=(128, 96), difficulty="medium", seed=0, workers=1, overwrite=False,
                  progress=False):
    """Generate (or find complete) a synthetic Charades-format dataset under `root`; return its paths as a dict."""
    width, height, classes = _check_common(size, fps, classes, num_classes, seed)
    for name, value in (("train_videos", train_videos), ("test_videos", test_videos)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    low, high = (float(s) for s in seconds)
    if not 1.0 <= low <= high:
        raise ValueError(f"seconds must be a (min, max) range with 1 <= min <= max, got {tuple(seconds)}")
    difficulty = resolve_difficulty(difficulty)
    root = os.path.abspath(root)
    paths = dict(root=root, frames_root=os.path.join(root, "Charades_v1_rgb"),
                 train_csv=os.path.join(root, "Charades_v1_train.csv"),
                 test_csv=os.path.join(root, "Charades_v1_test.csv"),
                 classes=os.path.join(root, "Charades_v1_classes.txt"),
                 manifest=os.path.join(root, "synthetic_charades.json"))
    config = dict(format_version=FORMAT_VERSION, classes=list(classes), train_videos=train_videos,
                  test_videos=test_videos, seconds=[low, high], fps=fps, size=[width, height],
                  difficulty=dataclasses.asdict(difficulty), seed=seed)
    config = json.loads(json.dumps(config))
    if _prepare_root(root, "charades", config, CHARADES_OUTPUTS, overwrite):
        return paths
    videos = plan_charades(classes=classes, train_videos=train_videos, test_videos=test_videos,
                           seconds=(low, high), fps=fps, size=(width, height), difficulty=difficulty, seed=seed)
    os.makedirs(paths["frames_root"], exist_ok=True)
    jobs = [("jpeg", v["spec"], os.path.join(paths["frames_root"], v["id"]), {}) for v in videos]
    _run_jobs(jobs, workers, progress, f"writing {len(jobs)} synthetic Charades-format videos (JPEG frames) to {root}")
    for split, key in (("train", "train_csv"), ("test", "test_csv")):
        rows = [_charades_row(v, classes) for v in videos if v["split"] == split]
        text = _csv_text(CHARADES_HEADER, rows)
        _write_text(paths[key], text)
    _write_text(paths["classes"], "".join(f"c{i:03d} {name}\n" for i, name in enumerate(classes)))
    _finish(root, "charades", config, {"train": train_videos, "test": test_videos})
    return paths


def _csv_text(header, rows):
    """CSV text (csv module, minimal quoting, '\\n' line ends) of dict rows."""
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    """Command line: `python synthetic_data.py kinetics|charades --out DIR [options]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    commands = {"kinetics": sub.add_parser("kinetics", help="H.264 mp4 files + official Kinetics CSVs"),
                "charades": sub.add_parser("charades", help="24 fps JPEG frames + official Charades_v1 CSVs")}
    for kind, command in commands.items():
        command.add_argument("--out", required=True, help="dataset root directory")
        command.add_argument("--num-classes", type=int, default=10, help=f"first N of {list(CLASS_POOL)}")
        command.add_argument("--classes", help="comma-separated class names instead of --num-classes")
        command.add_argument("--width", type=int, default=128)
        command.add_argument("--height", type=int, default=96)
        command.add_argument("--difficulty", default="medium",
                             help=f"a preset of {sorted(DIFFICULTIES)}, optionally with field=value overrides "
                                  "(demo,speed=1.5)")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--workers", type=int, default=1, help="processes rendering in parallel")
        command.add_argument("--overwrite", action="store_true", help="replace a dataset made with other settings")
    commands["kinetics"].add_argument("--train-per-class", type=int, default=50)
    commands["kinetics"].add_argument("--val-per-class", type=int, default=10)
    commands["kinetics"].add_argument("--seconds", type=int, default=2)
    commands["kinetics"].add_argument("--fps", type=int, default=30)
    commands["kinetics"].add_argument("--keyframe-interval", type=int, default=250)
    commands["charades"].add_argument("--train-videos", type=int, default=160)
    commands["charades"].add_argument("--test-videos", type=int, default=40)
    commands["charades"].add_argument("--min-seconds", type=float, default=3.0)
    commands["charades"].add_argument("--max-seconds", type=float, default=6.0)
    commands["charades"].add_argument("--fps", type=int, default=24)
    args = parser.parse_args(argv)
    try:
        classes = class_arguments(parse_classes(args.classes) if args.classes else args.num_classes)
        common = dict(size=(args.width, args.height), difficulty=parse_difficulty(args.difficulty), seed=args.seed,
                      workers=args.workers, overwrite=args.overwrite, fps=args.fps, progress=True, **classes)
        if args.kind == "kinetics":
            paths = make_kinetics(args.out, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                                  seconds=args.seconds, keyframe_interval=args.keyframe_interval, **common)
        else:
            paths = make_charades(args.out, train_videos=args.train_videos, test_videos=args.test_videos,
                                  seconds=(args.min_seconds, args.max_seconds), **common)
    except ValueError as error:
        parser.exit(2, f"synthetic_data.py: error: {error}\n")
    print(json.dumps(paths, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
