"""Decoding shared by every dataset: PyAV for video files, simplejpeg / Pillow for JPEG frame folders
and frame store files (`frame_store`).

Every reader returns uint8 frames laid out (T, H, W, C) with C = 3 (RGB), the layout that
`transforms` works on, and raises `VideoDecodeError(path, reason)` for any input it cannot decode,
so a dataset needs to catch one exception type only.

What counts as undecodable, beyond files that do not open: a video file whose data ends before
the time its header states (a download cut off: the index at the front lists frames whose bytes
are missing) when a read needs a frame past the cut, and a frame folder whose numbering skips a
number. Frames come out in display orientation: a video's rotation / mirror metadata (the display
matrix a phone writes) is applied, and `.width` / `.height` are the displayed size.

The first `open_video` in a process sets glibc's malloc to keep freed blocks of up to
`HEAP_KEEP_BYTES` for reuse (`keep_freed_memory`): a clip's frame buffers are megabytes, and by
default malloc hands blocks that large back to the kernel when they are freed, so every clip paid
for fresh zeroed pages (about 700-1,000 page faults per X3D-M 16x224 clip, a sixth of its CPU time).
"""
import ctypes
import io
import math
import os
import re

import av
import av.sidedata.sidedata
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
STORE_EXTENSION = ".frames"  # frame_store files
READABLE_EXTENSIONS = VIDEO_EXTENSIONS + (STORE_EXTENSION,)  # files a dataset can read


_INEXACT = object()  # VideoFile._decode: skipping frames cannot give this read exactly
_UNKNOWN = object()  # VideoFile: display orientation not read yet (it comes with the first decoded frame)


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


def display_orientation(frame):
    """How to turn a decoded PyAV frame upright: (transpose, flip_rows, flip_columns), or None when
    it already is. Read from the display matrix the decoder attaches (rotation / mirror metadata).

    The matrix maps a coded pixel (x, y) (y down, about the centre) to x' = a*x + c*y,
    y' = b*x + d*y; only multiples of 90 degrees (with or without a mirror) occur in practice,
    anything else raises ValueError. The FFmpeg of the PyAV 18.1 wheels attaches the matrix to every
    decoded frame (tested); where an older FFmpeg attaches none, frames come out as stored.
    """
    try:
        data = frame.side_data[av.sidedata.sidedata.Type.DISPLAYMATRIX]
    except KeyError:
        return None
    a, b, _, c, d = np.frombuffer(bytes(data), np.int32)[:5].tolist()
    zero = 1 << 6  # 16.16 fixed point: cos(90 degrees) may round to a few units
    if abs(b) < zero and abs(c) < zero and abs(a) >= zero and abs(d) >= zero:
        orientation = (False, d < 0, a < 0)
    elif abs(a) < zero and abs(d) < zero and abs(b) >= zero and abs(c) >= zero:
        orientation = (True, b < 0, c < 0)
    else:
        angle = math.degrees(math.atan2(b, a))
        raise ValueError(f"display matrix {[a, b, c, d]} turns the picture by {angle:.0f} degrees; only "
                         "multiples of 90 are supported (re-encode the video upright)")
    return orientation if any(orientation) else None


def orient(array, orientation):
    """`array` (H, W[, C]) turned as `display_orientation` says (a view, no copy)."""
    if orientation is None:
        return array
    transpose, flip_rows, flip_columns = orientation
    if transpose:
        array = array.swapaxes(0, 1)
    if flip_rows:
        array = array[::-1]
    if flip_columns:
        array = array[:, ::-1]
    return array


class _Source:
    """What every frame source shares (VideoFile, FrameFolder, frame stores, Charades frame lists): context-manager plumbing and `size_hint`."""

    @property
    def size_hint(self):
        """(height, width) known without decoding a frame: the displayed size here (see VideoFile)."""
        return self.height, self.width

    def close(self):
        """Release what the source holds (nothing by default)."""

    def __enter__(self):
        """Context-manager entry."""
        return self

    def __exit__(self, *exc):
        """Context-manager exit: close the source."""
        self.close()


class VideoFile(_Source):
    """An open video file: `.num_frames`, `.fps` (`.rate` as a fraction), `.width`, `.height` (displayed),
    `.stated_duration` (seconds the header states, None when it states none) and `.read(indices)`."""

    def __init__(self, path, *, single_thread=False):
        """Open `path` with PyAV and read its stream metadata; raises VideoDecodeError. `single_thread`
        turns off the decoder's threads (for one process per core)."""
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
            self.rate, self.fps = rate, float(rate)
            if single_thread:
                self._stream.thread_type = "NONE"
            self._coded_size = (self._stream.codec_context.width, self._stream.codec_context.height)
            self._orientation = _UNKNOWN
            self._start_pts = self._stream.start_time or 0
            self._time_base = float(self._stream.time_base)
            self.stated_duration = self._stated_duration()  # seconds, or None
            self._data_end = None
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

    def _stated_duration(self):
        """Seconds the header says the video stream lasts (the container's duration when the video is
        its only stream), or None when it does not say."""
        if self._stream.duration:
            return self._stream.duration * self._time_base
        if self._container.duration and len(self._container.streams) == 1:
            return self._container.duration / av.time_base
        return None

    @property
    def orientation(self):
        """How decoded frames are turned upright (see `display_orientation`); decodes the first frame
        when no read has told it yet."""
        if self._orientation is _UNKNOWN:
            try:
                self._container.seek(self._start_pts, stream=self._stream, backward=True, any_frame=False)
                frame = next(iter(self._container.decode(self._stream)), None)
            except av.error.FFmpegError as error:
                raise VideoDecodeError(self.path, f"decoding failed ({error})") from None
            if frame is None:
                raise VideoDecodeError(self.path, "no frame decodes")
            self._learn_orientation(frame)
        return self._orientation

    def _learn_orientation(self, frame):
        """Set the orientation from a decoded frame; an unsupported one is a VideoDecodeError."""
        try:
            self._orientation = display_orientation(frame)
        except ValueError as error:
            raise VideoDecodeError(self.path, str(error)) from None

    @property
    def size_hint(self):
        """(height, width) without decoding: the displayed size once a read has told the orientation,
        else the coded size (the orientation comes with the first decoded frame)."""
        if self._orientation is _UNKNOWN:
            return self._coded_size[1], self._coded_size[0]
        return self.height, self.width

    @property
    def width(self):
        """Displayed width (the coded height when the video is turned by 90 or 270 degrees)."""
        turned = self.orientation is not None and self.orientation[0]
        return self._coded_size[1] if turned else self._coded_size[0]

    @property
    def height(self):
        """Displayed height."""
        turned = self.orientation is not None and self.orientation[0]
        return self._coded_size[0] if turned else self._coded_size[1]

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
        The end of the stream is judged by time: when the packets stop before the duration the
        header states (less one and a half frames), the file was cut off and a read that needs a
        frame past the cut raises VideoDecodeError instead of repeating the last frame that came.
        Frames are returned in display orientation (see `display_orientation`).
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
        width, height = self._coded_size  # scaled before turning: the short side is the same
        factor = shrink_factor(min(width, height), min_short_side)
        size = {"width": width // factor, "height": height // factor} if factor > 1 else {}
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
        period = 1 / self.fps / self._time_base
        self._data_end = None
        try:
            for packet in self._container.demux(self._stream):
                if packet.pts is not None and packet.size:
                    end = packet.pts + (packet.duration or period)
                    self._data_end = end if self._data_end is None else max(self._data_end, end)
                if skip:
                    needed = packet.pts is None or self._index_of(packet.pts) in wanted
                    codec.skip_frame = "DEFAULT" if needed else "NONREF"
                    self._dropped = self._dropped or not needed
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
        self._dropped = False  # set by _packets when it lets the decoder drop a frame

        def rgb(frame):
            """RGB array of `frame` in display orientation, converted once even when several indices share it."""
            if cache[0] is not frame:
                if self._orientation is _UNKNOWN:
                    self._learn_orientation(frame)
                cache[:] = frame, orient(self._to_rgb(frame, size), self._orientation)
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
                    if skip and self._dropped:
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
            self._check_not_cut(wanted[pending])
            if skip and self._dropped:
                return _INEXACT  # (when nothing was dropped, e.g. every frame wanted, the read is exact)
            for index in wanted[pending:]:
                got[index] = rgb(previous)
        return got

    def frames_in_order(self):
        """(index, av.VideoFrame) for every index 0..num_frames-1 once, in order, decoded from the start:
        the frame `read` gives for that index, before RGB conversion and turning upright (a cut file
        raises VideoDecodeError at the cut)."""
        self._container.seek(self._start_pts, stream=self._stream, backward=True, any_frame=False)
        next_index, previous = 0, None
        try:
            for packet in self._packets((), skip=False):
                for frame in packet.decode():
                    index = next_index if frame.pts is None else self._index_of(frame.pts)
                    while next_index < min(index, self.num_frames):  # no frame of its own: the last earlier one
                        yield next_index, frame if previous is None else previous
                        next_index += 1
                    if next_index == index < self.num_frames:
                        yield index, frame
                        next_index += 1
                    previous = frame
        except av.error.FFmpegError as error:
            raise VideoDecodeError(self.path, f"decoding failed ({error})") from None
        if previous is None:
            raise VideoDecodeError(self.path, "no frame decodes")
        if next_index < self.num_frames:
            self._check_not_cut(next_index)
        for index in range(next_index, self.num_frames):
            yield index, previous

    def _check_not_cut(self, index):
        """Raise VideoDecodeError naming frame `index` when the packets the last read went through
        stopped well before the stated duration (the read ran out of data); a complete stream, or
        one that states no duration, passes (its last frame pads what lies beyond)."""
        if self.stated_duration is None or self._data_end is None:
            return
        reached = (self._data_end - self._start_pts) * self._time_base
        if reached < self.stated_duration - 1.5 / self.fps:
            raise VideoDecodeError(self.path, f"file cut off: its video data ends at {reached:.2f} s of the "
                                              f"{self.stated_duration:.2f} s its header states; frame {index} "
                                              f"({index / self.fps:.2f} s) lies past the cut")

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


def read_drawn(source, indices, draw, generator):
    """(uint8 (T, H, W, 3) frames at `indices`, plan) where plan = draw(height, width) makes a training
    clip's spatial draws (short side, crop box, flip) with `generator` before decoding, so the frames
    decode no larger than the drawn short side needs (from a frame store, only the part the crop box
    covers: plan.window says where it sits). The draws use `source.size_hint`; a video file
    found turned by 90 or 270 degrees when its first frame decodes is drawn again on its displayed
    size from the same generator state and read again (rare, and the same draws as a known size gives)."""
    state = generator.get_state()
    size = source.size_hint
    plan = draw(*size)
    if hasattr(source, "read_window"):  # a frame store: decode only the part of each frame the box covers
        frames, window = source.read_window(indices, min_short_side=plan.short_side, box=plan.box,
                                            source_size=plan.source_size)
        return frames, plan._replace(window=window)
    frames = source.read(indices, min_short_side=plan.short_side)
    if (source.height, source.width) != size:
        generator.set_state(state)
        plan = draw(source.height, source.width)
        frames = source.read(indices, min_short_side=plan.short_side)
    return frames, plan


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
    return sorted(names) if _one_template(names) else sorted(names, key=_natural_key)


def _one_template(names):
    """True when the names differ in their digits only, digit for digit (`<id>-000001.jpg` ...)."""
    return len(set("\n".join(names).translate(_DIGITS_TO_ZERO).split("\n"))) <= 1


def list_frame_files(folder):
    """Sorted image paths of a JPEG frame folder; raises VideoDecodeError when there are none or when
    the numbering has a gap (see `numbering_gap`)."""
    try:
        names = [name for name in os.listdir(folder) if name.lower().endswith(IMAGE_EXTENSIONS)]
    except OSError as error:
        raise VideoDecodeError(folder, f"cannot list frame folder ({error.strerror})") from None
    if not names:
        raise VideoDecodeError(folder, f"frame folder holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    names = natural_sorted(names)
    gap = numbering_gap(names)
    if gap is not None:
        raise VideoDecodeError(folder, gap)
    folder = folder if folder.endswith(os.sep) else folder + os.sep
    return [folder + name for name in names]


_FRAME_NUMBER = re.compile(r"(\d+)(?=\D*$)")  # a frame's number: the last run of digits in its name


def numbering_gap(names):
    """None when frame names numbered in one pattern (`<id>-000042.jpg`, `img_42.jpg`) run without a
    gap from 0 or 1, else what is wrong, naming the first missing (or doubled) frame file.

    A missing frame would otherwise shift every later frame one step earlier in time. Names that do
    not share one pattern are not judged. `names` must be in natural order (`natural_sorted`).
    """
    first, last = _FRAME_NUMBER.search(names[0]), _FRAME_NUMBER.search(names[-1])
    if first is None or last is None:
        return None
    prefix, suffix = names[0][:first.start()], names[0][first.end():]
    if (_one_template(names) and names[-1][:last.start()] == prefix and int(first.group()) <= 1
            and int(last.group()) - int(first.group()) + 1 == len(names)):
        return None  # sorted names of one template with equal ends hold distinct numbers: none missing
    matches = [_FRAME_NUMBER.search(name) for name in names]
    if None in matches:
        return None
    if any(name[:m.start()] != prefix or name[m.end():] != suffix for name, m in zip(names, matches)):
        return None
    numbers = [int(m.group()) for m in matches]
    start = expected = min(numbers[0], 1)
    for position, number in enumerate(numbers):
        if number != expected:
            break
        expected += 1
    else:
        return None
    if number < expected:
        return f"frame number {number} appears twice ({names[position - 1]} and {names[position]})"
    width = len(first.group()) if first.group().startswith("0") else 0
    span = numbers[-1] - start + 1
    return (f"missing frame {prefix}{expected:0{width}d}{suffix} ({span - len(set(numbers))} of {span} numbers "
            "missing); later frames would shift in time: extract the frames again")


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
    """One frame image file as uint8 (H, W, 3): see `decode_image_bytes`."""
    return decode_image_bytes(_read_bytes(path), path, min_short_side, out)


def decode_image_bytes(data, path, min_short_side=None, out=None, fast_upsample=False, factor=None):
    """One frame image's bytes (`path` names it in errors) as uint8 (H, W, 3): simplejpeg, Pillow as the fallback.

    With `min_short_side`, an image at least twice that size is shrunk in the decoder by 2, 4 or 8
    (libjpeg-turbo scaled IDCT / Pillow `draft`), keeping the short side >= min_short_side.
    `out`, a C-contiguous uint8 (H, W, 3) array, receives the pixels when the image decodes to
    exactly that shape (no copy); the returned array is then `out`. `fast_upsample`: 4:2:0 chroma
    replicated over each 2x2 block (libjpeg's fast upsampling) instead of interpolated. `factor`
    (1, 2, 4 or 8) fixes the shrink instead (a cut of a frame shrinks as the whole frame does).
    """
    header = _jpeg_header(data)
    if header is not None:
        fixed, factor = bool(factor), factor or shrink_factor(min(header), min_short_side)
        size = (-(-header[0] // factor), -(-header[1] // factor))
        least = size if fixed else (min(header) // factor,) * 2  # simplejpeg takes the largest factor that fits
        scaled = {} if factor == 1 else dict(min_factor=factor, min_height=least[0], min_width=least[1])
        fits = out is not None and out.shape == size + (3,)
        try:
            image = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out if fits else None,
                                           fastupsample=fast_upsample, **scaled)
            if not fits:
                return image
            # a scaled size other than ceil(size / factor) landed in `out` laid out wrongly: copy it out
            return out if image.shape == out.shape else image.copy()
        except ValueError:
            pass  # e.g. a CMYK or progressive-corrupt file: let Pillow try and report
    image = _pillow_open(path, data)
    try:
        if min_short_side or factor:
            factor = factor or shrink_factor(min(image.size), min_short_side)
            if factor > 1 and image.format == "JPEG":
                image.draft("RGB", (image.size[0] // factor, image.size[1] // factor))
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise VideoDecodeError(path, f"image decoding failed ({error})") from None


def decode_frames(keys, load, name, min_short_side=None, fast_upsample=False, factor=None):
    """uint8 (T, H, W, 3) of the frames `keys` (repeats decoded once): `load(key)` gives a frame's
    image bytes, `name(key)` names it in errors. Frames after the first are decoded straight into
    the output array; all must share one size."""
    first = decode_image_bytes(load(keys[0]), name(keys[0]), min_short_side, fast_upsample=fast_upsample,
                               factor=factor)
    frames = np.empty((len(keys),) + first.shape, np.uint8)
    frames[0] = first
    decoded = {keys[0]: 0}
    for t, key in enumerate(keys[1:], start=1):
        if key in decoded:
            frames[t] = frames[decoded[key]]
            continue
        slot = frames[t]
        image = decode_image_bytes(load(key), name(key), min_short_side, out=slot, fast_upsample=fast_upsample,
                                   factor=factor)
        if image.shape != first.shape:
            raise VideoDecodeError(name(key), f"frame size {image.shape[1]}x{image.shape[0]} differs from "
                                              f"{first.shape[1]}x{first.shape[0]} of {name(keys[0])}")
        if image is not slot:
            slot[:] = image
        decoded[key] = t
    return torch.from_numpy(frames)


def read_image_frames(paths, *, min_short_side=None):
    """uint8 (T, H, W, 3) from a list of frame image paths (repeats decoded once; see `decode_frames`);
    an unreadable frame raises VideoDecodeError naming its file."""
    paths = [str(path) for path in paths]
    if not paths:
        raise ValueError("read_image_frames needs at least one path")
    return decode_frames(paths, _read_bytes, str, min_short_side)


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


HEAP_KEEP_BYTES = 64 << 20  # 0: leave malloc as it is
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_heap_kept = (None, False)  # (process id, whether malloc was set) of the last `keep_freed_memory`


def keep_freed_memory(limit=HEAP_KEEP_BYTES):
    """Make this process's malloc (glibc) keep freed memory for reuse: blocks up to `limit` bytes come
    from the heap, not from fresh kernel pages, and up to `limit` free bytes stay at its top. Set once
    in each process (a forked worker checks again); returns whether it applied (False elsewhere than
    glibc)."""
    global _heap_kept
    if _heap_kept[0] != os.getpid():
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):  # not glibc: nothing to set
            mallopt = None
        applied = bool(mallopt and limit > 0 and mallopt(_M_MMAP_THRESHOLD, limit)
                       and mallopt(_M_TRIM_THRESHOLD, limit))
        _heap_kept = (os.getpid(), applied)
    return _heap_kept[1]


def open_video(path, frame_fps=30.0):
    """A FrameFolder when `path` is a directory, a frame_store.FrameStore for a `.frames` file, else a
    VideoFile; raises VideoDecodeError. The first call in a process sets `keep_freed_memory`."""
    keep_freed_memory()
    if os.path.isdir(path):
        return FrameFolder(path, frame_fps)
    if not os.path.exists(path):
        raise VideoDecodeError(path, "no such file or folder")
    if str(path).endswith(STORE_EXTENSION):
        import frame_store  # frame_store imports this module
        return frame_store.FrameStore(path)
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
