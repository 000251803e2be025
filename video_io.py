"""Decoding shared by every dataset: PyAV for video files, simplejpeg / Pillow for JPEG frame folders.

Every reader returns uint8 frames laid out (T, H, W, C) with C = 3 (RGB), the layout that
`transforms` works on, and raises `VideoDecodeError(path, reason)` for any input it cannot decode,
so a dataset needs to catch one exception type only.
"""
import io
import math
import os
import re

import av
import av.video.reformatter
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

try:
    import simplejpeg
except ImportError:  # Pillow alone still decodes everything, only slower
    simplejpeg = None

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


_INEXACT = object()  # VideoFile._decode: skipping frames cannot give this read exactly


class VideoDecodeError(Exception):
    """A video file, frame folder or frame image that cannot be decoded; names the path and why."""

    def __init__(self, path, reason):
        """Keep the offending path and a short reason."""
        super().__init__(f"cannot decode {path}: {reason}")
        self.path = str(path)
        self.reason = str(reason)

    def __reduce__(self):
        """Pickle by (path, reason) so the error survives a DataLoader worker boundary."""
        return (VideoDecodeError, (self.path, self.reason))


class TooManyFailures(RuntimeError):
    """Too many videos in a row could not be decoded: the dataset needs a look, not a replacement."""


def shrink_factor(short_side, min_short_side, factors=(8, 4, 2)):
    """Largest integer factor in `factors` that keeps `short_side / factor >= min_short_side` (1 if none)."""
    if not min_short_side:
        return 1
    for factor in factors:
        if short_side // factor >= min_short_side:
            return factor
    return 1


class _Source:
    """Context-manager plumbing shared by VideoFile and FrameFolder."""

    def close(self):
        """Release what the source holds (nothing by default)."""

    def __enter__(self):
        """Context-manager entry."""
        return self

    def __exit__(self, *exc):
        """Context-manager exit: close the source."""
        self.close()


class VideoFile(_Source):
    """An open video file: `.num_frames`, `.fps`, `.width`, `.height` and `.read(indices)`."""

    def __init__(self, path):
        """Open `path` with PyAV and read its stream metadata; raises VideoDecodeError."""
        self.path = str(path)
        try:
            self._container = av.open(self.path)
        except (av.error.FFmpegError, OSError, ValueError) as error:
            raise VideoDecodeError(self.path, f"not a readable video ({error})") from None
        try:
            if not self._container.streams.video:
                raise VideoDecodeError(self.path, "no video stream")
            self._stream = self._container.streams.video[0]
            rate = self._stream.average_rate or self._stream.guessed_rate
            if not rate or self._stream.codec_context.width <= 0:
                raise VideoDecodeError(self.path, "video stream has no frame rate or size")
            self.fps = float(rate)
            self.width = self._stream.codec_context.width
            self.height = self._stream.codec_context.height
            self._start_pts = self._stream.start_time or 0
            self._time_base = float(self._stream.time_base)
            self.num_frames = self._stream.frames or self._count_frames()
            self.frames_decoded = 0
            # frame.to_ndarray(format=...) builds a new swscale context for every frame (1.1 ms on a
            # 128x96 frame, ten times the decode); one reformatter keeps its context for the file
            self._reformatter = av.video.reformatter.VideoReformatter()
            if self.num_frames <= 0:
                raise VideoDecodeError(self.path, "video stream has no frames")
        except BaseException:
            self.close()
            raise

    def _count_frames(self):
        """Count packets when the container does not store a frame count (webm, mkv)."""
        try:
            count = sum(1 for packet in self._container.demux(self._stream) if packet.size)
            self._container.seek(0, stream=self._stream)
        except av.error.FFmpegError as error:
            raise VideoDecodeError(self.path, f"cannot demux ({error})") from None
        return count

    def _index_of(self, pts):
        """Frame index of a timestamp (time-based, so variable-rate safe)."""
        return int(round((pts - self._start_pts) * self._time_base * self.fps))

    def read(self, indices, *, min_short_side=None):
        """Frames at `indices` (any order, repeats allowed) as uint8 (T, H, W, 3).

        Seeks to the keyframe before the first needed frame and decodes only up to the last one;
        on the way, packets of frames that are not needed are handed to the decoder with
        `skip_frame = NONREF`, so the decoder drops them when no other frame refers to them
        (x264's non-reference B-frames: 84 of the 182 frames a 13x6 window of a 250-keyframe
        340x256 clip used to decode, 25% less decoding time). Frames that other frames refer to
        are always decoded, so every returned frame is exactly what a full decode gives; if a
        wanted index has no frame of its own (variable rate, or past the end of the stream, where
        the last frame is repeated: a short video is padded), the read is redone without skipping.
        `.frames_decoded` then holds how many frames the decoder produced (the cost of the read).
        With `min_short_side`, frames at least twice that size are shrunk by an integer factor
        during colour conversion, keeping the short side >= min_short_side.
        """
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("read needs at least one frame index")
        if min(indices) < 0:
            raise ValueError(f"negative frame index {min(indices)} for {self.path}")
        wanted = sorted(set(indices))
        self.frames_decoded = 0
        factor = shrink_factor(min(self.width, self.height), min_short_side)
        size = {"width": self.width // factor, "height": self.height // factor} if factor > 1 else {}
        try:
            got = self._decode(wanted, size, seek=True, skip=True)
            if got is _INEXACT:
                got = self._decode(wanted, size, seek=True, skip=False)
        except av.error.FFmpegError:
            got = None  # some containers cannot seek: decode from the start instead
        try:
            if got is None:  # the seek failed or landed after the first wanted frame
                got = self._decode(wanted, size, seek=False, skip=False)
        except av.error.FFmpegError as error:
            raise VideoDecodeError(self.path, f"decoding failed ({error})") from None
        if got is None or not got:
            raise VideoDecodeError(self.path, f"no frame decoded for indices {wanted[0]}..{wanted[-1]}")
        return torch.from_numpy(np.stack([got[i] for i in indices]))

    def _packets(self, wanted, skip):
        """The stream's packets from the current position; with `skip`, each packet's frame is
        marked droppable (NONREF) unless its index is wanted or unknown."""
        codec = self._stream.codec_context
        codec.skip_frame = "DEFAULT"
        wanted = set(wanted)
        try:
            for packet in self._container.demux(self._stream):
                if skip:
                    needed = packet.pts is None or self._index_of(packet.pts) in wanted
                    codec.skip_frame = "DEFAULT" if needed else "NONREF"
                yield packet
        finally:
            codec.skip_frame = "DEFAULT"

    def _decode(self, wanted, size, seek, skip):
        """Map each wanted index to an RGB array; None when a seek landed after wanted[0];
        _INEXACT when frames were skipped and a wanted index had no frame of its own."""
        first = wanted[0]
        target = self._start_pts + int(first / self.fps / self._time_base) if seek else self._start_pts
        self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        got, pending, previous, cache = {}, 0, None, [None, None]

        def rgb(frame):
            """RGB array of `frame`, converted once even when several indices share it."""
            if cache[0] is not frame:
                cache[:] = frame, self._to_rgb(frame, size)
            return cache[1]

        index = -1
        for packet in self._packets(wanted, skip):
            for frame in packet.decode():
                self.frames_decoded += 1
                if frame.pts is None and seek:
                    return None  # no timestamps: only counting frames from the start tells the index
                index = index + 1 if frame.pts is None else self._index_of(frame.pts)
                if previous is None and seek and 0 < first < index:
                    return None
                # a wanted index without a frame of its own (variable rate) takes the last earlier frame
                while pending < len(wanted) and wanted[pending] < index:
                    if skip:
                        return _INEXACT  # that earlier frame may have been dropped
                    got[wanted[pending]] = rgb(previous if previous is not None else frame)
                    pending += 1
                if pending < len(wanted) and wanted[pending] == index:
                    got[index] = rgb(frame)
                    pending += 1
                previous = frame
                if pending == len(wanted):
                    return got
        if previous is not None and pending < len(wanted):  # past the end: repeat the last frame
            if skip:
                return _INEXACT
            for index in wanted[pending:]:
                got[index] = rgb(previous)
        return got

    def _to_rgb(self, frame, size):
        """Convert one decoded frame to an RGB uint8 array, optionally shrunk by the scaler."""
        if size:
            return self._reformatter.reformat(frame, format="rgb24", interpolation="AREA", **size).to_ndarray()
        return self._reformatter.reformat(frame, format="rgb24").to_ndarray()

    def close(self):
        """Release the container."""
        container, self._container = getattr(self, "_container", None), None
        if container is not None:
            container.close()


def video_info(path):
    """(num_frames, fps, width, height) of a video file; raises VideoDecodeError."""
    with VideoFile(path) as video:
        return video.num_frames, video.fps, video.width, video.height


def read_video_frames(path, indices, *, min_short_side=None):
    """uint8 (T, H, W, 3) frames of a video file at `indices` (seek + partial decode, see VideoFile.read)."""
    with VideoFile(path) as video:
        return video.read(indices, min_short_side=min_short_side)


def _natural_key(name):
    """Sort key that orders frame_2.jpg before frame_10.jpg."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


_DIGITS_TO_ZERO = str.maketrans("123456789", "000000000")


def natural_sorted(names):
    """`names` in natural order (frame_2.jpg before frame_10.jpg).

    When every name has the same template (zero-padded numbers, as frame extractors write them:
    `<id>-000001.jpg`), plain string order is natural order and is used; it is about 10x cheaper
    than the natural key, which matters because a frame folder is listed for every clip.
    """
    names = list(names)
    if len(set("\n".join(names).translate(_DIGITS_TO_ZERO).split("\n"))) <= 1:
        return sorted(names)
    return sorted(names, key=_natural_key)


def list_frame_files(folder):
    """Sorted image paths of a JPEG frame folder; raises VideoDecodeError when there are none."""
    try:
        names = [name for name in os.listdir(folder) if name.lower().endswith(IMAGE_EXTENSIONS)]
    except OSError as error:
        raise VideoDecodeError(folder, f"cannot list frame folder ({error.strerror})") from None
    if not names:
        raise VideoDecodeError(folder, f"frame folder holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    folder = folder if folder.endswith(os.sep) else folder + os.sep
    return [folder + name for name in natural_sorted(names)]


def _read_bytes(path):
    """The bytes of a frame file; raises VideoDecodeError naming it."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise VideoDecodeError(path, f"cannot read ({error.strerror})") from None


def _jpeg_header(data):
    """(height, width) of JPEG bytes when simplejpeg can read them, else None."""
    if simplejpeg is None or not simplejpeg.is_jpeg(data):
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return height, width
    except ValueError:
        return None


def image_size(path):
    """(width, height) of one frame image, read from its header only; raises VideoDecodeError."""
    data = _read_bytes(path)
    header = _jpeg_header(data)
    if header is not None:
        return header[1], header[0]
    return _pillow_open(path, data).size


def _pillow_open(path, data):
    """Open image bytes with Pillow, mapping every failure to VideoDecodeError."""
    try:
        image = Image.open(io.BytesIO(data))
        image.size  # noqa: B018 - touching size makes Pillow parse the header now
        return image
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise VideoDecodeError(path, f"not a readable image ({error})") from None


def decode_image(path, min_short_side=None, out=None):
    """One frame image as uint8 (H, W, 3): simplejpeg, Pillow as the fallback.

    With `min_short_side`, an image at least twice that size is shrunk in the decoder by 2, 4 or 8
    (libjpeg-turbo scaled IDCT / Pillow `draft`), keeping the short side >= min_short_side.
    `out`, a C-contiguous uint8 (H, W, 3) array, receives the pixels when the image decodes to
    exactly that shape (no copy); the returned array is then `out`.
    """
    data = _read_bytes(path)
    header = _jpeg_header(data)
    if header is not None:
        factor = shrink_factor(min(header), min_short_side)
        scaled = {} if factor == 1 else dict(min_factor=factor, min_height=min(header) // factor,
                                             min_width=min(header) // factor)
        fits = out is not None and out.shape == (-(-header[0] // factor), -(-header[1] // factor), 3)
        try:
            image = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out if fits else None, **scaled)
            if not fits:
                return image
            # a scaled size other than ceil(size / factor) landed in `out` laid out wrongly: copy it out
            return out if image.shape == out.shape else image.copy()
        except ValueError:
            pass  # e.g. a CMYK or progressive-corrupt file: let Pillow try and report
    image = _pillow_open(path, data)
    try:
        if min_short_side:
            factor = shrink_factor(min(image.size), min_short_side)
            if factor > 1 and image.format == "JPEG":
                image.draft("RGB", (image.size[0] // factor, image.size[1] // factor))
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise VideoDecodeError(path, f"image decoding failed ({error})") from None


def read_image_frames(paths, *, min_short_side=None):
    """uint8 (T, H, W, 3) from a list of frame image paths (repeats decoded once).

    Frames after the first are decoded straight into the output array. All frames must share one
    size; an unreadable frame raises VideoDecodeError naming its file.
    """
    paths = [str(path) for path in paths]
    if not paths:
        raise ValueError("read_image_frames needs at least one path")
    first = decode_image(paths[0], min_short_side)
    frames = np.empty((len(paths),) + first.shape, np.uint8)
    frames[0] = first
    decoded = {paths[0]: 0}
    for t, path in enumerate(paths[1:], start=1):
        if path in decoded:
            frames[t] = frames[decoded[path]]
            continue
        slot = frames[t]
        image = decode_image(path, min_short_side, out=slot)
        if image.shape != first.shape:
            raise VideoDecodeError(path, f"frame size {image.shape[1]}x{image.shape[0]} differs from "
                                         f"{first.shape[1]}x{first.shape[0]} of {paths[0]}")
        if image is not slot:
            slot[:] = image
        decoded[path] = t
    return torch.from_numpy(frames)


def fps_resample_indices(num_frames, fps, target_fps):
    """Source frame indices that resample a `num_frames` video at `fps` to `target_fps` (nearest earlier frame).

    Returns an int64 tensor of length floor(num_frames * target_fps / fps) (at least 1).
    """
    if fps <= 0 or target_fps <= 0:
        raise ValueError(f"fps and target_fps must be positive, got {fps} and {target_fps}")
    count = max(1, int(math.floor(num_frames * target_fps / fps + 1e-9)))
    index = torch.floor(torch.arange(count, dtype=torch.float64) * (fps / target_fps) + 1e-9).long()
    return index.clamp_(0, num_frames - 1)


class FrameFolder(_Source):
    """A folder of frame images read like a video: `.num_frames`, `.fps`, `.width`, `.height`, `.read`."""

    def __init__(self, path, fps=30.0):
        """List the frames of `path` (natural sort order); `fps` is the rate they were extracted at."""
        self.path = str(path)
        self.files = list_frame_files(self.path)
        self.num_frames = len(self.files)
        self.fps = float(fps)
        self.width, self.height = image_size(self.files[0])

    def read(self, indices, *, min_short_side=None):
        """uint8 (T, H, W, 3) frames at `indices`; indices past the last frame repeat it (padding)."""
        indices = [int(i) for i in indices]
        if not indices or min(indices) < 0:
            raise ValueError(f"read needs non-negative frame indices, got {indices[:4]} for {self.path}")
        last = self.num_frames - 1
        return read_image_frames([self.files[min(i, last)] for i in indices], min_short_side=min_short_side)


def open_video(path, frame_fps=30.0):
    """A FrameFolder when `path` is a directory, else a VideoFile; raises VideoDecodeError."""
    if os.path.isdir(path):
        return FrameFolder(path, frame_fps)
    if not os.path.exists(path):
        raise VideoDecodeError(path, "no such file or folder")
    return VideoFile(path)


def read_with_retries(read, index, count, seed, max_retries, log, what):
    """Call `read(index, generator)`; an undecodable video is replaced by another one, counted.

    The replacement index is drawn from the same seeded generator, so the substitute does not
    depend on the worker either. Returns (result, index actually read, failures); after
    `max_retries` failures in a row a RuntimeError lists them.
    """
    import torch
    generator = torch.Generator().manual_seed(seed)
    failed = []
    while True:
        try:
            return read(index, generator), index, len(failed)
        except VideoDecodeError as error:
            failed.append(f"{error.path} ({error.reason})")
            log(f"{what}: replacing {error.path}: {error.reason}")
            if len(failed) >= max_retries:
                raise TooManyFailures(f"{len(failed)} videos in a row failed to decode: " + "; ".join(failed)
                                   + ". Check the dataset (prepare_videos.py tests every file).") from None
            index = int(torch.randint(count, (), generator=generator).item())
