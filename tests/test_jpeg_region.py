"""jpeg_region cuts and the frame store's windowed reads: exact pixels against decoding whole frames."""
import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

import frame_store
import jpeg_region
import transforms as T
from test_video_io import encode_video
from video_io import VideoDecodeError, decode_image_bytes


def picture(height, width, seed):
    """A smooth colour gradient with noise: every MCU codes differently, chroma included."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    return np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("height, width", [(256, 340), (75, 101)])  # 101 x 75: partial MCUs at both edges
def test_a_cut_decodes_to_exactly_the_pixels_of_the_whole_frame(height, width):
    data = frame_store.encode_frame(picture(height, width, 0), 92)
    where = jpeg_region.layout(data)
    assert (where.height, where.width, where.mcu_height, where.mcu_width) == (height, width, 16, 16)
    rows, cols = -(-height // 16), -(-width // 16)
    rng = np.random.default_rng(1)
    for factor in (1, 2, 4, 8):
        whole = decode_image_bytes(data, "whole", factor=factor, fast_upsample=True)
        mcu = 16 // factor
        cases = [((0, rows), (0, cols)), ((rows - 1, rows), (cols - 1, cols)), ((0, 1), (0, cols))]
        for _ in range(25):
            r0, c0 = int(rng.integers(0, rows)), int(rng.integers(0, cols))
            cases.append(((r0, int(rng.integers(r0 + 1, rows + 1))), (c0, int(rng.integers(c0 + 1, cols + 1)))))
        for (r0, r1), (c0, c1) in cases:
            part = decode_image_bytes(jpeg_region.cut(data, where, (r0, r1), (c0, c1)), "cut", factor=factor,
                                      fast_upsample=True)
            expected = whole[r0 * mcu:r1 * mcu, c0 * mcu:c1 * mcu]
            assert part.shape == expected.shape and np.array_equal(part, expected), (factor, r0, r1, c0, c1)


def test_only_jpegs_with_a_restart_marker_after_every_mcu_can_be_cut():
    frame = picture(64, 80, 2)
    plain = simplejpeg.encode_jpeg(frame, quality=90, colorspace="RGB", colorsubsampling="420")
    assert jpeg_region.layout(plain) is None

    def pillow(**options):
        out = io.BytesIO()
        Image.fromarray(frame).save(out, "JPEG", quality=90, **options)
        return out.getvalue()

    assert jpeg_region.layout(pillow(restart_marker_blocks=2)) is None
    assert jpeg_region.layout(pillow(restart_marker_blocks=1, progressive=True)) is None
    assert jpeg_region.layout(pillow(restart_marker_blocks=1, subsampling=0)).mcu_width == 8  # 4:4:4: 8 x 8 MCUs
    with pytest.raises(ValueError, match="no JPEG start marker"):
        jpeg_region.layout(b"GIF89a")
    data = frame_store.encode_frame(frame, 92)
    where = jpeg_region.layout(data)
    at = data.index(b"\xff\xd3", where.scan)  # drop one restart marker: the MCUs no longer line up
    with pytest.raises(ValueError, match="restart markers for 20 MCUs"):
        jpeg_region.cut(data[:at] + data[at + 2:], where, (0, 2), (1, 3))
    markers = jpeg_region.restart_markers(data, where)
    assert len(markers) == 19 and all(data[m] == 0xFF and 0xD0 <= data[m + 1] <= 0xD7 for m in markers)
    assert jpeg_region.cut(data, where, (1, 3), (2, 4), markers) == jpeg_region.cut(data, where, (1, 3), (2, 4))
    with pytest.raises(ValueError, match="not where the frame's table says"):
        jpeg_region.cut(data, where, (1, 3), (2, 4), markers + 1)
    with pytest.raises(ValueError, match="outside a 4 x 5 MCU frame"):
        jpeg_region.cut(data, where, (0, 5), (0, 1))


def test_a_stack_of_cuts_decodes_to_each_frames_cut():
    """One decode of several frames' cuts side by side gives each frame's cut exactly, at every libjpeg
    scale, partial right columns and bottom rows included (the slot past a frame's edge is padding)."""
    frames = [frame_store.encode_frame(picture(75, 101, seed), 92) for seed in range(3)]  # 5 x 7 MCUs, partial edges
    where = jpeg_region.layout(frames[0])
    for factor in (1, 2, 4, 8):
        for rows, cols in (((0, 4), (0, 7)), ((1, 3), (6, 7)), ((3, 5), (2, 5)), ((0, 5), (1, 7))):
            stack = jpeg_region.Stack(frames[0], where, rows, cols, len(frames))
            for data in frames:
                assert stack.header_matches(data)
                stack.add(data)
            image = decode_image_bytes(stack.finish(), "stack", factor=factor, fast_upsample=True)
            slot = stack.slot_width // factor
            assert image.shape[1] == len(frames) * slot == len(frames) * (cols[1] - cols[0]) * 16 // factor
            for k, data in enumerate(frames):
                part = decode_image_bytes(jpeg_region.cut(data, where, rows, cols), "cut", factor=factor,
                                          fast_upsample=True)
                assert np.array_equal(image[:, k * slot:k * slot + part.shape[1]], part), (factor, rows, cols, k)
    with pytest.raises(ValueError, match="wider than a JPEG's 65535"):  # 586 slots of 7 MCUs: 65632 pixels
        jpeg_region.Stack(frames[0], where, (0, 1), (0, 7), 586)
    assert jpeg_region.Stack(frames[0], where, (0, 1), (6, 7), 1).size == (16, 5)  # one frame: cut at its edge
    other = frame_store.encode_frame(picture(75, 101, 0), 80)  # other quantisation tables
    assert not jpeg_region.Stack(frames[0], where, (0, 1), (0, 1), 2).header_matches(other)
    stack = jpeg_region.Stack(frames[0], where, (0, 1), (0, 1), 2)
    stack.add(frames[0])
    with pytest.raises(ValueError, match="1 of the stack's 2 frames added"):
        stack.finish()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """A store with a small copy, from a real 340x256 H.264 file."""
    base = tmp_path_factory.mktemp("window")
    path = str(base / "v.frames")
    frame_store.write_store(encode_video(base / "v.mp4", 8, 340, 256, gop=250), path, small_side=160)
    return path


@pytest.fixture(scope="module")
def odd_store_path(tmp_path_factory):
    """A store of 300x200 frames: a partial MCU row at the bottom and a partial MCU column at the right."""
    base = tmp_path_factory.mktemp("odd")
    path = str(base / "odd.frames")
    frame_store.write_store(encode_video(base / "odd.mp4", 8, 300, 200, gop=250), path)
    return path


@pytest.mark.parametrize("which", ["store_path", "odd_store_path"])
def test_a_window_read_equals_the_whole_frames_at_the_same_scale(which, request, monkeypatch):
    store_path = request.getfixturevalue(which)
    rng = np.random.default_rng(3)
    generator = torch.Generator().manual_seed(0)
    stacked = []  # per window of more than one distinct frame: decoded as one stack (True) or frame by frame
    decode_stacked = frame_store.FrameStore._decode_stacked

    def counted(records, *rest):
        out = decode_stacked(records, *rest)
        if len(records) > 1:
            stacked.append(out is not None)
        return out

    monkeypatch.setattr(frame_store.FrameStore, "_decode_stacked", staticmethod(counted))
    with frame_store.FrameStore(store_path) as store:
        source = (store.height, store.width)
        for crop, short_range in ((32, (36, 320)), (112, (128, 320)), (160, (180, 228)), (224, (256, 320))):
            for _ in range(6):
                short, box = T.draw_scale_crop(*source, crop, *short_range, generator)
                indices = sorted(rng.integers(0, store.num_frames + 2, 3).tolist())  # past the end too
                part, (y, x, height, width) = store.read_window(indices, min_short_side=short, box=box,
                                                                source_size=source)
                whole = store.read(indices, min_short_side=short)
                assert (height, width) == tuple(whole.shape[1:3]) and min(height, width) >= min(short, *source)
                assert torch.equal(part, whole[:, y:y + part.shape[1], x:x + part.shape[2]])
                top, bottom, left, right = T.box_bounds(box, source, (height, width))
                assert y <= top and bottom <= y + part.shape[1] and x <= left and right <= x + part.shape[2]
                assert part.shape[1] - (bottom - top) < 32 and part.shape[2] - (right - left) < 32  # whole MCUs
    assert sum(stacked) >= 5 and all(stacked), stacked  # partial MCU rows and columns at the edges stack too


def test_a_format_1_store_is_read_whole_and_converted_again(tmp_path, monkeypatch):
    """Files written before restart markers (simplejpeg frames, magic X3DFRMS1) still read; a resumed
    preparation does not count them as done."""
    monkeypatch.setattr(frame_store, "MAGIC", b"X3DFRMS1")
    monkeypatch.setattr(frame_store, "encode_frame", lambda frame, quality: simplejpeg.encode_jpeg(
        np.ascontiguousarray(frame), quality=quality, colorspace="RGB", colorsubsampling="420"))
    monkeypatch.setattr(frame_store, "_record_of", lambda jpeg: jpeg)
    path = str(tmp_path / "old.frames")
    frame_store.write_store(encode_video(tmp_path / "v.mp4", 4, 96, 72, gop=250), path)
    monkeypatch.undo()
    assert not frame_store.store_matches(path, frame_store.DEFAULT_SHORT_SIDE, None, frame_store.DEFAULT_QUALITY)
    with frame_store.FrameStore(path) as store:
        assert store.version == 1 and store.verify() is None
        part, window = store.read_window([0, 3], min_short_side=40, box=(10.0, 20.0, 40.0, 40.0), source_size=(72, 96))
        assert window == (0, 0, 72, 96) and torch.equal(part, store.read([0, 3], min_short_side=40))


def test_damaged_entropy_data_in_a_window_read_names_the_file_and_frame(store_path, tmp_path):
    damaged = tmp_path / "damaged.frames"
    data = bytearray(open(store_path, "rb").read())
    with frame_store.FrameStore(store_path) as store:
        start = int(store._offsets[0, 2])
        at = int(store._frame(2, 0)[1][5 * 22 + 8])  # the marker after MCU 8 of row 5, inside the box
    data[start + at:start + at + 2] = b"\x00\x00"  # one restart marker of frame 2 overwritten
    damaged.write_bytes(bytes(data))
    with frame_store.FrameStore(str(damaged)) as store:
        with pytest.raises(VideoDecodeError, match=r"damaged.frames frame 2: corrupt JPEG data \(the restart markers are not where"):
            store.read_window([1, 2], min_short_side=256, box=(20.0, 30.0, 200.0, 200.0), source_size=(256, 340))
        assert "checksum" in store.verify()


def test_a_frame_record_with_a_bad_size_field_names_the_file_and_frame(store_path, tmp_path):
    damaged = tmp_path / "badsize.frames"
    data = bytearray(open(store_path, "rb").read())
    with frame_store.FrameStore(store_path) as store:
        end = int(store._offsets[0, 4])  # frame 3's record ends where frame 4's begins
    data[end - 4:end] = (10 ** 9).to_bytes(4, "little")  # its JPEG size field: far past the record
    damaged.write_bytes(bytes(data))
    with frame_store.FrameStore(str(damaged)) as store:
        with pytest.raises(VideoDecodeError, match=r"badsize.frames frame 3: corrupt frame record \(JPEG size "
                                                   r"1000000000 in \d+ bytes\); rebuild it"):
            store.read_window([3], min_short_side=256, box=(20.0, 30.0, 200.0, 200.0), source_size=(256, 340))
        assert "checksum" in store.verify()
