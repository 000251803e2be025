"""Dataset preparation: annotation files from a folder tree, a decode check of every file, re-encoding.

    python prepare_videos.py ROOT [--reencode NEW_ROOT --short-side 256] [--workers 8] [--drop-bad]

1. Annotations from `ROOT/<label>/<file>` (video files) and `ROOT/<label>/<video>/` (JPEG frame
   folders): when every stem parses as the official
   `<youtube_id>_<start:06d>_<end:06d>`, an official-style Kinetics CSV
   (`label,youtube_id,time_start,time_end,split`), else a `path label_index` list; plus `classes.txt`
   (alphabetical, one name a line; the label is the folder name as written). Both load with
   `kinetics_multigrid.KineticsDataset(root, annotations, class_list=classes.txt)`.
2. Decode check: a video file is opened and frames at the start, middle and end are read as the
   loader reads them (`video_io.VideoFile`: judged by time stamps, so a valid variable-rate video
   passes, and a file whose data stops before the duration its header states fails); a frame
   folder's numbering must have no gap and every frame must decode at one size. Bad files are
   printed with the reason and written to `bad_videos.txt`; the exit code is 1 unless `--drop-bad`
   leaves them out of the annotations.
3. `--reencode NEW_ROOT` (video files; frame folders are left as they are): H.264 (libx264,
   yuv420p, crf 23, preset veryfast, tune fastdecode),
   short side scaled down to `--short-side` (never up; even sizes), one keyframe every
   `--keyframe-interval` frames (scene-cut keyframes off), same average fps (frame i is the frame
   the loader reads as index i of the source, at time i / fps: a variable-rate source keeps its
   timing), stored upright (rotation metadata applied to the pixels), no audio, same
   `<label>/<stem>.mp4` layout, annotations written to
   `NEW_ROOT/annotations`. Parallel over `--workers` processes with a tqdm bar; resumable: an output
   that exists and decodes is kept, new outputs go to a hidden temporary name and are renamed when
   complete. `--tune fastdecode` (the default) turns off CABAC (CAVLC entropy coding) and the
   deblocking filter, the two costliest parts of H.264 decoding; `--tune none` keeps x264's defaults.

Measured effect on the loader (bench/bench_data.py, 2026-12-01, the 2-core dev machine, torch 2.13
CPU, PyAV 18.1; 340x256, 10 s, 30 fps synthetic clips; one process, one thread; KineticsDataset
training clips per CPU-second, median of interleaved rounds): the prepared copy (short side 256,
keyframe every 30, crf 23, tune fastdecode) against the original with a keyframe every 250 frames
gave X3D-S 13x6 56.7 vs 23.1 clips/s (2.46x) and X3D-M 16x5 45.6 vs 21.2 (2.15x); 2.40-2.49x and
2.07-2.25x over four runs. Of that, the 30-frame keyframes give 1.73x (S) / 1.58x (M) and
fastdecode another 1.51x / 1.43x (one change at a time, 8 videos, 5 interleaved rounds);
fastdecode made the files 12% larger at the same crf and cost 0.05 dB PSNR against the rendered
frames (29.69 vs 29.74 dB).
A training window decodes from the keyframe at most 29 frames before it instead of from frame 0.
Multi-view test loading gains little (1.13-1.31x): ten windows spread over the video decode every
frame anyway. Sources larger than 256 also shrink.

4. `--frame-store NEW_ROOT [--short-side 256 --quality 92 --small-side 0 --frame-fps 30]`: one
   `frame_store` file per video (`<label>/<stem>.frames`, or `<id>.frames` for a flat
   `<root>/<id>` tree such as Charades_v1_rgb): every frame as a JPEG at the short side, readable
   one by one, with a restart marker after every 16 x 16 MCU so a training clip decodes only the
   part of each frame its crop covers (`jpeg_region`). Sources: video files and JPEG frame folders, in label folders or flat (frame
   folders carry no rate: `--frame-fps`, 24 for Charades). Parallel with a tqdm bar; each file is
   written to a hidden temporary name, verified (checksums, sizes) and renamed, so a killed run
   resumes: verified files of the current format with the same settings are kept (older-format
   files are converted again), partial ones removed. Unreadable
   sources are named on stderr and in `NEW_ROOT/bad_videos.txt`; for label folders the annotation
   lists go to `<root>/annotations` and `NEW_ROOT/annotations` as with `--reencode`. The decode
   check is the conversion itself (every frame is decoded). Measured (bench/bench_store.py,
   2026-12-03, 340x256 10 s videos, one process, idle 2-core machine): 620-655 CPU-s per 1,000
   videos (re-encode: 526-704), 1.20x the disk of JPEG frame folders of the same frames.
"""
import argparse
import math
import multiprocessing
import os
import re
import sys
from typing import NamedTuple

import av
import numpy as np

import frame_store
from video_io import (IMAGE_EXTENSIONS, STORE_EXTENSION, VIDEO_EXTENSIONS, VideoDecodeError, VideoFile,
                      list_frame_files, orient, read_image_frames)

KINETICS_STEM = re.compile(r"^(?P<youtube_id>.+)_(?P<start>\d{6})_(?P<end>\d{6})$")
PARTIAL_TAG = ".partial-"
X264_TUNES = ("fastdecode", "film", "animation", "grain", "stillimage", "psnr", "ssim", "zerolatency")


class VideoEntry(NamedTuple):
    """One video of the tree: its path relative to the root ('/'-separated) and its label (folder name)."""
    path: str
    label: str


def parse_kinetics_stem(stem):
    """(youtube_id, start, end) of an official clip stem `<id>_<start:06d>_<end:06d>`, else None."""
    match = KINETICS_STEM.match(stem)
    if match is None:
        return None
    return match["youtube_id"], int(match["start"]), int(match["end"])


def _is_video_name(name):
    """A visible file name with a video extension (hidden names are temporaries)."""
    return not name.startswith(".") and name.lower().endswith(VIDEO_EXTENSIONS)


def scan_tree(root, skip=()):
    """(entries, ignored) of `<root>/<label>/<file>` and `<root>/<label>/<video>/<frames>`: video
    file and frame folder entries sorted by path, and the other files found (relative paths).
    Folders named in `skip` (e.g. the annotation folder) and hidden names are left out. Raises
    FileNotFoundError for a missing root, PermissionError naming an unreadable folder and
    ValueError for a tree without videos."""
    return _scan(root, skip, flat=False)


def _write_text(path, text):
    """Write a text file atomically (temporary sibling + rename)."""
    tmp = f"{path}{PARTIAL_TAG}{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _csv_field(text):
    """A CSV field, quoted when it holds a comma, quote or space (as the official files quote labels)."""
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ', "') else text


def write_annotations(entries, out_dir, split="train"):
    """Write `classes.txt` and `<split>.csv` (all stems official) or `<split>.txt` (`path label_index`)
    into `out_dir`; return {"classes": path, "annotations": path, "format": "csv" | "list"}."""
    if not entries:
        raise ValueError(f"no video to write annotations for in {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    classes = sorted({entry.label for entry in entries})
    index = {name: i for i, name in enumerate(classes)}
    parsed = [parse_kinetics_stem(os.path.splitext(os.path.basename(e.path))[0]) for e in entries]
    if all(parsed):
        lines = ["label,youtube_id,time_start,time_end,split"]
        lines += [f"{_csv_field(e.label)},{p[0]},{p[1]},{p[2]},{split}" for e, p in zip(entries, parsed)]
        path, kind = os.path.join(out_dir, f"{split}.csv"), "csv"
    else:
        lines = [f"{e.path} {index[e.label]}" for e in entries]
        path, kind = os.path.join(out_dir, f"{split}.txt"), "list"
    _write_text(path, "\n".join(lines) + "\n")
    class_path = os.path.join(out_dir, "classes.txt")
    _write_text(class_path, "".join(f"{name}\n" for name in classes))
    return {"classes": class_path, "annotations": path, "format": kind}


def check_video(path, probes=3):
    """None when `path` decodes, else the reason: header read, then `probes` frames spread from the
    first to the stated last one are read as the loader reads them (`video_io.VideoFile`: after a
    seek, judged by time stamps, so a variable-rate video whose last frames run longer than the
    average passes and a file whose data stops before its stated duration fails)."""
    if not os.access(path, os.R_OK):
        return "file is not readable (permissions)" if os.path.exists(path) else "no such file"
    try:
        video = VideoFile(path)
    except VideoDecodeError as error:
        return error.reason
    with video:
        last = video.num_frames - 1
        for target in sorted({round(last * k / max(probes - 1, 1)) for k in range(probes)}):
            try:
                video.read([target])
            except VideoDecodeError as error:
                return f"frame {target} of the {video.num_frames} it states: {error.reason}"
        if video.stated_duration:
            try:  # a read past the stated end runs through the last packets: they must reach that end
                video.read([max(last, math.ceil(video.stated_duration * video.fps))])
            except VideoDecodeError as error:
                return error.reason
    return None


def check_frame_folder(path):
    """None when the JPEG frame folder `path` is sound, else the reason: listed (a gap in the
    numbering fails, see `video_io.numbering_gap`) and every frame decoded (shrunk in the decoder)
    at one size."""
    try:
        files = list_frame_files(path)
        read_image_frames(files, min_short_side=1)
    except VideoDecodeError as error:
        where = os.path.relpath(error.path, path)
        return error.reason if where == "." else f"{where}: {error.reason}"
    return None


def _check_job(path):
    """Worker entry for `check_videos`: a frame folder or a video file."""
    return path, check_frame_folder(path) if os.path.isdir(path) else check_video(path)


def _parallel(function, items, workers, progress, description):
    """`function` over `items` (in order) on `workers` processes (inline when 1), with a tqdm bar."""
    from tqdm import tqdm

    items = list(items)
    if workers <= 1 or len(items) <= 1:
        bar = tqdm(items, desc=description, unit="video", disable=not progress)
        return [function(item) for item in bar]
    # fork (where available) so workers do not re-import torch; the pool starts before tqdm's thread
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(min(workers, len(items))) as pool:
        results = pool.imap(function, items, chunksize=1)
        return list(tqdm(results, total=len(items), desc=description, unit="video", disable=not progress))


def check_videos(paths, workers=1, progress=False):
    """{path: reason} of every path in `paths` that fails `check_video` (frame folders:
    `check_frame_folder`); empty when all decode."""
    results = _parallel(_check_job, paths, workers, progress, "checking")
    return {path: reason for path, reason in results if reason is not None}


def scaled_even_size(width, height, short_side):
    """(width, height) with the short side scaled down to `short_side` (never up), both rounded to even."""
    scale = min(1.0, short_side / min(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def _is_prepared(path, short_side, source_size):
    """True when `path` exists, decodes, and has the size a re-encode of `source_size` would give."""
    if not os.path.exists(path) or check_video(path) is not None:
        return False
    with av.open(path) as container:
        context = container.streams.video[0].codec_context
        return (context.width, context.height) == scaled_even_size(*source_size, short_side)


def add_h264_stream(container, rate, width, height, keyframe_interval, crf=23, preset="veryfast", tune=None):
    """Add a single-threaded libx264 yuv420p stream to an output container: fixed keyframe interval,
    no scene-cut keyframes, x264 `tune` when given; returns the stream (feed it yuv420p frames)."""
    encoder = container.add_stream("libx264", rate=rate)
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.codec_context.thread_count = 1
    options = {"crf": str(crf), "preset": preset,
               "x264-params": f"keyint={keyframe_interval}:min-keyint={keyframe_interval}:scenecut=0"}
    encoder.options = dict(options, tune=tune) if tune else options
    return encoder


def reencode_video(src, dst, short_side=256, keyframe_interval=30, crf=23, preset="veryfast", tune="fastdecode"):
    """Re-encode `src` to an H.264 mp4 `dst` (see the module docstring); return "kept" when `dst`
    already holds a decodable output of the right size, else "encoded".

    Output frame i is the frame the loader reads as index i of `src` (`VideoFile.frames_in_order`),
    so a variable-rate source keeps its timing at a constant rate, and it is stored upright: a
    source with rotation metadata is turned (losslessly, plane by plane) and the output has none.
    """
    with VideoFile(src, single_thread=True) as video:  # one process per core: the pool gives the parallelism
        if _is_prepared(dst, short_side, (video.width, video.height)):
            return "kept"
        width, height = scaled_even_size(video.width, video.height, short_side)
        turn = video.orientation
        coded = (height, width) if turn is not None and turn[0] else (width, height)
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        head, tail = os.path.split(dst)
        tmp = os.path.join(head, f".{tail}{PARTIAL_TAG}{os.getpid()}.mp4")
        try:
            with av.open(tmp, "w", format="mp4") as out:
                encoder = add_h264_stream(out, video.rate, width, height, keyframe_interval, crf, preset, tune)
                for index, frame in video.frames_in_order():
                    frame = _upright(frame.reformat(*coded, "yuv420p", interpolation="AREA"), turn)
                    frame.pts, frame.time_base = index, 1 / video.rate
                    out.mux(encoder.encode(frame))
                out.mux(encoder.encode(None))
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return "encoded"


def _upright(frame, orientation):
    """A yuv420p frame (even size) turned as `orientation` says (`video_io.display_orientation`), each
    plane moved as it is: no resampling."""
    if orientation is None:
        return frame
    width, height = frame.width, frame.height
    packed = frame.to_ndarray()  # (height * 3 / 2, width): Y, then U, then V, each plane's rows in a row
    luma = packed[:height]
    chroma = packed[height:].reshape(2, height // 2, width // 2)
    planes = [orient(luma, orientation)] + [orient(plane, orientation) for plane in chroma]
    turned_width = planes[0].shape[1]
    flat = np.concatenate([plane.ravel() for plane in planes])
    return av.VideoFrame.from_ndarray(flat.reshape(-1, turned_width), format="yuv420p")


def _output_path(out_root, entry):
    """Where the re-encode of `entry` goes: same label folder and stem, `.mp4`."""
    return os.path.join(out_root, os.path.splitext(entry.path)[0] + ".mp4")


def _reencode_job(job):
    """Worker entry for `reencode_tree`: (entry, status or None, error or None)."""
    entry, src, dst, options = job
    try:
        return entry, reencode_video(src, dst, **options), None
    except (av.error.FFmpegError, VideoDecodeError, OSError, ValueError) as error:
        return entry, None, str(error) or type(error).__name__


def _remove_partials(out_root):
    """Delete temporary outputs an interrupted run left in `out_root`."""
    for folder, _, names in os.walk(out_root):
        for name in names:
            if name.startswith(".") and PARTIAL_TAG in name:
                os.remove(os.path.join(folder, name))


def reencode_tree(root, out_root, entries, short_side=256, keyframe_interval=30, crf=23, preset="veryfast",
                  tune="fastdecode", workers=1, progress=False):
    """Re-encode `entries` of `root` into `out_root` (same layout, `.mp4`); return
    ({"encoded": n, "kept": n}, {relative path: error})."""
    if os.path.realpath(root) == os.path.realpath(out_root):
        raise ValueError(f"re-encode output {out_root} is the source root; choose a new folder")
    os.makedirs(out_root, exist_ok=True)
    _remove_partials(out_root)
    options = dict(short_side=short_side, keyframe_interval=keyframe_interval, crf=crf, preset=preset, tune=tune)
    jobs = [(e, os.path.join(root, e.path), _output_path(out_root, e), options) for e in entries]
    counts, failed = {"encoded": 0, "kept": 0}, {}
    for entry, status, error in _parallel(_reencode_job, jobs, workers, progress, "re-encoding"):
        if error is None:
            counts[status] += 1
        else:
            failed[entry.path] = error
    return counts, failed


def _holds_images(folder):
    """True when `folder` directly holds frame images (a JPEG frame folder)."""
    try:
        with os.scandir(folder) as children:
            return any(child.name.lower().endswith(IMAGE_EXTENSIONS) for child in children)
    except OSError:
        return False


def scan_sources(root, skip=()):
    """(entries, ignored) of every video file and JPEG frame folder under `root`, in either layout:
    `<root>/<label>/<video file or frame folder>` (label = folder name) or flat `<root>/<id>` (a video
    file or frame folder right under root, as Charades_v1_rgb; label ""). Raises like `scan_tree`."""
    return _scan(root, skip, flat=True)


def _is_source(path, name):
    """A video file or a JPEG frame folder."""
    return _is_video_name(name) and os.path.isfile(path) or os.path.isdir(path) and _holds_images(path)


def _scan(root, skip, flat):
    """scan_tree (flat=False) and scan_sources (flat=True: sources right under root count too)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"video root {root} does not exist or is not a folder")
    entries, ignored = [], []
    skip = {os.path.realpath(path) for path in skip}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".") or os.path.realpath(path) in skip:
            continue
        if flat and _is_source(path, name):
            entries.append(VideoEntry(name, ""))
        elif not os.path.isdir(path):
            ignored.append(name)
        else:
            try:
                names = sorted(os.listdir(path))
            except OSError as error:
                raise PermissionError(f"cannot list label folder {path}: {error.strerror}") from None
            for child in names:
                relative = f"{name}/{child}"
                if _is_source(os.path.join(path, child), child):
                    entries.append(VideoEntry(relative, name))
                elif not child.startswith("."):
                    ignored.append(relative)
    if not entries:
        flat_layout = f", or flat {os.path.join(root, '<id>')} videos or frame folders" if flat else ""
        raise ValueError(f"no video file ({'/'.join(VIDEO_EXTENSIONS)}) or JPEG frame folder found under {root}; "
                         f"expected {os.path.join(root, '<label>', '<file>.mp4')} or a frame folder in its "
                         f"place ({os.path.join(root, '<label>', '<video>', '<frame>.jpg')}){flat_layout}")
    return entries, ignored


def store_path(entry):
    """Relative path of the store file of `entry`: its video extension (if any) replaced by `.frames`."""
    stem, ext = os.path.splitext(entry.path)
    return (stem if ext.lower() in VIDEO_EXTENSIONS else entry.path) + STORE_EXTENSION


def _store_job(job):
    """Worker entry for `store_tree`: (entry, status or None, error or None)."""
    entry, src, dst, options = job
    try:
        if frame_store.store_matches(dst, options["short_side"], options["small_side"], options["quality"]):
            return entry, "kept", None
        frame_store.write_store(src, dst, **options)
        return entry, "written", None
    except (VideoDecodeError, av.error.FFmpegError, OSError, ValueError, RuntimeError) as error:
        return entry, None, str(error) or type(error).__name__


def store_tree(root, out_root, entries, short_side=frame_store.DEFAULT_SHORT_SIDE, small_side=None,
               quality=frame_store.DEFAULT_QUALITY, frame_fps=30.0, workers=1, progress=False):
    """Convert `entries` of `root` (video files, frame folders) into frame store files under `out_root`
    (same layout, `.frames`); finished files are kept, partial ones removed and redone. Return
    ({"written": n, "kept": n}, {relative source path: reason it could not be converted})."""
    if os.path.realpath(root) == os.path.realpath(out_root):
        raise ValueError(f"frame store output {out_root} is the source root; choose a new folder")
    os.makedirs(out_root, exist_ok=True)
    _remove_partials(out_root)
    options = dict(short_side=short_side, small_side=small_side, quality=quality, frame_fps=frame_fps)
    jobs = [(e, os.path.join(root, e.path), os.path.join(out_root, store_path(e)), options) for e in entries]
    counts, failed = {"written": 0, "kept": 0}, {}
    for entry, status, error in _parallel(_store_job, jobs, workers, progress, "frame store"):
        if error is None:
            counts[status] += 1
        else:
            failed[entry.path] = error
    return counts, failed


def _frame_store_main(args, root, out_dir, progress):
    """`--frame-store NEW_ROOT`: convert every source, name the unreadable ones, write annotation lists."""
    out_root = os.path.abspath(args.frame_store)
    try:
        entries, ignored = scan_sources(root, skip=[out_dir, out_root])
        counts, failed = store_tree(root, out_root, entries, args.short_side, args.small_side or None,
                                    args.quality, args.frame_fps, args.workers, progress)
    except (OSError, ValueError) as error:
        print(f"prepare_videos: {error}", file=sys.stderr)
        return 2
    print(f"{root}: {len(entries)} videos / frame folders"
          + (f"; ignored {len(ignored)} other entries (first: {', '.join(ignored[:3])})" if ignored else ""))
    for path, error in sorted(failed.items()):
        print(f"UNREADABLE {os.path.join(root, path)}: {error}", file=sys.stderr)
    bad_file = os.path.join(out_root, "bad_videos.txt")
    _write_text(bad_file, "".join(f"{path}\t{reason}\n" for path, reason in sorted(failed.items())))
    print(f"frame store {out_root}: {counts['written']} written, {counts['kept']} already done, "
          f"{len(failed)} unreadable (listed in {bad_file})")
    good = [e for e in entries if e.path not in failed]
    if good and all(e.label for e in entries):  # a flat layout (Charades) keeps its own annotation files
        written = write_annotations(good, out_dir, args.split)
        stored = write_annotations([VideoEntry(store_path(e), e.label) for e in good],
                                   os.path.join(out_root, "annotations"), args.split)
        print(f"wrote {written['annotations']} and {stored['annotations']} ({stored['format']})")
    return 1 if failed else 0


def _arguments(argv):
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="dataset root laid out <root>/<label>/<video file>")
    parser.add_argument("--annotations", help="folder for the annotation files (default <root>/annotations)")
    parser.add_argument("--split", default="train", help="split name: file name and CSV split column")
    parser.add_argument("--no-check", action="store_true", help="skip the decode check")
    parser.add_argument("--drop-bad", action="store_true",
                        help="leave files that fail the check out of the annotations (exit 0)")
    parser.add_argument("--reencode", metavar="NEW_ROOT", help="re-encode every good video into NEW_ROOT")
    parser.add_argument("--short-side", type=int, default=256,
                        help="re-encode / frame store short side (never upscaled)")
    parser.add_argument("--keyframe-interval", type=int, default=30, help="re-encode keyframe interval, frames")
    parser.add_argument("--crf", type=int, default=23, help="x264 constant rate factor")
    parser.add_argument("--preset", default="veryfast", help="x264 preset")
    parser.add_argument("--tune", default="fastdecode", choices=("none",) + X264_TUNES,
                        help="x264 tune; fastdecode (CAVLC, no deblocking) decodes 1.4-1.5x faster; none: "
                             "x264's defaults")
    parser.add_argument("--frame-store", metavar="NEW_ROOT",
                        help="convert every video file or JPEG frame folder (label folders or flat <root>/<id>) "
                             "into one frame store file each under NEW_ROOT")
    parser.add_argument("--quality", type=int, default=frame_store.DEFAULT_QUALITY, help="frame store JPEG quality")
    parser.add_argument("--small-side", type=int, default=frame_store.DEFAULT_SMALL_SIDE,
                        help="frame store: short side of a second, smaller copy of each frame (0: none)")
    parser.add_argument("--frame-fps", type=float, default=30.0,
                        help="frame rate of JPEG frame folders (they carry none); Charades_v1_rgb: 24")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("short_side", "keyframe_interval", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality must be in 1..100, got {args.quality}")
    if args.small_side < 0 or args.frame_fps <= 0:
        parser.error(f"--small-side must be >= 0 and --frame-fps > 0, got {args.small_side} and {args.frame_fps}")
    if args.frame_store and args.reencode:
        parser.error("--frame-store and --reencode write different outputs; run them one at a time")
    return args


def main(argv=None):
    """Command-line entry; returns the exit code (0 ok, 1 bad or failed videos, 2 bad input)."""
    args = _arguments(argv)
    root, progress = os.path.abspath(args.root), not args.no_progress
    out_dir = os.path.abspath(args.annotations or os.path.join(root, "annotations"))
    if args.frame_store:
        return _frame_store_main(args, root, out_dir, progress)
    try:
        entries, ignored = scan_tree(root, skip=[out_dir])
    except (OSError, ValueError) as error:
        print(f"prepare_videos: {error}", file=sys.stderr)
        return 2
    labels = len({entry.label for entry in entries})
    print(f"{root}: {len(entries)} videos in {labels} label folders"
          + (f"; ignored {len(ignored)} other entries (first: {', '.join(ignored[:3])})" if ignored else ""))
    bad = {}
    if not args.no_check:
        reasons = check_videos([os.path.join(root, e.path) for e in entries], args.workers, progress)
        bad = {os.path.relpath(path, root).replace(os.sep, "/"): reason for path, reason in reasons.items()}
        os.makedirs(out_dir, exist_ok=True)
        bad_file = os.path.join(out_dir, "bad_videos.txt")
        _write_text(bad_file, "".join(f"{path}\t{reason}\n" for path, reason in sorted(bad.items())))
        for path, reason in sorted(bad.items()):
            print(f"BAD {os.path.join(root, path)}: {reason}", file=sys.stderr)
        print(f"decode check: {len(entries) - len(bad)} ok, {len(bad)} bad (listed in {bad_file})")
    good = [e for e in entries if e.path not in bad]
    if not good:
        print(f"prepare_videos: no video under {root} decodes; nothing to annotate", file=sys.stderr)
        return 1
    written = write_annotations(good if args.drop_bad else entries, out_dir, args.split)
    print(f"wrote {written['annotations']} ({written['format']}) and {written['classes']}")
    status = 1 if bad and not args.drop_bad else 0
    if args.reencode:
        out_root = os.path.abspath(args.reencode)
        folders = [e for e in good if os.path.isdir(os.path.join(root, e.path))]
        if folders:
            print(f"{len(folders)} frame folders are not re-encoded (only video files are; first: {folders[0].path})")
            good = [e for e in good if e not in folders]
        try:
            counts, failed = reencode_tree(root, out_root, good, args.short_side, args.keyframe_interval,
                                           args.crf, args.preset, None if args.tune == "none" else args.tune,
                                           args.workers, progress)
        except (OSError, ValueError) as error:
            print(f"prepare_videos: {error}", file=sys.stderr)
            return 2
        for path, error in sorted(failed.items()):
            print(f"FAILED {os.path.join(root, path)}: {error}", file=sys.stderr)
        done = [VideoEntry(os.path.splitext(e.path)[0] + ".mp4", e.label) for e in good if e.path not in failed]
        if done:
            written = write_annotations(done, os.path.join(out_root, "annotations"), args.split)
            print(f"re-encoded into {out_root}: {counts['encoded']} encoded, {counts['kept']} already done, "
                  f"{len(failed)} failed; wrote {written['annotations']}")
        status = 1 if failed else status
    return status


if __name__ == "__main__":
    sys.exit(main())
