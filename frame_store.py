"""The frame store: one file per video holding every frame as a JPEG, each readable on its own.

A store file replaces a video file or a JPEG frame folder for training: reading a clip opens one
file, reads the index, then reads and decodes only the frames the clip uses (no reference frames
to reconstruct, as a video decoder must; no file per frame, as frame folders need). Each frame may
also be kept as a second, smaller JPEG (a "level"), which clips whose augmentation draws a small
short side decode instead: the entropy decoding of a JPEG does not shrink with libjpeg's 1/2, 1/4,
1/8 scaled decode, a smaller copy does.

Every frame is a baseline 4:2:0 JPEG with a restart marker after every MCU (16 x 16 pixels), so a
training clip decodes only the MCUs its crop box covers (`read_window`, `jpeg_region`): the
entropy decoding shrinks with the box too, which libjpeg's scaled decode cannot do. The clip's
cuts are placed side by side in one JPEG and decoded in one call (`jpeg_region.Stack`), not one
a frame.

Layout (little-endian):

    magic "X3DFRMS2" | num_frames u32 | fps f64 | quality u32 | short side u32 | small side u32 |
    levels u32   (short / small side: what the writer was asked for, 0 = no small copy)
    per level: width u32, height u32
    per level: num_frames + 2 offsets u64 (absolute; the last one is the file's size)
    per level: num_frames + 1 CRC-32 u32 of each frame's bytes
    the frames of level 0, then of level 1, ...: each its JPEG bytes, the byte positions of its
    restart markers in them (u32 each), the JPEG's size (u32). (Format 1: the JPEG bytes alone.)

Frame i holds what `video_io` returns for index i of the source (presentation-time indices, a
variable-rate source's gaps filled by the earlier frame, display orientation applied, as the
source's reader does it), so a clip's frame indices are the same from the store and the source.
One more frame follows the last: what the source's reader returns past its end (for a
variable-rate video the last decoded frame, which can differ from frame num_frames - 1).
Files are written to a hidden temporary sibling and renamed when complete and verified. Files of
format 1 ("X3DFRMS1", frames without restart markers) are still read, whole frames only.
"""
import array
import io
import os
import struct
import sys
import zlib

import numpy as np
import torch

import jpeg_region
import transforms
import video_io
from video_io import STORE_EXTENSION, VideoDecodeError  # noqa: F401 - STORE_EXTENSION: the file name ending

MAGIC = b"X3DFRMS2"
_READABLE = {b"X3DFRMS1": 1, MAGIC: 2}
_HEAD = struct.Struct("<8sIdIIII")
PARTIAL_TAG = ".partial-"
DEFAULT_SHORT_SIDE = 256
DEFAULT_QUALITY = 92
DEFAULT_SMALL_SIDE = 0
DECODE_BUDGET = 192 << 20  # bytes of decoded source frames held at once while writing
_INDEX_GUESS = 16384  # bytes read after the header on opening: the tables of a 10-s two-level store fit


def _tables_size(count, levels):
    """Bytes of the size, offset and CRC tables of a store of `count` frames (+ the past-the-end one)."""
    return 8 * levels + levels * (8 * (count + 2) + 4 * (count + 1))


def store_size(width, height, short_side):
    """(width, height) of a frame whose short side is scaled down to `short_side` (never up), long side rounded."""
    scale = min(1.0, short_side / min(width, height))
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


class FrameStore(video_io._Source):
    """An open store file read like a video: `.num_frames`, `.fps`, `.width`, `.height`, `.read(indices)`."""

    def __init__(self, path):
        """Open `path` and read its header and index; raises VideoDecodeError for a truncated or foreign file."""
        self.path = str(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as error:
            raise VideoDecodeError(self.path, f"cannot open frame store ({error.strerror})") from None
        try:
            self._read_index()
        except BaseException:
            self.close()
            raise

    def _pread(self, size, offset, what, least=None):
        """`size` bytes at `offset` (at least `least` of them, when given, before the file's end);
        a shorter read means the file was cut off."""
        data = os.pread(self._fd, size, offset)
        if len(data) < (size if least is None else least):
            raise VideoDecodeError(self.path, f"frame store truncated ({what} ends past the file's end); "
                                              "rebuild it with prepare_videos.py --frame-store")
        return data

    def _read_index(self):
        """Parse the header and the offset / CRC tables and check them against the file's size
        (each frame's own offsets are checked when it is read: `_record`)."""
        head = self._pread(_HEAD.size + _INDEX_GUESS, 0, "header", least=_HEAD.size)  # mostly the tables too
        magic, count, fps, quality, short_side, small_side, levels = _HEAD.unpack_from(head)
        if magic not in _READABLE:
            raise VideoDecodeError(self.path, f"not a frame store (magic {magic!r}, expected {MAGIC!r})")
        self.version = _READABLE[magic]
        if count < 1 or not 0 < levels <= 4 or not fps > 0:
            raise VideoDecodeError(self.path, f"corrupt frame store header ({count} frames, {levels} levels, "
                                              f"fps {fps})")
        self.num_frames, self.fps, self.quality = count, float(fps), quality
        self.settings = {"short_side": short_side, "small_side": small_side, "quality": quality}
        tables = _tables_size(count, levels)
        raw = memoryview(head)[_HEAD.size:_HEAD.size + tables]
        if len(raw) < tables:
            raw = self._pread(tables, _HEAD.size, "index")
        sizes = np.frombuffer(raw, "<u4", 2 * levels).reshape(levels, 2)
        self.sizes = [(int(w), int(h)) for w, h in sizes]
        self.width, self.height = self.sizes[0]
        offsets = np.frombuffer(raw, "<u8", levels * (count + 2), 8 * levels).reshape(levels, count + 2)
        self._crcs = np.frombuffer(raw, "<u4", levels * (count + 1), 8 * levels + offsets.nbytes).reshape(levels, -1)
        self._offsets = offsets.astype(np.int64)
        self._end = end = int(self._offsets[-1, -1])
        actual = os.fstat(self._fd).st_size
        if self._offsets[0, 0] != _HEAD.size + tables:
            raise VideoDecodeError(self.path, "corrupt frame store index (offsets out of order)")
        if actual != end:
            raise VideoDecodeError(self.path, f"frame store truncated or damaged: {actual} bytes, the index "
                                              f"says {end}; rebuild it with prepare_videos.py --frame-store")

    def level_for(self, min_short_side):
        """Index of the smallest stored level whose short side is still >= `min_short_side` (0: full size)."""
        best = 0
        for level, (width, height) in enumerate(self.sizes):
            if min_short_side and min(width, height) >= min_short_side and \
                    min(width, height) < min(self.sizes[best]):
                best = level
        return best

    def _record(self, index, level):
        """The stored bytes of frame `index` at `level`: its JPEG, then (format 2) its marker table."""
        start, stop = int(self._offsets[level, index]), int(self._offsets[level, index + 1])
        if not _HEAD.size <= start <= stop <= self._end:
            raise VideoDecodeError(self.path, "corrupt frame store index (offsets out of order)")
        return self._pread(stop - start, start, f"frame {index}")

    def _frame(self, index, level, record=None):
        """(JPEG bytes, positions of its restart markers or None) of frame `index` at `level`
        (`record`: its stored bytes when already read)."""
        record = self._record(index, level) if record is None else record
        if self.version < 2:
            return record, None
        size = int.from_bytes(record[-4:], "little") if len(record) >= 4 else -1
        if not 0 < size <= len(record) - 4 or (len(record) - 4 - size) % 4:
            raise VideoDecodeError(f"{self.path} frame {index}", "corrupt frame record (JPEG size "
                                   f"{size} in {len(record)} bytes); rebuild it with prepare_videos.py --frame-store")
        view = memoryview(record)  # slices without copies
        markers = array.array("I")  # read as Python ints: cut's loop is faster
        markers.frombytes(view[size:len(record) - 4])
        if sys.byteorder == "big":
            markers.byteswap()
        return view[:size], markers

    def frame_bytes(self, index, level=0):
        """The stored JPEG bytes of frame `index` at `level`."""
        return bytes(self._frame(index, level)[0])

    def read(self, indices, *, min_short_side=None):
        """uint8 (T, H, W, 3) frames at `indices` (repeats decoded once; past the end: what the source gave there).

        With `min_short_side`, the smallest level that keeps the short side >= it is read, and shrunk
        further in the decoder by 2, 4 or 8 when it stays >= it (never below). Chroma is upsampled
        by replication (libjpeg's fast upsampling), as a 4:2:0 video's decoded frames carry it: on
        bench_store's frames that is 38.0 dB against them instead of 36.0 at quality 90."""
        indices = [min(int(i), self.num_frames) for i in indices]
        if not indices or min(indices) < 0:
            raise ValueError(f"read needs non-negative frame indices, got {indices[:4]} for {self.path}")
        level = self.level_for(min_short_side)
        return video_io.decode_frames(indices, lambda i: self.frame_bytes(i, level),
                                      lambda i: f"{self.path} frame {i}", min_short_side, fast_upsample=True)

    def read_window(self, indices, *, min_short_side, box, source_size):
        """(uint8 (T, h, w, 3) frames, window): the part of the frames at `indices` (decoded as `read`
        decodes them for `min_short_side`) that covers `box` = (top, left, height, width) drawn on a
        frame of `source_size` = (height, width), rounded out to whole MCUs. window = (top, left, full
        height, full width): where that part sits in the whole frame decoded at that scale, whose
        pixels it equals exactly. A frame without restart markers is decoded whole."""
        given = indices.tolist() if torch.is_tensor(indices) else map(int, indices)  # int() per tensor item is slow
        indices = [min(i, self.num_frames) for i in given]
        if not indices or min(indices) < 0:
            raise ValueError(f"read_window needs non-negative frame indices, got {indices[:4]} for {self.path}")
        level = self.level_for(min_short_side)
        width, height = self.sizes[level]
        factor = video_io.shrink_factor(min(width, height), min_short_side)
        full = (-(-height // factor), -(-width // factor))
        name = lambda i: f"{self.path} frame {i}"  # noqa: E731
        first, markers = self._frame(indices[0], level)
        try:
            where = None if markers is None else jpeg_region.layout(first)
        except (ValueError, IndexError, struct.error) as error:
            raise VideoDecodeError(name(indices[0]), f"corrupt JPEG header ({error})") from None
        if where is None or (where.height, where.width) != (height, width):
            frames = video_io.decode_frames(indices, lambda i: self.frame_bytes(i, level), name, factor=factor,
                                            fast_upsample=True)
            return frames, (0, 0) + full
        top, bottom, left, right = transforms.box_bounds(box, source_size, full)
        mcu_h, mcu_w = where.mcu_height // factor, where.mcu_width // factor
        rows, cols = (top // mcu_h, -(-bottom // mcu_h)), (left // mcu_w, -(-right // mcu_w))

        records = {indices[0]: (first, markers)}
        for i in indices[1:]:
            if i not in records:
                records[i] = self._frame(i, level)
        window = (rows[0] * mcu_h, cols[0] * mcu_w) + full
        frames = self._decode_stacked(records, where, rows, cols, factor, name)
        if frames is None:
            def load(i):
                data, at = records[i]
                try:  # every frame of a level has the first one's header layout (checked by verify)
                    return jpeg_region.cut(data, where, rows, cols, at)
                except (ValueError, IndexError) as error:
                    raise VideoDecodeError(name(i), f"corrupt JPEG data ({error}); rebuild the store with "
                                                    "prepare_videos.py --frame-store") from None
            return video_io.decode_frames(indices, load, name, factor=factor, fast_upsample=True), window
        if len(records) < len(indices):
            position = {i: p for p, i in enumerate(records)}
            frames = frames[[position[i] for i in indices]]
        return torch.from_numpy(frames), window

    @staticmethod
    def _decode_stacked(records, where, rows, cols, factor, name):
        """uint8 (N, h, w, 3) of the window of each of `records` ({frame index: (JPEG, markers)}, N of
        them) decoded as one stacked JPEG (`jpeg_region.Stack`: one decoder setup for the clip, not
        one a frame), or None where the frames cannot be stacked (one frame, another header) or one
        is damaged (decoded one by one, its error names it)."""
        keys = list(records)
        if len(keys) < 2:
            return None
        try:
            stack = jpeg_region.Stack(records[keys[0]][0], where, rows, cols, len(keys))
        except ValueError:
            return None
        if not all(stack.header_matches(records[i][0]) for i in keys):
            return None
        try:
            for i in keys:
                stack.add(*records[i])
            image = video_io.decode_image_bytes(stack.finish(), name(keys[0]), factor=factor, fast_upsample=True)
        except (ValueError, IndexError, VideoDecodeError):
            return None
        mcu = where.mcu_width // factor
        keep = min(cols[1] * mcu, -(-where.width // factor)) - cols[0] * mcu  # up to the frame's right edge
        side_by_side = image.reshape(image.shape[0], len(keys), stack.slot_width // factor, 3)[:, :, :keep]
        return np.ascontiguousarray(side_by_side.transpose(1, 0, 2, 3))  # resize's fast path wants frames whole

    def verify(self):
        """None when every frame's bytes match their CRC and hold a JPEG of the level's size, else the reason."""
        for level, (width, height) in enumerate(self.sizes):
            header = None
            for index in range(self.num_frames + 1):
                record = self._record(index, level)
                if zlib.crc32(record) != int(self._crcs[level, index]):
                    return f"frame {index} (level {level}) does not match its checksum"
                data, markers = self._frame(index, level, record)
                if video_io._jpeg_header(data) != (height, width):
                    return f"frame {index} (level {level}) is not a {width}x{height} JPEG"
                if markers is None:
                    continue
                where = jpeg_region.layout(data)
                if where is None or not np.array_equal(markers, jpeg_region.restart_markers(data, where)):
                    return f"frame {index} (level {level}) lacks a restart marker after every MCU or their table"
                if data[:where.scan] != (header := header or data[:where.scan]):
                    return f"frame {index} (level {level}) has another JPEG header than frame 0"
        return None

    def close(self):
        """Close the file."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)


def encode_frame(frame, quality):
    """JPEG bytes of one uint8 (H, W, 3) RGB frame: baseline, 4:2:0 chroma (as video and frame
    extractors store it), a restart marker after every MCU (Pillow >= 10.2; simplejpeg writes none)."""
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(out, "JPEG", quality=quality, subsampling=2,
                                                      restart_marker_blocks=1)
    return out.getvalue()


def _record_of(jpeg):
    """A frame's stored bytes: its JPEG, the positions of its restart markers (u32 each), the JPEG's size (u32)."""
    where = jpeg_region.layout(jpeg)
    if where is None:
        import PIL
        raise RuntimeError(f"Pillow {PIL.__version__} wrote a JPEG without restart markers: the frame store "
                           "needs Pillow >= 10.2 (pip install -U pillow)")
    markers = jpeg_region.restart_markers(jpeg, where)
    return jpeg + markers.astype("<u4").tobytes() + struct.pack("<I", len(jpeg))


def _chunks(source, sizes):
    """Lists of (frame index, [uint8 frame per level]) of every frame of `source`, a bounded number at a time."""
    per_frame = 3 * source.width * source.height
    step = max(1, DECODE_BUDGET // per_frame)
    largest = min(sizes[0])  # the decoder may shrink a large source, never below the full level's short side
    for first in range(0, source.num_frames + 1, step):  # index num_frames: what the source gives past its end
        indices = list(range(first, min(first + step, source.num_frames + 1)))
        frames = source.read(indices, min_short_side=largest)
        yield indices, [transforms.resize(frames, height, width) for width, height in sizes]


def write_store(source_path, path, *, short_side=DEFAULT_SHORT_SIDE, small_side=None, quality=DEFAULT_QUALITY,
                frame_fps=30.0):
    """Convert a video file or JPEG frame folder into the store file `path`, atomically, then verify it.

    Frames are resized (antialiased bilinear, never up) so the short side is `short_side`; with
    `small_side`, a second copy at that short side is stored too. `frame_fps` is the rate of a
    frame folder (files carry none). Returns (num_frames, width, height); raises VideoDecodeError
    for an unreadable source, OSError for a failed write.
    """
    with video_io.open_video(source_path, frame_fps) as source:
        # the first frame gives the displayed size (a rotated video's width and height are swapped)
        first = source.read([0])
        height, width = first.shape[1:3]
        sizes = [store_size(width, height, short_side)]
        if small_side and small_side < min(sizes[0]):
            sizes.append(store_size(width, height, small_side))
        count = source.num_frames
        head, tail = os.path.split(path)
        os.makedirs(head or ".", exist_ok=True)
        tmp = os.path.join(head, f".{tail}{PARTIAL_TAG}{os.getpid()}")
        tables = _tables_size(count, len(sizes))
        offsets = np.zeros((len(sizes), count + 2), np.uint64)
        crcs = np.zeros((len(sizes), count + 1), np.uint32)
        pending = [[] for _ in sizes]  # later levels' bytes wait in memory until level 0 is written
        try:
            with open(tmp, "wb") as out:
                out.seek(_HEAD.size + tables)
                position = _HEAD.size + tables
                for indices, levels in _chunks(source, sizes):
                    for level, frames in enumerate(levels):
                        for index, frame in zip(indices, frames.numpy()):
                            data = _record_of(encode_frame(frame, quality))
                            crcs[level, index] = zlib.crc32(data)
                            if level == 0:
                                offsets[0, index] = position
                                position += out.write(data)
                            else:
                                pending[level].append(data)
                offsets[0, count + 1] = position
                for level in range(1, len(sizes)):
                    for index, data in enumerate(pending[level]):
                        offsets[level, index] = position
                        position += out.write(data)
                    offsets[level, count + 1] = position
                out.seek(0)
                out.write(_HEAD.pack(MAGIC, count, source.fps, quality, short_side, small_side or 0, len(sizes)))
                out.write(np.asarray(sizes, "<u4").tobytes() + offsets.astype("<u8").tobytes()
                          + crcs.astype("<u4").tobytes())
                out.flush()
                os.fsync(out.fileno())
            with FrameStore(tmp) as written:
                problem = written.verify()
            if problem:
                raise OSError(f"{tmp}: verification after writing failed: {problem}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return count, sizes[0][0], sizes[0][1]


def store_matches(path, short_side, small_side, quality):
    """True when `path` is a complete store of the current format written with these settings (what
    a resumed preparation keeps; a format 1 file is converted again). Complete = its index agrees
    with its size; the checksums were verified when it was written (before the rename that made it
    visible), so a resume does not read every byte again."""
    try:
        with FrameStore(path) as store:
            return store.version == _READABLE[MAGIC] and \
                store.settings == {"short_side": short_side, "small_side": small_side or 0, "quality": quality}
    except VideoDecodeError:
        return False
