"""Frame store benchmark: does the loader keep up with Multigrid's clip shapes, per source, in one run?

    python bench/bench_store.py [--quick] [--out bench_store_table.md] [--videos 8] [--clips 16] [--repeats 3]

For the X3D-S and X3D-M Multigrid recipes (long + short cycle, the repo's defaults: cosine, steps
[0, 118, 193, 246], 300 -> 450 epochs) it lists every clip shape the schedule trains at with its
share of the run's clips and its GMACs (`x3d.model_complexity`), and `KineticsDataset` training
clips per CPU-second at that shape from each source: mp4 with a keyframe every 250 frames,
the same re-encoded by prepare_videos.py (short side 256, keyframe every 30, tune fastdecode),
JPEG frame folders of the decoded mp4 frames (quality 90, 4:2:0, as frame extractors write them),
the frame store made from the mp4s by prepare_videos.py --frame-store (defaults), and the store
with a second 160-px copy of each frame. One process, one thread; each of `--repeats` rounds
measures every shape from every source, and a cell is the median over the rounds. Then per recipe
the whole run's data CPU-seconds (the median of the rounds' own ratios, with their range: each
round's cells are measured within minutes of each other, so a drift of the machine's speed cancels)
and GMACs of Multigrid over constant-shape training (450 vs 300 epochs of the same dataset), the "does
it feed the GPU" table, the store's PSNR against the source frames (decoded mp4 frames scaled to
the store's size) at several JPEG qualities, disk per source, and preparation time per 1,000 videos.
Data: bench_data's synthetic 340x256 30 fps videos (panning texture, moving blobs, sensor noise).
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import frame_store  # noqa: E402
import multigrid  # noqa: E402
import prepare_videos  # noqa: E402
import synthetic_data  # noqa: E402
import transforms  # noqa: E402
import video_io  # noqa: E402
import x3d  # noqa: E402
from bench_data import FPS, HEIGHT, WIDTH, measure, render_frames, write_mp4  # noqa: E402
from bench_train_step import significant  # noqa: E402
from kinetics_multigrid import KineticsDataset  # noqa: E402
from multigrid import ClipRequest  # noqa: E402
from video_io import VideoFile  # noqa: E402

SOURCES = ("mp4 k250", "prepared", "jpeg", "store", "store+160")
# measured pytorchvideo fp32 training rate on one H100 at the base shape (clips/s)
GPU_RATE = {"X3D-S": 283.0, "X3D-M": 121.0}
MODELS = {"X3D-S": "S", "X3D-M": "M"}
CORES = 16
QUALITIES = (90, 92, 95)
RECIPE = dict(max_epoch=300, steps=[0, 118, 193, 246], lr_policy="cosine")


def schedule_shapes(version):
    """[(frames, crop, max_rate, share of the run's clips)] of the Multigrid recipe of an X3D preset,
    and (epochs of the Multigrid run, epochs of constant shape)."""
    preset = x3d.PRESETS[version]
    plan = multigrid.MultigridPlan(preset.frames, preset.train_crop, preset.rate, 16, RECIPE["max_epoch"],
                                   RECIPE["steps"], 0.1, lr_policy=RECIPE["lr_policy"])
    share, total = defaultdict(float), 0
    for phase in plan.phases:
        epochs = phase.end_epoch - phase.start_epoch
        batch = sum(b for b, _ in phase.shapes)  # iterations cycle through the shapes: clips split by batch
        for size, crop in phase.shapes:
            share[(phase.frames, crop, phase.max_rate)] += epochs * size / batch
        total += epochs
    return [(t, s, r, v / total) for (t, s, r), v in sorted(share.items())], (plan.max_epoch, RECIPE["max_epoch"])


def gmacs(version, shapes):
    """{(frames, crop): GMACs of one clip} for an X3D preset (`x3d.model_complexity`: conv + linear
    multiply-adds). Batch norm counts no MACs, so it is taken out first: the meta-device pass of
    SubBatchNorm3d took two thirds of the count's time (about 1 s a shape here)."""
    model = x3d.generate_model(version, n_classes=400)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if "BatchNorm" in type(child).__name__:
                setattr(module, name, torch.nn.Identity())
    return {(t, s): x3d.model_complexity(model, t, s)[1] for t, s, _, _ in shapes}


# ---------------------------------------------------------------------------------------------
# data


def _size(path):
    """Bytes under a folder (or of a file)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names
               if "annotations" not in folder)


def make_data(folder, videos, num_frames, workers):
    """Write every source under `folder`; return ({source: (root, csv, classes)}, {what: seconds / bytes})."""
    roots = {name: os.path.join(folder, name.replace(" ", "_").replace("+", "_")) for name in SOURCES}
    entries, info = [], {}
    for i in range(videos):
        label, stem = f"class{i % 2}", f"video{i:05d}xx_{i:06d}_{i + 10:06d}"
        os.makedirs(os.path.join(roots["mp4 k250"], label), exist_ok=True)
        path = os.path.join(roots["mp4 k250"], label, f"{stem}.mp4")
        write_mp4(path, render_frames(i, num_frames), 250)
        with VideoFile(path) as video:  # frame folders hold the decoded frames, as extractors write them
            synthetic_data.write_jpegs(os.path.join(roots["jpeg"], label, stem), stem,
                                       video.read(range(video.num_frames)).numpy())
        entries.append(prepare_videos.VideoEntry(f"{label}/{stem}.mp4", label))
    for name, run in (("prepared", lambda: prepare_videos.reencode_tree(roots["mp4 k250"], roots["prepared"], entries,
                                                                         workers=workers)),
                      ("store", lambda: prepare_videos.store_tree(roots["mp4 k250"], roots["store"], entries,
                                                                  workers=workers)),
                      ("store+160", lambda: prepare_videos.store_tree(roots["mp4 k250"], roots["store+160"], entries,
                                                                      small_side=160, workers=workers))):
        wall, cpu = time.perf_counter(), time.process_time()
        counts, failed = run()
        if failed:
            raise RuntimeError(f"preparing {name} failed: {failed}")
        info[f"{name} wall s"], info[f"{name} cpu s"] = time.perf_counter() - wall, time.process_time() - cpu
    written = prepare_videos.write_annotations(entries, os.path.join(folder, "annotations"))
    for name in SOURCES:
        info[f"{name} bytes"] = _size(roots[name])
    return {name: (root, written["annotations"], written["classes"]) for name, root in roots.items()}, info


def store_psnr(data):
    """{quality: (PSNR dB, bytes per frame)} of JPEG frames of the store's size against the decoded source
    frames, plus "store": (PSNR, bytes per frame) of the default store files themselves."""
    root, annotations, classes = data["mp4 k250"]
    sources = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names)
    squared = defaultdict(float)
    sizes, pixels, frames = defaultdict(int), 0, 0
    for path in sources:
        with VideoFile(path) as video:
            source = video.read(range(video.num_frames))
        stored_path = os.path.join(data["store"][0], os.path.relpath(path, root)[:-4] + frame_store.STORE_EXTENSION)
        with frame_store.FrameStore(stored_path) as store:
            stored = store.read(range(store.num_frames))
            reference = transforms.resize(source, *stored.shape[1:3]).numpy().astype(np.float64)
            squared["store"] += float(((stored.numpy() - reference) ** 2).sum())
            sizes["store"] += sum(len(store.frame_bytes(i)) for i in range(store.num_frames))
        for quality in QUALITIES:
            for frame, original in zip(reference.astype(np.uint8), reference):
                data_ = frame_store.encode_frame(frame, quality)
                decoded = video_io.decode_image_bytes(data_, "psnr", fast_upsample=True)
                squared[quality] += float(((decoded - original) ** 2).sum())
                sizes[quality] += len(data_)
        pixels += reference.size
        frames += len(reference)
    return {key: (10 * np.log10(255.0 ** 2 / (squared[key] / pixels)), sizes[key] / frames) for key in squared}


# ---------------------------------------------------------------------------------------------
# measuring


def _quiet(*_):
    """A dataset log that drops its lines."""


def shape_rates(data, model, shapes, clips, repeats):
    """[{(frames, crop): {source: clips per CPU-second}} per round]: every round measures every shape from
    every source, `clips` new clips a cell, so a drift of the machine's speed hits a round's cells alike."""
    preset = x3d.PRESETS[MODELS[model]]
    datasets = {name: KineticsDataset(root, annotations, "train", class_list=classes, frames=preset.frames,
                                      rate=preset.rate, crop=preset.train_crop, short_side=preset.train_short_side,
                                      log=_quiet)
                for name, (root, annotations, classes) in data.items()}
    rounds = []
    for round_ in range(repeats):
        cells = {}
        for frames, crop, max_rate, _ in shapes:
            cells[(frames, crop)] = {
                name: measure(lambda i, d=ds: d[ClipRequest(i % len(d), frames, crop, max_rate, i)][0], clips,
                              1 + round_ * clips)[0]
                for name, ds in datasets.items()}
        rounds.append(cells)
    return rounds


def _table(header, rows):
    """A Markdown table."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _run_ratio(shapes, rates, base, name, scale):
    """Data CPU-seconds of the Multigrid run over the constant-shape run from one set of cell rates."""
    return scale * sum(share / rates[(t, s)][name] for t, s, _, share in shapes) * rates[base][name]


def report(model, shapes, macs, rounds, epochs):
    """The shape table, the whole-run ratios and the GPU table of one recipe, as text; and a dict of
    the figures the targets are judged on. Cell rates are medians over the rounds; a whole-run ratio
    is the median of the rounds' own ratios (each from cells measured within minutes), with their range."""
    preset = x3d.PRESETS[MODELS[model]]
    base = (preset.frames, preset.train_crop)
    rates = {key: {name: statistics.median(r[key][name] for r in rounds) for name in SOURCES} for key in rounds[0]}
    rows = []
    for t, s, r, share in shapes:
        cells = [f"{t}x{s} ({r})", f"{share:.3f}", f"{macs[(t, s)]:.3f}"]
        rows.append(cells + [significant(rates[(t, s)][name], 4) for name in SOURCES])
    shape_table = _table(["T x S (max rate)", "share", "GMACs"] + [f"{n} clips/cpu-s" for n in SOURCES], rows)
    multigrid_epochs, constant_epochs = epochs
    scale = multigrid_epochs / constant_epochs
    per_round = {name: sorted(_run_ratio(shapes, r, base, name, scale) for r in rounds) for name in SOURCES}
    data_ratio = {name: statistics.median(values) for name, values in per_round.items()}
    gmac_ratio = scale * sum(share * macs[(t, s)] for t, s, _, share in shapes) / macs[base]
    run_table = _table(["source", "data CPU-s Multigrid / constant shape (median of rounds)", "rounds' range",
                        "GMACs Multigrid / constant shape"],
                       [[name, f"{data_ratio[name]:.2f}", f"{per_round[name][0]:.2f}-{per_round[name][-1]:.2f}",
                         f"{gmac_ratio:.2f}"] for name in SOURCES])
    gpu_rows, feeds = [], {}
    for t, s, _, _ in shapes:
        need = GPU_RATE[model] * macs[base] / macs[(t, s)]
        got = {name: CORES * rates[(t, s)][name] for name in ("jpeg", "store", "store+160")}
        feeds[(t, s)] = {name: value >= 2 * need for name, value in got.items()}
        gpu_rows.append([f"{t}x{s}", f"{need:.0f}", f"{2 * need:.0f}", f"{2 * need / CORES:.0f}"]
                        + [f"{got[name]:.0f} ({'yes' if feeds[(t, s)][name] else 'NO'})" for name in got])
    gpu_table = _table(["T x S", "GPU need clips/s", "2x GPU", "2x GPU per core"]
                       + [f"{CORES} cores x {n} (>= 2x?)" for n in ("jpeg", "store", "store+160")], gpu_rows)
    formula = (f"GPU need at a shape = {GPU_RATE[model]:g} clips/s (pytorchvideo fp32, one H100, {model} at "
               f"{base[0]}x{base[1]}) x GMACs({base[0]}x{base[1]}) / GMACs(shape); '2x GPU' is twice that, the "
               f"speed this repo aims at; the loader column is {CORES} x the measured clips per CPU-second.")
    text = (f"### {model} Multigrid recipe ({multigrid_epochs} epochs; constant shape {constant_epochs} at "
            f"{base[0]}x{base[1]})\n\n{shape_table}\n\nWhole run:\n\n{run_table}\n\nDoes it feed the GPU?\n"
            f"{formula}\n\n{gpu_table}\n")
    figures = {"data_ratio": data_ratio, "gmac_ratio": gmac_ratio, "feeds": feeds,
               "base_store_over_jpeg": rates[base]["store"] / rates[base]["jpeg"],
               "base_store160_over_jpeg": rates[base]["store+160"] / rates[base]["jpeg"]}
    return text, figures


def main(argv=None):
    """Run the benchmark, print the tables and write them to --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (numbers meaningless)")
    parser.add_argument("--out", default="bench_store_table.md", help="file the tables are written to")
    parser.add_argument("--videos", type=int, help="videos per source (default 8; quick 2)")
    parser.add_argument("--seconds", type=float, help="video length in seconds (default 10; quick 1)")
    parser.add_argument("--clips", type=int, help="clips per cell and round (default 16; quick 1)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per cell, median reported (default 3; quick 1)")
    parser.add_argument("--workers", type=int, default=1, help="processes for preparing the data (timing: use 1)")
    parser.add_argument("--keep", help="make the data in this folder and keep it (default: a temp folder)")
    args = parser.parse_args(argv)
    defaults = dict(videos=(8, 2), seconds=(10, 1), clips=(16, 1), repeats=(3, 1))
    for name, pair in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, pair[args.quick])
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    torch.set_num_threads(1)
    folder = args.keep or tempfile.mkdtemp(prefix="bench_store_")
    sections, figures = [], {}
    try:
        started = time.perf_counter()
        data, info = make_data(folder, args.videos, int(args.seconds * FPS), args.workers)
        made = time.perf_counter() - started
        psnr = store_psnr(data)
        for model, version in MODELS.items():
            shapes, epochs = schedule_shapes(version)
            macs = gmacs(version, shapes)
            text, figures[model] = report(model, shapes, macs, shape_rates(data, model, shapes, args.clips,
                                                                           args.repeats), epochs)
            sections.append(text)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    source_bytes = info["mp4 k250 bytes"]
    disk = _table(["source", "MB", "x mp4 k250", "x JPEG folders"],
                  [[name, f"{info[f'{name} bytes'] / 1e6:.1f}", f"{info[f'{name} bytes'] / source_bytes:.2f}",
                    f"{info[f'{name} bytes'] / info['jpeg bytes']:.2f}"] for name in SOURCES])
    per_1000 = lambda what: 1000 * info[f"{what} cpu s"] / args.videos  # noqa: E731
    prep = _table(["preparation", "CPU-s per 1,000 videos", "wall s per 1,000 videos (one process)"],
                  [[name, f"{per_1000(name):.0f}", f"{1000 * info[f'{name} wall s'] / args.videos:.0f}"]
                   for name in ("prepared", "store", "store+160")])
    quality = _table(["JPEG quality (4:2:0, chroma replicated)", "PSNR dB vs source frames", "KB per frame"],
                     [[f"{q}{' (default)' if q == frame_store.DEFAULT_QUALITY else ''}", f"{psnr[q][0]:.2f}",
                       f"{psnr[q][1] / 1e3:.1f}"] for q in QUALITIES]
                     + [["store files (default)", f"{psnr['store'][0]:.2f}", f"{psnr['store'][1] / 1e3:.1f}"]])
    m = figures["X3D-M"]
    targets = [
        ("X3D-M: 16 cores x store >= 2x GPU need at every shape", all(f["store"] for f in m["feeds"].values())),
        ("X3D-S: 16 cores x store >= 2x GPU need at every shape",
         all(f["store"] for f in figures["X3D-S"]["feeds"].values())),
        ("X3D-S: 16 cores x store+160 >= 2x GPU need at every shape",
         all(f["store+160"] for f in figures["X3D-S"]["feeds"].values())),
        (f"X3D-M whole run data CPU-s on the store <= 0.5x constant shape (got {m['data_ratio']['store']:.2f}; "
         f"store+160 {m['data_ratio']['store+160']:.2f})", m["data_ratio"]["store"] <= 0.5),
        (f"store at the base shapes >= 1.0x JPEG folders (M {m['base_store_over_jpeg']:.2f}x, "
         f"S {figures['X3D-S']['base_store_over_jpeg']:.2f}x)",
         min(m["base_store_over_jpeg"], figures["X3D-S"]["base_store_over_jpeg"]) >= 1.0),
        (f"store disk <= 1.5x JPEG folders (got {info['store bytes'] / info['jpeg bytes']:.2f}x)",
         info["store bytes"] <= 1.5 * info["jpeg bytes"]),
        (f"store PSNR >= 38 dB at the default quality (got {psnr['store'][0]:.2f})", psnr["store"][0] >= 38),
    ]
    target_table = _table(["target", "met"], [[what, "yes" if ok else "NO"] for what, ok in targets])
    setup = (f"{args.videos} videos {WIDTH}x{HEIGHT}, {args.seconds:g} s at {FPS} fps per source; median of "
             f"{args.repeats} interleaved rounds of {args.clips} clips per cell; store defaults: short side "
             f"{frame_store.DEFAULT_SHORT_SIDE}, quality {frame_store.DEFAULT_QUALITY}; data made in {made:.0f} s; "
             f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    text = "\n".join(sections + ["### Targets\n", target_table, "\n### Disk\n", disk, "\n### Store quality\n",
                                 quality, "\n### Preparation time\n", prep, "\n" + setup + "\n"])
    print(text)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
