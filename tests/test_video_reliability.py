"""Videos that used to go silently wrong: rotation metadata, files cut off, variable frame rates and
frame folders with a gap. Real H.264 files written with PyAV's encoders, real bytes cut off, real JPEGs."""
import fractions
import os

import av
import numpy as np
import pytest
import torch

import prepare_videos as pv
import video_io
from charades import CharadesDataset
from kinetics_multigrid import KineticsDataset
from test_charades_data import write_csv
from test_video_io import coded_frame, decoded_number, encode_video, flat_frame, write_jpeg_folder
from video_io import VideoDecodeError

# a frame that no turn or mirror maps onto itself: four quadrants of different colours, a bright corner
SCENE = np.zeros((48, 64, 3), np.uint8)
SCENE[:24, :32], SCENE[:24, 32:], SCENE[24:, :32], SCENE[24:, 32:] = (200, 40, 40), (40, 200, 40), (40, 40, 200), 90
SCENE[:8, :8] = 255


def write_rotated(path, set_matrix, frames=6):
    """A 64x48 H.264 mp4 of SCENE (brightness rising with the frame) whose header carries a display matrix."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18"}
        set_matrix(stream)
        for i in range(frames):
            image = np.clip(SCENE.astype(int) + 6 * i, 0, 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))
    return str(path)


def plain_decode(path, **reformat):
    """Every frame as stored (PyAV applies no rotation), with the rotation each frame reports."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return np.stack([f.to_ndarray(format="rgb24", **reformat) for f in frames]), [f.rotation for f in frames]


needs_display_matrix_writer = pytest.mark.skipif(
    not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
    reason="this PyAV cannot write a display matrix (VideoStream.set_display_rotation; PyAV 18.1 can)")

# (what the header says, counter-clockwise degrees it reports, how to write it)
ROTATIONS = [
    ("90", 90, lambda stream: stream.set_display_rotation(90)),
    ("180", -180, lambda stream: stream.set_display_rotation(180)),
    # a phone held upright: the matrix phones write (0, 1, -1, 0), reported as -90 (270 counter-clockwise)
    ("270 phone", -90, lambda stream: stream.set_display_matrix([0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30])),
]


@needs_display_matrix_writer
@pytest.mark.parametrize("name, degrees, set_matrix", ROTATIONS, ids=[r[0] for r in ROTATIONS])
def test_rotated_videos_decode_upright(tmp_path, name, degrees, set_matrix):
    path = write_rotated(tmp_path / "rotated.mp4", set_matrix)
    stored, rotations = plain_decode(path)
    assert rotations == [degrees] * 6  # the header says it, PyAV reports it, and leaves the pixels as stored
    upright = np.stack([np.rot90(frame, degrees // 90) for frame in stored])  # np.rot90 turns counter-clockwise
    with video_io.VideoFile(path) as video:
        frames = video.read([5, 0, 3])
        assert torch.equal(frames, torch.from_numpy(upright[[5, 0, 3]].copy()))
        turned = degrees % 180 != 0
        assert (video.width, video.height) == ((48, 64) if turned else (64, 48))
    assert video_io.video_info(path)[2:] == ((48, 64) if turned else (64, 48))
    # independently of np.rot90: the stored top-left bright corner lands where the turn takes it
    corner = np.unravel_index(np.argmax(frames[1].float().mean(dim=2).numpy()), frames[1].shape[:2])
    expected_corner = {90: (63, 0), -180: (47, 63), -90: (0, 47)}[degrees]  # bottom-left, -right, top-right
    assert abs(corner[0] - expected_corner[0]) < 8 and abs(corner[1] - expected_corner[1]) < 8
    # shrunk in the scaler first, then turned: the same as turning the shrunk stored frames
    small, _ = plain_decode(path, width=32, height=24, interpolation="AREA")
    with video_io.VideoFile(path) as video:
        shrunk = video.read([2], min_short_side=24)
    assert torch.equal(shrunk[0], torch.from_numpy(np.rot90(small[2], degrees // 90).copy()))


@needs_display_matrix_writer
def test_a_mirrored_display_matrix_is_applied_after_the_turn(tmp_path):
    path = write_rotated(tmp_path / "mirror.mp4", lambda stream: stream.set_display_rotation(90, hflip=True))
    stored, _ = plain_decode(path)
    frames = video_io.read_video_frames(path, [1])
    assert torch.equal(frames[0], torch.from_numpy(np.fliplr(np.rot90(stored[1])).copy()))


@needs_display_matrix_writer
def test_reencode_stores_a_rotated_video_upright_with_no_metadata(tmp_path):
    src = write_rotated(tmp_path / "phone.mp4", ROTATIONS[2][2], frames=12)
    dst = str(tmp_path / "out.mp4")
    assert pv.reencode_video(src, dst, short_side=256, keyframe_interval=6) == "encoded"
    stored, rotations = plain_decode(dst)
    assert rotations == [0] * 12 and stored.shape == (12, 64, 48, 3)
    loader = video_io.read_video_frames(src, range(12)).numpy()
    assert np.abs(stored.astype(int) - loader.astype(int)).mean() < 3  # x264 at crf 23 only
    assert pv.reencode_video(src, dst, short_side=256) == "kept"  # the displayed size is what is compared


def write_numbered(path, count, faststart=True, pts=None, time_base=None):
    """An H.264 mp4 of frames numbered 0..count-1 (`coded_frame`; gop 250, no B-frames); explicit
    `pts` in `time_base` make it variable-rate, each frame lasting until the next (the last as long as
    the one before it), as a camera's muxer writes it."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    durations = None if pts is None else dict(zip(pts, np.diff(pts).tolist() + [pts[-1] - pts[-2]]))
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "16"}
        if time_base is not None:
            stream.codec_context.time_base = time_base

        def mux(packets):
            """Write packets, with their durations when the rate varies (x264 leaves them 0)."""
            for packet in packets:
                if durations is not None:
                    packet.duration = durations[packet.pts]
                out.mux(packet)

        for i in range(count):
            frame = av.VideoFrame.from_ndarray(coded_frame(i, 96, 64), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            mux(stream.encode(frame))
        mux(stream.encode(None))
    return str(path)


def cut_after_packet(src, dst, frame):
    """Copy `src` (index at the front) cut right after the bytes of frame `frame`'s packet, as a stopped
    download leaves it: the header still lists every frame."""
    with av.open(src) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    end = packets[frame].pos + packets[frame].size
    with open(src, "rb") as handle:
        data = handle.read()
    with open(dst, "wb") as handle:
        handle.write(data[:end])
    return str(dst)


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """A 90-frame video and the same file cut after frame 44."""
    folder = tmp_path_factory.mktemp("cut")
    whole = write_numbered(folder / "whole.mp4", 90)
    return whole, cut_after_packet(whole, folder / "cut.mp4", 44)


def test_a_cut_off_file_fails_for_frames_past_the_cut_instead_of_repeating(cut):
    whole, cut_file = cut
    with video_io.VideoFile(cut_file) as video:
        assert video.num_frames == 90  # the header still states every frame
        assert [decoded_number(f) for f in video.read([0, 20, 44])] == [0, 20, 44]  # before the cut: exact
        for indices in ([40, 50, 60], [89], [60, 70]):
            with pytest.raises(VideoDecodeError, match="file cut off") as info:
                video.read(indices)
            assert info.value.path == cut_file and "1.50 s of the 3.00 s its header states" in info.value.reason
    # a complete file still pads indices past its last frame (a video shorter than a clip)
    assert [decoded_number(f) for f in video_io.read_video_frames(whole, [88, 89, 95])] == [88, 89, 89]
    assert "file cut off" in pv.check_video(cut_file) and pv.check_video(whole) is None


def test_a_cut_off_mkv_reads_the_frames_it_has_and_fails_the_check(tmp_path):
    whole = encode_video(tmp_path / "whole.mkv", 60, 96, 64, gop=10, make=coded_frame)
    with open(whole, "rb") as handle:
        data = handle.read()
    cut_file = tmp_path / "cut.mkv"
    cut_file.write_bytes(data[: len(data) * 3 // 5])  # matroska has no index at the front: frames are counted
    with video_io.VideoFile(str(cut_file)) as video:
        count = video.num_frames
        assert 20 < count < 60 and video.stated_duration == 2.0
        assert [decoded_number(f) for f in video.read([0, count - 2])] == [0, count - 2]
    assert pv.check_video(whole) is None
    assert pv.check_video(str(cut_file)).startswith("file cut off: its video data ends at ")


def test_cut_off_videos_are_replaced_and_counted_in_training_and_excluded_from_test(cut, tmp_path):
    whole, cut_file = cut
    (tmp_path / "a").mkdir()
    os.symlink(cut_file, tmp_path / "a" / "cut.mp4")
    os.symlink(whole, tmp_path / "a" / "whole.mp4")
    (tmp_path / "list.txt").write_text("a/cut.mp4 0\na/whole.mp4 0\n")
    lines = []
    options = dict(class_list=None, frames=8, rate=8, crop=32, log=lines.append)
    val = KineticsDataset(str(tmp_path), str(tmp_path / "list.txt"), "val", **options)
    clip, label, index, failures = val[0]  # the centre window, frames 13..69, crosses the cut
    assert index == 1 and failures >= 1 and clip.shape == (3, 8, 32, 32)  # the cut file may be drawn again
    
    assert any("replacing" in line and "cut.mp4" in line and "file cut off" in line for line in lines), lines
    test = KineticsDataset(str(tmp_path), str(tmp_path / "list.txt"), "test", temporal_views=2, spatial_views=1,
                           **options)
    assert test[0][0] is None and test[1][0].shape == (2, 3, 8, 32, 32)
    assert any("excluding" in line and "cut.mp4" in line and "file cut off" in line for line in lines), lines


def test_charades_leaves_a_cut_off_video_out_of_testing_and_replaces_it_in_training(cut, tmp_path):
    whole, cut_file = cut
    os.symlink(cut_file, tmp_path / "CUT01.mp4")
    os.symlink(whole, tmp_path / "WHOLE.mp4")
    write_csv(tmp_path / "test.csv", [("CUT01", "c000 0.00 1.00", 3.0), ("WHOLE", "c001 0.50 2.00", 3.0)])
    (tmp_path / "classes.txt").write_text("c000 Holding a blob\nc001 Moving a blob\n")
    lines = []
    options = dict(classes=str(tmp_path / "classes.txt"), frames=8, rate=2, crop=32, short_side=(36, 44),
                   temporal_views=2, spatial_views=1, log=lines.append)
    test = CharadesDataset(str(tmp_path), str(tmp_path / "test.csv"), "test", target="frames", **options)
    assert test[0][0] is None and test[1][0].shape == (2, 3, 8, 32, 32)
    assert any("excluding" in line and "CUT01.mp4" in line and "file cut off" in line for line in lines), lines
    train = CharadesDataset(str(tmp_path), str(tmp_path / "test.csv"), "val", **options)
    clip, target, index, failures = train[0]  # the centre clip, frames 35..52, runs past the cut at 44
    assert index == 1 and failures >= 1


VFR_PTS = [i * 3000 for i in range(80)] + [80 * 3000 + j * 18000 for j in range(10)]  # 30 fps, then 5 fps


def test_a_variable_rate_video_passes_the_check_and_reads_to_its_last_frame(tmp_path):
    path = write_numbered(tmp_path / "vfr.mp4", 90, pts=VFR_PTS, time_base=fractions.Fraction(1, 90000))
    with video_io.VideoFile(path) as video:
        # 90 frames over 4.67 s: the average rate puts the last frame at index 86, not at the 89th it states
        assert video.num_frames == 90 and round(video.fps, 2) == 19.29
        numbers = [decoded_number(f) for f in video.read(range(90))]
    assert numbers[0] == 0 and numbers[-1] == 89 and numbers == sorted(numbers)
    assert numbers[86:] == [89] * 4  # the last frame shows for 0.2 s
    assert pv.check_video(path) is None
    dst = str(tmp_path / "cfr.mp4")
    pv.reencode_video(path, dst, keyframe_interval=30)  # constant rate, the same frame at the same time
    assert [decoded_number(f) for f in video_io.read_video_frames(dst, range(90))] == numbers


def test_a_frame_folder_with_a_gap_names_the_missing_frame(tmp_path):
    paths = write_jpeg_folder(tmp_path / "padded", 12, 64, 48, make=flat_frame, name="img_{:05d}.jpg")
    os.remove(paths[5])
    with pytest.raises(VideoDecodeError, match=r"missing frame img_00006\.jpg \(1 of 12 numbers missing\)"):
        video_io.open_video(str(tmp_path / "padded"))
    paths = write_jpeg_folder(tmp_path / "plain", 12, 64, 48, make=flat_frame, name="frame_{}.jpg")
    for index in (0, 9, 10):
        os.remove(paths[index])  # frame_1 (the first), frame_10 and frame_11
    with pytest.raises(VideoDecodeError, match=r"missing frame frame_1\.jpg \(3 of 12"):
        video_io.open_video(str(tmp_path / "plain"))
    write_jpeg_folder(tmp_path / "doubled", 3, 64, 48, make=flat_frame, name="f{}.jpg")
    os.link(tmp_path / "doubled" / "f2.jpg", tmp_path / "doubled" / "f02.jpg")
    with pytest.raises(VideoDecodeError, match=r"frame number 2 appears twice \(f0?2\.jpg and f0?2\.jpg\)"):
        video_io.open_video(str(tmp_path / "doubled"))
    # numbering from 0, and folders whose names follow no single pattern, are read as before
    write_jpeg_folder(tmp_path / "zero", 3, 64, 48, make=flat_frame, name="{:03d}.jpg")
    os.rename(tmp_path / "zero" / "003.jpg", tmp_path / "zero" / "000.jpg")
    with video_io.open_video(str(tmp_path / "zero")) as video:
        assert video.num_frames == 3
    assert video_io.numbering_gap(["a1.jpg", "b3.jpg"]) is None


def test_prepare_checks_frame_folders_and_keeps_variable_rate_videos(tmp_path, capsys):
    root = tmp_path / "root"
    write_numbered(root / "jumping" / "vfr.mp4", 90, pts=VFR_PTS, time_base=fractions.Fraction(1, 90000))
    write_jpeg_folder(root / "jumping" / "frames_ok", 8, 64, 48, make=flat_frame, name="img_{:05d}.jpg")
    gapped = write_jpeg_folder(root / "running" / "frames_gap", 8, 64, 48, make=flat_frame, name="img_{:05d}.jpg")
    os.remove(gapped[3])
    broken = write_jpeg_folder(root / "running" / "frames_cut", 8, 64, 48, make=flat_frame, name="img_{:05d}.jpg")
    with open(broken[6], "rb") as handle:
        data = handle.read()
    with open(broken[6], "wb") as handle:
        handle.write(data[: len(data) // 2])  # a JPEG cut off half-way
    assert pv.main([str(root), "--workers", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"BAD {root / 'running' / 'frames_gap'}: missing frame img_00004.jpg" in err
    assert f"BAD {root / 'running' / 'frames_cut'}: img_00007.jpg: " in err
    assert "vfr.mp4" not in err and "frames_ok" not in err
    assert pv.main([str(root), "--workers", "1", "--no-progress", "--drop-bad"]) == 0
    listed = (root / "annotations" / "train.txt").read_text().splitlines()
    assert listed == ["jumping/frames_ok 0", "jumping/vfr.mp4 0"]
    ds = KineticsDataset(str(root), str(root / "annotations" / "train.txt"), "val", frames=4, rate=2, crop=32,
                         class_list=str(root / "annotations" / "classes.txt"), frame_fps=30, log=lambda _: None)
    assert [os.path.basename(ds.path(i)) for i in range(len(ds))] == ["frames_ok", "vfr.mp4"]
    assert ds[0][3] == 0 and ds[1][3] == 0  # both decode


@needs_display_matrix_writer
def test_frame_store_of_a_rotated_video_holds_its_frames_upright(tmp_path):
    import frame_store
    src = write_rotated(tmp_path / "phone.mp4", ROTATIONS[2][2])
    store = str(tmp_path / "phone.frames")
    assert frame_store.write_store(src, store, short_side=48)[1:] == (48, 64)  # width, height as displayed
    loader = video_io.read_video_frames(src, range(6)).numpy().astype(int)
    with frame_store.FrameStore(store) as frames:
        assert (frames.width, frames.height) == (48, 64)
        stored = frames.read(range(6)).numpy().astype(int)
    assert np.abs(stored - loader).mean() < 3  # JPEG of the upright frames, not of the stored ones


@needs_display_matrix_writer
def test_training_draws_of_a_rotated_video_use_its_displayed_size(tmp_path):
    """The draws are made before decoding on the coded size; a phone video found turned when its first
    frame decodes is drawn again on the displayed size, from the same generator state."""
    import transforms as T
    path = write_rotated(tmp_path / "phone.mp4", ROTATIONS[2][2], frames=12)  # coded 64x48, shown 48x64
    drawn = torch.Generator().manual_seed(5)
    with video_io.VideoFile(path) as video:
        assert video.size_hint == (48, 64)  # coded: nothing decoded yet
        frames, plan = video_io.read_drawn(
            video, [0, 2, 4], lambda h, w: T.draw_train_crop(h, w, 32, (40, 48), drawn), drawn)
        assert video.size_hint == (64, 48)
    known = torch.Generator().manual_seed(5)
    assert plan == T.draw_train_crop(64, 48, 32, (40, 48), known) and plan.source_size == (64, 48)
    assert torch.equal(drawn.get_state(), known.get_state())  # nothing drawn twice
    assert torch.equal(frames, video_io.read_video_frames(path, [0, 2, 4], min_short_side=plan.short_side))
