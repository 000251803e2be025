"""Data-loading benchmark: clips/s per CPU core of this pipeline vs a naive baseline, in one run.

    python bench/bench_data.py [--quick] [--out bench_data_table.md] [--videos 8] [--clips 24] [--repeats 5]

One process, one thread (`torch.set_num_threads(1)`, single-threaded decoders); clips/s is given
per CPU-second (the per-core figure; the machine may be shared) and per wall second. Rows:
X3D-S training clips (13x6, crop 160, short side 182-228), X3D-M training clips (16x5, crop 224,
short side 256-320) and X3D-S test views (10 temporal x 3 spatial at 182; `--test-views` to change
the temporal count), each from mp4 with a keyframe every 250 and every 30 frames, from JPEG frame
folders (quality 90, 4:2:0) at 340x256 and at 640x480, this pipeline (`KineticsDataset` with
`ClipRequest`s) next to the naive baseline (x3d-multigrid's way: decode from the start of the file
with PyAV up to the last needed frame, or Pillow per JPEG frame, then per frame a PIL crop +
bilinear resize, flip, ToTensor and Normalize, so it returns float32 as x3d-multigrid's workers do;
ours returns uint8 and normalises on the device). "decode only" runs our decode step alone
(`KineticsDataset.read_frames` / `read_test_frames`, no transform): its ratio to the baseline bounds
what any transform code on top of that decoder could reach. The "prepared" rows compare this
pipeline on the dataset re-encoded by prepare_videos.py (short side 256, keyframe every 30, crf 23,
tune fastdecode) with the same pipeline on the 250-keyframe original. Every row is the median of
`--repeats` rounds that alternate ours, decode only and the baseline. Last, the peak memory of one
DataLoader worker over full passes of the dataset. Data: synthetic 30 fps videos made in a temp
folder (a panning noise texture, moving textured blobs and sensor noise, so the codec works as on
real footage).
"""
import argparse
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time

import av
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prepare_videos  # noqa: E402
import synthetic_data  # noqa: E402
from kinetics_multigrid import KineticsDataset  # noqa: E402
from multigrid import ClipRequest  # noqa: E402
from bench_train_step import significant  # noqa: E402

WIDTH, HEIGHT, FPS = 340, 256, 30
LARGE = (640, 480)  # the "jpeg 640x480" source: frames stored larger than training needs
# name: (frames, rate, crop, short-side range, test crop)
MODELS = {"X3D-S": (13, 6, 160, (182, 228), 182), "X3D-M": (16, 5, 224, (256, 320), 256)}
COLUMNS = ("task", "source", "ours clips/cpu-s", "ours clips/s", "decode only clips/cpu-s", "baseline",
           "base clips/cpu-s", "base clips/s", "ratio (cpu)", "decode-only ratio (cpu)")
SOURCES = ("mp4 k250", "mp4 k30", "jpeg", "jpeg 640x480", "prepared")


# ---------------------------------------------------------------------------------------------
# data


def _smooth_texture(rng, height, width, cells):
    """A smooth random RGB texture (bilinear upsampling of a coarse random grid), float32 0..255."""
    coarse = rng.uniform(0, 255, (cells + 1, cells + 1, 3)).astype(np.float32)
    ys, xs = np.linspace(0, cells, height, dtype=np.float32), np.linspace(0, cells, width, dtype=np.float32)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - wx) + coarse[y0][:, x0 + 1] * wx
    bottom = coarse[y0 + 1][:, x0] * (1 - wx) + coarse[y0 + 1][:, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


def render_frames(seed, num_frames, width=WIDTH, height=HEIGHT):
    """uint8 (num_frames, height, width, 3): a panning background texture, three moving textured
    blobs and per-frame noise (not blank frames: the codec must work as on real footage)."""
    rng = np.random.default_rng(seed)
    background = _smooth_texture(rng, 2 * height, 2 * width, 24) * 0.6 + _smooth_texture(rng, 2 * height, 2 * width, 96) * 0.4
    velocity = rng.uniform(-1.5, 1.5, 2)
    blobs = [(_smooth_texture(rng, 64, 64, 6), rng.uniform(0, [height, width]), rng.uniform(-3, 3, 2))
             for _ in range(3)]
    disc = (np.hypot(*np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5)) < 30)[..., None]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        y, x = (np.abs(velocity * t) % [height, width]).astype(int)
        frame = background[y:y + height, x:x + width].copy()
        for texture, origin, speed in blobs:
            by, bx = ((origin + speed * t) % [height - 64, width - 64]).astype(int)
            region = frame[by:by + 64, bx:bx + 64]
            region[:] = np.where(disc, texture, region)
        frame += rng.normal(0, 3, frame.shape).astype(np.float32)
        frames[t] = np.clip(frame, 0, 255)
    return frames


def write_mp4(path, frames, keyframe_interval, crf=20):
    """Encode uint8 RGB frames to an H.264 mp4 (prepare_videos' encoder settings) at FPS."""
    with av.open(path, "w", format="mp4") as out:
        stream = prepare_videos.add_h264_stream(out, FPS, frames.shape[2], frames.shape[1], keyframe_interval, crf)
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts = index
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def make_data(folder, videos, num_frames, workers):
    """Write the bench datasets under `folder`; return {source name: (root, annotation csv, classes)}."""
    roots = {name: os.path.join(folder, name.replace(" ", "_")) for name in SOURCES}
    entries = []
    for i in range(videos):
        label = f"class{i % 2}"
        stem = f"video{i:05d}xx_{i:06d}_{i + 10:06d}"
        frames = render_frames(i, num_frames)
        for name, keyint in (("mp4 k250", 250), ("mp4 k30", 30)):
            os.makedirs(os.path.join(roots[name], label), exist_ok=True)
            write_mp4(os.path.join(roots[name], label, f"{stem}.mp4"), frames, keyint)
        # quality 90, 4:2:0 chroma: as ffmpeg and OpenCV extract frames from yuv420p video
        for name, images in (("jpeg", frames), ("jpeg 640x480", render_frames(i, num_frames, *LARGE))):
            jpeg_folder = os.path.join(roots[name], label, stem)
            shutil.rmtree(jpeg_folder, ignore_errors=True)  # a --keep folder from an earlier run is rewritten
            synthetic_data.write_jpegs(jpeg_folder, stem, images)
        entries.append(prepare_videos.VideoEntry(f"{label}/{stem}.mp4", label))
    prepare_videos.reencode_tree(roots["mp4 k250"], roots["prepared"], entries, short_side=256,
                                 keyframe_interval=30, crf=23, workers=workers)
    written = prepare_videos.write_annotations(entries, os.path.join(folder, "annotations"))
    return {name: (root, written["annotations"], written["classes"]) for name, root in roots.items()}


# ---------------------------------------------------------------------------------------------
# the naive baseline (x3d-multigrid's way)


def _naive_indices(num_frames, frames, rate, start):
    """Indices start, start + rate, ... clamped to the video (x3d-multigrid style sampling)."""
    return [min(start + k * rate, num_frames - 1) for k in range(frames)]


def _naive_decode(path, wanted):
    """{index: PIL image} for `wanted`, decoding from the start of the file up to the last one."""
    images, last = {}, max(wanted)
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                images[index] = frame.to_image()
            if index >= last:
                break
    for index in sorted(wanted):  # a short video repeats its last frame
        images.setdefault(index, images[max(images)])
    return images


def _naive_frames(path, wanted):
    """{index: PIL image} from a video file or a JPEG frame folder (Pillow per frame)."""
    if not os.path.isdir(path):
        return _naive_decode(path, wanted)
    files = sorted(os.listdir(path))
    return {i: Image.open(os.path.join(path, files[min(i, len(files) - 1)])).convert("RGB") for i in wanted}


def _pil_clip(images, box, crop, flip, resize_first):
    """float32 (3, T, crop, crop) made per frame as x3d-multigrid does: PIL crop of the square `box`
    + bilinear resize to crop (MultiScaleRandomCrop; with `resize_first`, the whole frame is resized
    first and then cropped), flip, ToTensor (/255) and Normalize (0.45 / 0.225); stacked."""
    out = []
    x, y, side = int(box[0]), int(box[1]), int(box[2])
    for image in images:
        if resize_first:
            scale = crop / side
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
            image = image.crop((round(x * scale), round(y * scale), round(x * scale) + crop, round(y * scale) + crop))
        else:
            image = image.crop((x, y, x + side, y + side)).resize((crop, crop), Image.BILINEAR)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        frame = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
        out.append(frame.sub_(0.45).div_(0.225))
    return torch.stack(out, 1)


class NaiveLoader:
    """x3d-multigrid-style loading: decode from the start, per-frame PIL crop / resize / flip / normalise."""

    def __init__(self, paths, frames, rate, crop, short_side, test_crop, views, resize_first=False, seed=0):
        """Videos `paths` (files or frame folders), the clip geometry of one model, the PIL order."""
        self.paths, self.frames, self.rate, self.crop, self.resize_first = paths, frames, rate, crop, resize_first
        self.short_side, self.test_crop, self.views = short_side, test_crop, views
        self.rng = random.Random(seed)
        self.lengths = {}

    def _length(self, path):
        """Frame count of a video file or frame folder (cached, as a loader's index would be)."""
        if path not in self.lengths:
            if os.path.isdir(path):
                self.lengths[path] = len(os.listdir(path))
            else:
                with av.open(path) as container:
                    self.lengths[path] = container.streams.video[0].frames
        return self.lengths[path]

    def train_clip(self, index):
        """One random training clip float32 (3, frames, crop, crop) of video `index`: short side drawn
        from the jitter range, a random crop box mapped back to the source frame (MultiScaleRandomCrop)."""
        path = self.paths[index % len(self.paths)]
        num_frames = self._length(path)
        start = self.rng.randint(0, max(num_frames - self.frames * self.rate, 0))
        indices = _naive_indices(num_frames, self.frames, self.rate, start)
        images = _naive_frames(path, set(indices))
        width, height = images[indices[0]].size
        side = int(self.crop * min(width, height) / self.rng.randint(*self.short_side))
        box = (self.rng.random() * (width - side), self.rng.random() * (height - side), side)
        return _pil_clip([images[i] for i in indices], box, self.crop, self.rng.random() < 0.5, self.resize_first)

    def test_views(self, index):
        """float32 (views * 3, 3, frames, test_crop, test_crop): uniform windows x start/centre/end
        squares of the short side, each resized to test_crop (CenterCropScaled)."""
        path = self.paths[index % len(self.paths)]
        num_frames = self._length(path)
        delta = max(num_frames - self.frames * self.rate, 0)
        windows = [_naive_indices(num_frames, self.frames, self.rate, delta * k // self.views)
                   for k in range(self.views)]
        images = _naive_frames(path, {i for window in windows for i in window})
        width, height = images[windows[0][0]].size
        side = min(width, height)
        out = []
        for window in windows:
            for x in (0, (width - side) // 2, width - side):
                out.append(_pil_clip([images[i] for i in window], (x, (height - side) // 2, side), self.test_crop,
                                     False, self.resize_first))
        return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# measuring


def _quiet(*_):
    """A dataset log that drops its lines (and pickles, for a spawned worker)."""


def _ours(data, source, model, mode, views):
    """A KineticsDataset for `source` with `model`'s geometry."""
    frames, rate, crop, short_side, test_crop = MODELS[model]
    root, annotations, classes = data[source]
    return KineticsDataset(root, annotations, mode, class_list=classes, frames=frames, rate=rate, crop=crop,
                           short_side=short_side, test_crop=test_crop, temporal_views=views, spatial_views=3,
                           log=_quiet)


def _naive(dataset, model, views, resize_first):
    """The naive loader over the same files as `dataset`."""
    frames, rate, crop, short_side, test_crop = MODELS[model]
    return NaiveLoader([dataset.path(i) for i in range(len(dataset))], frames, rate, crop, short_side,
                       test_crop, views, resize_first)


def measure(make_clip, count, first=1):
    """(clips per CPU-second, clips per wall second) of make_clip(i) for i = first .. first + count - 1
    after one warm-up call; test-view calls count every view as a clip."""
    make_clip(0)
    wall, cpu, clips = time.perf_counter(), time.process_time(), 0
    for i in range(first, first + count):
        out = make_clip(i)
        clips += out.shape[0] if out.dim() == 5 else 1
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return clips / max(cpu, 1e-9), clips / max(wall, 1e-9)


def _train_runner(dataset, model):
    """make_clip(i) for training clips of `model` from `dataset`."""
    frames, rate, crop = MODELS[model][:3]
    return lambda i: dataset[ClipRequest(i % len(dataset), frames, crop, rate, i)][0]


def _decode_runner(dataset, model, mode):
    """make_clip(i) that runs only the decode step of `dataset`: the source frames of a training clip,
    or of a video's test views (then returned as an empty (views, ...) tensor so `measure` counts views)."""
    frames, rate, crop = MODELS[model][:3]
    generator = torch.Generator()
    views = dataset.temporal_views * dataset.spatial_views

    def decode(i):
        if mode == "test":
            dataset.read_test_frames(i % len(dataset))
            return torch.empty(views, 0, 0, 0, 0)
        return dataset.read_frames(i % len(dataset), frames, crop, rate, generator.manual_seed(i))

    return decode


def _median_rates(runs, count, repeats):
    """{name: (median clips per CPU-second, median clips per wall second)} of `runs` (name: make_clip),
    measured in `repeats` interleaved rounds of `count` clips so that drift of the machine hits all alike."""
    samples = {name: [] for name in runs}
    for round_ in range(repeats):  # each round new clips (ours and decode only: the same ones)
        for name, run in runs.items():
            samples[name].append(measure(run, count, 1 + round_ * count))
    return {name: tuple(statistics.median(rates[k] for rates in got) for k in (0, 1))
            for name, got in samples.items()}


def bench_rows(data, clips, test_clips, views, resize_first=False, repeats=5):
    """Measure every row (medians over `repeats` interleaved rounds); return a list of dicts keyed by COLUMNS."""
    rows = []
    tasks = [(f"{m} train {MODELS[m][0]}x{MODELS[m][1]}", m, "train") for m in MODELS]
    tasks.append((f"X3D-S test {views}x3 views", "X3D-S", "test"))
    for task, model, mode in tasks:
        count = clips if mode == "train" else test_clips
        for source in SOURCES:
            dataset = _ours(data, source, model, mode, views)
            runs = {"ours": _train_runner(dataset, model) if mode == "train" else (lambda i, d=dataset: d[i % len(d)][0]),
                    "decode": _decode_runner(dataset, model, mode)}
            if source == "mp4 k250":
                ours_k250 = runs["ours"]
            if source == "prepared":  # measured in the same rounds as the prepared set, like every baseline
                baseline, runs["base"] = "ours on mp4 k250", ours_k250
            else:
                naive = _naive(dataset, model, views, resize_first)
                baseline, runs["base"] = "naive", naive.train_clip if mode == "train" else naive.test_views
            rates = _median_rates(runs, count, repeats)
            cells = [significant(v, 4) for v in (*rates["ours"], rates["decode"][0])]
            cells += [baseline] + [significant(v, 4) for v in rates["base"]]
            cells += [f"{rates['ours'][0] / rates['base'][0]:.2f}x", f"{rates['decode'][0] / rates['base'][0]:.2f}x"]
            rows.append(dict(zip(COLUMNS, (task, source, *cells))))
    return rows


def _status_kib(field):
    """A /proc/self/status memory field in KiB (VmRSS, VmHWM); ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _RssDataset(torch.utils.data.Dataset):
    """Wraps a training dataset; each sample also carries the worker's current and peak RSS (KiB)."""

    def __init__(self, dataset):
        """Keep the dataset."""
        self.dataset = dataset

    def __len__(self):
        """Length of the wrapped dataset."""
        return len(self.dataset)

    def __getitem__(self, request):
        """(clip, RSS KiB, peak RSS KiB) of one request."""
        clip = self.dataset[request][0]
        return clip, _status_kib("VmRSS"), _status_kib("VmHWM")


def worker_memory(data, passes):
    """(RSS after the first clip, half-way and at the end, peak RSS) in MiB and the clip count of one
    DataLoader worker making X3D-M training clips from the 250-keyframe mp4s for `passes` full passes."""
    dataset = _ours(data, "mp4 k250", "X3D-M", "train", 1)
    frames, rate, crop = MODELS["X3D-M"][:3]
    requests = [ClipRequest(i % len(dataset), frames, crop, rate, i) for i in range(passes * len(dataset))]
    # spawned, not forked: a forked worker's RSS would count the pages it shares with this process
    loader = torch.utils.data.DataLoader(_RssDataset(dataset), batch_size=None, sampler=requests, num_workers=1,
                                         multiprocessing_context="spawn")
    samples = [(rss, peak) for _, rss, peak in loader]
    first, half, last = (samples[i][0] / 1024 for i in (0, len(samples) // 2, -1))
    return first, half, last, max(peak for _, peak in samples) / 1024, len(samples)


def format_table(rows):
    """A Markdown table of `rows` (dicts keyed by COLUMNS)."""
    widths = [max(len(column), *(len(row[column]) for row in rows)) for column in COLUMNS]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line([r[c] for c in COLUMNS]) for r in rows])


def main(argv=None):
    """Run the benchmark, print the table and write it to --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (numbers meaningless)")
    parser.add_argument("--out", default="bench_data_table.md", help="file the table is written to")
    parser.add_argument("--videos", type=int, help="videos per source (default 8; quick 2)")
    parser.add_argument("--seconds", type=float, help="video length in seconds (default 10; quick 3)")
    parser.add_argument("--clips", type=int, help="training clips per row and round (default 24; quick 2)")
    parser.add_argument("--test-videos", type=int, help="videos per test-view row and round (default 3; quick 1)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per row, median reported (default 5; "
                                                    "quick 1)")
    parser.add_argument("--test-views", type=int, help="temporal test views (default 10; quick 2)")
    parser.add_argument("--passes", type=int, help="DataLoader passes for the memory figure (default 50; quick 1)")
    parser.add_argument("--workers", type=int, default=1, help="processes for the re-encode of the data")
    parser.add_argument("--naive", choices=("crop-first", "resize-first"), default="crop-first",
                        help="baseline's per-frame PIL order: crop then resize (x3d-multigrid's "
                             "MultiScaleRandomCrop) or resize the whole frame then crop")
    parser.add_argument("--keep", help="make the data in this folder and keep it (default: a temp folder)")
    args = parser.parse_args(argv)
    defaults = dict(videos=(8, 2), seconds=(10, 3), clips=(24, 2), test_videos=(3, 1), test_views=(10, 2),
                    repeats=(5, 1), passes=(50, 1))
    for name, pair in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, pair[args.quick])
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    torch.set_num_threads(1)
    folder = args.keep or tempfile.mkdtemp(prefix="bench_data_")
    try:
        started = time.perf_counter()
        data = make_data(folder, args.videos, int(args.seconds * FPS), args.workers)
        made = time.perf_counter() - started
        rows = bench_rows(data, args.clips, args.test_videos, args.test_views, args.naive == "resize-first",
                          args.repeats)
        first, half, last, peak, count = worker_memory(data, args.passes)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    table = format_table(rows)
    memory = (f"DataLoader worker (spawned; X3D-M train, mp4 k250, {count} clips = {args.passes} passes): RSS "
              f"{first:.0f} MiB after the first clip, {half:.0f} MiB half-way, {last:.0f} MiB at the end, "
              f"peak {peak:.0f} MiB")
    setup = (f"{args.videos} videos {WIDTH}x{HEIGHT} (jpeg 640x480: {LARGE[0]}x{LARGE[1]}) {args.seconds:g} s at "
             f"{FPS} fps per source; median of {args.repeats} interleaved rounds of {args.clips} training clips / "
             f"{args.test_videos} videos' test views per row; naive PIL order {args.naive}; data made in {made:.0f} s; "
             f"torch {torch.__version__}, PyAV {av.__version__}, {os.cpu_count()} CPUs")
    text = f"{table}\n\n{memory}\n\n{setup}\n"
    print(text)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
