"""video_io: real H.264 files encoded with PyAV, real JPEG/PNG frames, garbage bytes."""
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

import video_io
from video_io import VideoDecodeError


def coded_frame(i, width, height):
    """A gray frame: top 16 rows encode i (two 16-level blocks), the rest is a horizontal ramp 0..255."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = np.linspace(0, 255, width).astype(np.uint8)[None, :, None]
    frame[:16, :width // 2] = ((i // 16) % 16) * 16 + 8
    frame[:16, width // 2:] = (i % 16) * 16 + 8
    return frame


def decoded_number(frame):
    """Frame number read back from a `coded_frame` (mod 256)."""
    frame = np.asarray(frame, dtype=np.float64)
    width = frame.shape[1]
    high = round((frame[3:13, 4:width // 2 - 4].mean() - 8) / 16)
    low = round((frame[3:13, width // 2 + 4:-4].mean() - 8) / 16)
    return int(high * 16 + low)


def flat_frame(i, width, height):
    """A flat gray frame whose value 20 + 3 * i encodes i (i < 70); survives any crop, resize or flip."""
    return np.full((height, width, 3), 20 + 3 * i, np.uint8)


def flat_number(clip_frame):
    """Frame number of a `flat_frame` (any layout, any crop)."""
    return int(round((float(torch.as_tensor(clip_frame).double().mean()) - 20) / 3))


def encode_video(path, num_frames, width=340, height=256, gop=250, fps=30, make=coded_frame, preset="ultrafast"):
    """Write an H.264 file (yuv420p, fixed keyframe interval `gop`) whose frame i is make(i, w, h);
    x264's ultrafast preset has no B-frames, veryfast has 3 with a B-pyramid (some are references)."""
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = gop
    stream.options = {"crf": "16", "preset": preset, "sc_threshold": "0", "keyint_min": str(gop)}
    for i in range(num_frames):
        for packet in stream.encode(av.VideoFrame.from_ndarray(make(i, width, height), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


def write_jpeg_folder(folder, num_frames, width, height, make=coded_frame, name="{:06d}.jpg"):
    """Write frames 1..num_frames as JPEG files (quality 95) into `folder`; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(num_frames):
        path = os.path.join(folder, name.format(i + 1))
        with open(path, "wb") as handle:
            handle.write(simplejpeg.encode_jpeg(make(i, width, height), quality=95, colorspace="RGB"))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Frame-coded 340x256 videos, 300 frames, keyframes every 250 and every 12 frames."""
    folder = tmp_path_factory.mktemp("videos")
    return {gop: encode_video(folder / f"gop{gop}.mp4", 300, gop=gop) for gop in (250, 12)}


@pytest.mark.parametrize("gop", [250, 12])
def test_decoded_frames_equal_encoded_at_requested_indices(videos, gop):
    indices = [200, 5, 5, 299, 150, 13, 12, 0, 251]
    frames = video_io.read_video_frames(videos[gop], indices)
    assert frames.shape == (len(indices), 256, 340, 3) and frames.dtype == torch.uint8
    assert [decoded_number(f) for f in frames] == [i % 256 for i in indices]
    for index, frame in zip(indices, frames):
        error = (frame.int() - torch.from_numpy(coded_frame(index, 340, 256)).int()).abs().float()
        assert error.mean() < 1.5 and error[20:].max() <= 8  # H.264 at crf 16 on a smooth ramp


def test_seek_goes_to_the_keyframe_before_and_stops_after_the_last_frame(videos):
    with video_io.VideoFile(videos[12]) as video:
        frames = video.read(range(200, 280, 5))
        assert [decoded_number(f) for f in frames] == [i % 256 for i in range(200, 280, 5)]
        assert video.frames_decoded <= (275 - 192) + 1  # from keyframe 192 to frame 275, nothing after
    with video_io.VideoFile(videos[250]) as video:
        video.read([249])
        assert video.frames_decoded == 250  # the only keyframe before 249 is frame 0
        video.read([260])
        assert video.frames_decoded == 11  # keyframe 250 .. 260


def _every_frame(path):
    """All frames of a video, decoded from the start with nothing skipped: uint8 (N, H, W, 3)."""
    with av.open(path) as container:
        return torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))


def test_unneeded_non_reference_frames_are_skipped_without_changing_any_frame(tmp_path):
    path = encode_video(tmp_path / "bframes.mp4", 120, gop=250, preset="veryfast")
    with av.open(path) as container:
        kinds = [av.video.frame.PictureType(frame.pict_type) for frame in container.decode(video=0)]
    assert kinds.count(av.video.frame.PictureType.B) > 40  # the test needs B-frames, some of which no frame refers to
    full = _every_frame(path)
    with video_io.VideoFile(path) as video:
        for indices in ([100], list(range(30, 90, 6)), [7, 7, 64, 3], [118, 119]):
            frames = video.read(indices)
            assert torch.equal(frames, full[indices])  # bit-exact: only unreferenced frames were dropped
        video.read(list(range(30, 90, 6)))
        assert video.frames_decoded < 85  # of the 85 frames 0..84 a plain decode produces
        frames = video.read([110, 130])  # past the end the last frame, which may be unreferenced
        assert torch.equal(frames, full[[110, 119]])
        assert video.frames_decoded > 120  # so the read was redone without skipping


def test_one_scaler_per_file_gives_the_pixels_of_a_fresh_conversion_per_frame(videos):
    """VideoFile keeps one swscale context for all its frames; switching between full-size and
    shrunk reads on the same file must rebuild it, not reuse the other size's."""
    with av.open(videos[12]) as container:
        decoded = list(container.decode(video=0))
    full = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in decoded[:40]]))
    half = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24", interpolation="AREA", width=170, height=128)
                                      for f in decoded[:40]]))
    with video_io.VideoFile(videos[12]) as video:
        for indices in (list(range(0, 40, 3)), [39, 5, 5, 20]):
            assert torch.equal(video.read(indices), full[indices])
            assert torch.equal(video.read(indices, min_short_side=100), half[indices])


def test_video_info_and_indices_past_the_end_repeat_the_last_frame(videos):
    assert video_io.video_info(videos[250]) == (300, 30.0, 340, 256)
    frames = video_io.read_video_frames(videos[250], [298, 299, 300, 450])
    assert [decoded_number(f) for f in frames] == [298 % 256, 299 % 256, 299 % 256, 299 % 256]


def test_min_short_side_shrinks_large_frames_by_an_integer_factor(videos):
    shrunk = video_io.read_video_frames(videos[12], [3], min_short_side=100)
    assert shrunk.shape == (1, 128, 170, 3)
    full = video_io.read_video_frames(videos[12], [3]).float()
    pooled = full[0, 20:].view(118, 2, 170, 2, 3).mean(dim=(1, 3))  # 2x2 means below the number band
    assert (shrunk[0, 10:].float() - pooled).abs().mean() < 1.5
    assert video_io.read_video_frames(videos[12], [3], min_short_side=200).shape == (1, 256, 340, 3)
    assert video_io.shrink_factor(1080, 256) == 4 and video_io.shrink_factor(300, 256) == 1


def test_mkv_without_a_stored_frame_count_counts_its_packets(tmp_path):
    path = encode_video(tmp_path / "clip.mkv", 40, 64, 48, gop=10, fps=25, make=flat_frame)
    assert video_io.video_info(path) == (40, 25.0, 64, 48)
    assert [flat_number(f) for f in video_io.read_video_frames(path, [0, 17, 39])] == [0, 17, 39]


def test_garbage_and_truncated_files_raise_one_error_type_naming_the_file(tmp_path, videos):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    data = open(videos[250], "rb").read()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[:len(data) // 2])
    for path in (garbage, truncated):
        with pytest.raises(VideoDecodeError, match=path.name) as info:
            video_io.read_video_frames(str(path), [0])
        assert info.value.path == str(path)
    with pytest.raises(VideoDecodeError, match="missing.mp4"):
        video_io.open_video(str(tmp_path / "missing.mp4"))


def test_jpeg_frames_decode_to_the_encoded_frames_with_repeats(tmp_path):
    paths = write_jpeg_folder(tmp_path / "vid", 12, 120, 90)
    frames = video_io.read_image_frames([paths[3], paths[0], paths[3], paths[11]])
    assert frames.shape == (4, 90, 120, 3) and frames.dtype == torch.uint8
    assert [decoded_number(f) for f in frames] == [3, 0, 3, 11]
    assert (frames[0].int() - torch.from_numpy(coded_frame(3, 120, 90)).int()).abs().float().mean() < 1.5


def test_jpeg_shrinks_in_the_decoder_and_pillow_reads_png(tmp_path):
    big = write_jpeg_folder(tmp_path / "big", 2, 640, 480)
    assert video_io.read_image_frames(big, min_short_side=200).shape == (2, 240, 320, 3)
    assert video_io.read_image_frames(big, min_short_side=100).shape == (2, 120, 160, 3)
    assert video_io.read_image_frames(big, min_short_side=300).shape == (2, 480, 640, 3)
    png = tmp_path / "frame.png"
    Image.fromarray(coded_frame(7, 64, 48)).save(png)
    frames = video_io.read_image_frames([png])
    assert torch.equal(frames[0], torch.from_numpy(coded_frame(7, 64, 48)))  # lossless through Pillow


def test_bad_frames_name_their_file(tmp_path):
    paths = write_jpeg_folder(tmp_path / "vid", 3, 64, 48)
    with open(paths[1], "wb") as handle:
        handle.write(b"\xff\xd8\xff garbage, not a jpeg")
    with pytest.raises(VideoDecodeError, match="000002.jpg"):
        video_io.read_image_frames(paths)
    other = write_jpeg_folder(tmp_path / "other", 1, 32, 48)
    with pytest.raises(VideoDecodeError, match="differs"):
        video_io.read_image_frames([paths[0], other[0]])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(VideoDecodeError, match="empty"):
        video_io.open_video(str(tmp_path / "empty"))


def test_frame_folder_reads_like_a_video_in_natural_order(tmp_path):
    write_jpeg_folder(tmp_path / "vid", 12, 64, 48, make=flat_frame, name="img_{}.jpg")
    with video_io.open_video(str(tmp_path / "vid"), frame_fps=24) as video:
        assert (video.num_frames, video.fps, video.width, video.height) == (12, 24.0, 64, 48)
        assert [flat_number(f) for f in video.read([1, 9, 10, 11, 30])] == [1, 9, 10, 11, 11]


def test_fps_resample_indices():
    assert video_io.fps_resample_indices(10, 60, 30).tolist() == [0, 2, 4, 6, 8]
    assert video_io.fps_resample_indices(4, 30, 30).tolist() == [0, 1, 2, 3]
    assert video_io.fps_resample_indices(4, 24, 30).tolist() == [0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="positive"):
        video_io.fps_resample_indices(4, 0, 30)


def test_natural_sort_takes_plain_order_only_when_every_name_has_one_template():
    padded = [f"abc-{i:06d}.jpg" for i in (10, 2, 300, 1)]
    assert video_io.natural_sorted(padded) == [f"abc-{i:06d}.jpg" for i in (1, 2, 10, 300)]
    assert video_io.natural_sorted(["f10.jpg", "f2.jpg", "f1.jpg"]) == ["f1.jpg", "f2.jpg", "f10.jpg"]
    # same length, digits in different places: plain order would put x12 first
    assert video_io.natural_sorted(["x12", "x1a"]) == ["x1a", "x12"]
    assert video_io.natural_sorted(["b1", "a22", "a3"]) == ["a3", "a22", "b1"]


def test_frames_decode_into_one_array_and_repeats_are_copies(tmp_path):
    paths = write_jpeg_folder(tmp_path / "f", 4, 64, 48)
    frames = video_io.read_image_frames([paths[2], paths[0], paths[2], paths[1]])
    singles = [video_io.decode_image(p) for p in (paths[2], paths[0], paths[2], paths[1])]
    assert frames.is_contiguous() and torch.equal(frames, torch.from_numpy(np.stack(singles)))
    slot = np.zeros((24, 32, 3), np.uint8)  # 2x shrink lands in a matching buffer
    assert video_io.decode_image(paths[1], min_short_side=24, out=slot) is slot
    assert np.array_equal(slot, video_io.decode_image(paths[1], min_short_side=24))
    wrong = np.zeros((10, 10, 3), np.uint8)  # a buffer of another shape is left alone
    assert video_io.decode_image(paths[1], out=wrong).shape == (48, 64, 3) and not wrong.any()


_FAULTS_SCRIPT = """
import resource, sys
import numpy as np
sys.path.insert(0, {repo!r})
import video_io
if {keep}:
    video_io.open_video({folder!r})  # the first open in a process sets malloc up
faults = []
for _ in range(4):  # 40 MB: above glibc's largest automatic threshold (32 MB), so mmap'd by default
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.empty(40 << 20, np.uint8)
    block.fill(1)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[1:]))
"""


def _glibc():
    """Whether this process runs on glibc (its C library names itself through confstr)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="keep_freed_memory sets glibc's malloc; this C library is not glibc")
def test_opening_a_video_keeps_freed_frame_buffers_for_reuse(tmp_path):
    """After the first open_video, a freed 40 MB buffer is reused without fresh pages (page faults
    counted by the kernel); in a process that never opened a video every such buffer faults anew."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    write_jpeg_folder(tmp_path / "clip", 1, 32, 32)
    fresh = (40 << 20) // (2 << 20)  # at least one fault per page, huge (2 MB) pages included
    counts = {}
    for keep in (False, True):
        script = _FAULTS_SCRIPT.format(repo=repo, keep=keep, folder=str(tmp_path / "clip"))
        counts[keep] = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                          check=True).stdout)
    assert counts[False] >= fresh, counts  # the default: every 40 MB buffer is fresh pages
    assert counts[True] <= counts[False] // 10, counts
    assert video_io.keep_freed_memory() and video_io._heap_kept[0] == os.getpid()
