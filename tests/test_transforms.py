"""transforms: spatial ops on uint8 (T, H, W, C) clips, normalisation, temporal indices."""
import pytest
import torch
import torch.nn.functional as F

import transforms as T


def gen(seed=0):
    """A seeded torch generator."""
    return torch.Generator().manual_seed(seed)


def coordinate_clip(frames, height, width):
    """uint8 clip whose channel 0 holds x, channel 1 y, channel 2 the frame index (sizes < 256)."""
    y = torch.arange(height).view(1, height, 1).expand(frames, height, width)
    x = torch.arange(width).view(1, 1, width).expand(frames, height, width)
    t = torch.arange(frames).view(frames, 1, 1).expand(frames, height, width)
    return torch.stack([x, y, t], dim=-1).to(torch.uint8).contiguous()


def smooth_clip(frames, height, width):
    """A smooth uint8 clip (low-frequency waves), where crop-then-resize and resize-then-crop agree."""
    y = torch.linspace(0, 1, height).view(1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width)
    t = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    channels = [torch.sin(3 * x + 2 * y + t / 5), torch.cos(2 * x - 3 * y), torch.sin(4 * x * y + t / 3)]
    return torch.stack([(c * 100 + 128).expand(frames, height, width) for c in channels], -1).round().to(torch.uint8)


def test_resize_on_uint8_matches_float_interpolation():
    clip = smooth_clip(3, 40, 60)
    for size, antialias in (((80, 120), False), ((20, 30), True)):
        out = T.resize(clip, *size)
        assert out.dtype == torch.uint8 and out.shape == (3, *size, 3) and out.is_contiguous()
        ref = F.interpolate(clip.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False,
                            antialias=antialias).round().clamp(0, 255).permute(0, 2, 3, 1)
        assert (out.float() - ref).abs().max() <= 1


def test_scaled_size_follows_pyslowfast():
    assert T.scaled_size(256, 340, 224) == (224, 297)  # floor(340 / 256 * 224) = 297
    assert T.scaled_size(340, 256, 182) == (241, 182)
    assert T.short_side_scale(torch.zeros(2, 256, 340, 3, dtype=torch.uint8), 320).shape == (2, 320, 425, 3)


def test_draw_short_side_uniform_and_inverse_uniform():
    uniform = [T.draw_short_side(256, 320, gen(s)) for s in range(400)]
    inverse = [T.draw_short_side(256, 320, gen(s), inverse_uniform=True) for s in range(400)]
    assert min(uniform) >= 256 and max(uniform) <= 320 and min(inverse) >= 256 and max(inverse) <= 320
    # inverse-uniform is uniform in 1/size: half the draws fall below the harmonic midpoint 284.4
    below = sum(size < 2 / (1 / 256 + 1 / 320) for size in inverse) / len(inverse)
    assert 0.44 < below < 0.56 and sum(inverse) < sum(uniform)
    assert T.draw_short_side(256, 320, gen(3)) == T.draw_short_side(256, 320, gen(3))
    with pytest.raises(ValueError, match="empty"):
        T.draw_short_side(320, 256, gen())


def test_random_crop_offsets_are_pyslowfast_exclusive_and_reproducible():
    clip = coordinate_clip(2, 40, 30)
    offsets = set()
    for seed in range(300):
        crop = T.random_crop(clip, 20, gen(seed))
        assert crop.shape == (2, 20, 20, 3)
        offsets.add((int(crop[0, 0, 0, 1]), int(crop[0, 0, 0, 0])))
    ys, xs = {o[0] for o in offsets}, {o[1] for o in offsets}
    assert max(ys) <= 19 and max(xs) <= 9 and min(ys) == 0 and min(xs) == 0  # never the last offset
    assert torch.equal(T.random_crop(clip, 20, gen(5)), T.random_crop(clip, 20, gen(5)))
    with pytest.raises(ValueError, match="cannot crop 50"):
        T.random_crop(clip, 50, gen())


@pytest.mark.parametrize("height,width", [(41, 61), (61, 41)])
def test_uniform_crops_sit_at_start_centre_end_of_the_long_side(height, width):
    clip = coordinate_clip(1, height, width)
    long_axis = 2 if width > height else 1
    channel = 0 if width > height else 1
    starts = [int(c[0, 0, 0, channel]) for c in T.three_crop(clip, 30)]
    assert starts == [0, 16, 31]  # centre: ceil((61 - 30) / 2) = 16 (PySlowFast)
    centre = T.center_crop(clip, 30)
    other = 1 - channel
    assert int(centre[0, 0, 0, other]) == 6  # ceil((41 - 30) / 2) on the short side
    assert torch.equal(centre, T.three_crop(clip, 30)[1]) and clip.shape[long_axis] > 30


def test_fused_scale_uniform_crop_equals_scale_then_crop():
    clip = smooth_clip(4, 96, 128)
    for position in (0, 1, 2):
        fused = T.scale_uniform_crop(clip, 64, position)
        ref = T.uniform_crop(T.short_side_scale(clip, 64), 64, position)
        assert fused.shape == ref.shape == (4, 64, 64, 3)
        assert (fused.float() - ref.float()).abs().mean() < 1.5


def test_multi_view_crops_scale_each_frame_once_then_cut_start_centre_end_of_every_window():
    frames = smooth_clip(6, 96, 128)  # two windows of 3 frames
    views = T.multi_view_crops(frames, 3, 64)
    assert views.shape == (6, 3, 3, 64, 64) and views.dtype == torch.uint8 and views.is_contiguous()
    scaled = T.short_side_scale(frames, 64)  # PySlowFast: short_side_scale, then uniform_crop
    for window in range(2):
        for position in range(3):
            expected = T.uniform_crop(scaled[3 * window:3 * window + 3], 64, position).permute(3, 0, 1, 2)
            assert torch.equal(views[3 * window + position], expected)
    assert torch.equal(T.multi_view_crops(frames, 3, 64, spatial_views=1), views[1::3])
    with pytest.raises(ValueError, match="spatial_views must be 1"):
        T.multi_view_crops(frames, 3, 64, spatial_views=2)
    with pytest.raises(ValueError, match="6 frames do not split into windows of 4"):
        T.multi_view_crops(frames, 4, 64)


def test_fused_random_scale_crop_equals_jitter_then_random_crop():
    clip = smooth_clip(4, 96, 128)
    for seed in range(5):
        for inverse in (False, True):
            fused = T.random_scale_crop(clip, 64, 72, 110, gen(seed), inverse)
            g = gen(seed)
            ref = T.random_crop(T.random_short_side_scale(clip, 72, 110, g, inverse), 64, g)
            assert fused.shape == ref.shape == (4, 64, 64, 3)
            assert (fused.float() - ref.float()).abs().mean() < 2.0
    with pytest.raises(ValueError, match="smaller than the crop"):
        T.random_scale_crop(clip, 64, 60, 110, gen())


def test_flips():
    clip = coordinate_clip(1, 8, 10)
    assert torch.equal(T.horizontal_flip(clip)[0, :, 0], clip[0, :, -1])
    flipped = sum(not torch.equal(T.random_horizontal_flip(clip, gen(s)), clip) for s in range(200))
    assert 70 < flipped < 130


def test_random_resized_crop_size_and_fallback():
    clip = coordinate_clip(2, 60, 80)
    for seed in range(20):
        assert T.random_resized_crop(clip, 32, gen(seed)).shape == (2, 32, 32, 3)
    # an area above the frame forces the fallback: the whole frame clamped to the ratio range, centred
    whole = T.random_resized_crop(clip, 32, gen(), scale=(4.0, 5.0), ratio=(1.0, 1.0))
    assert torch.equal(whole, T.resize(clip[:, :, 10:70], 32, 32))


def test_normalize_any_stack_on_channel_dim_minus_4():
    for shape in ((3, 2, 4, 4), (2, 3, 2, 4, 4), (2, 5, 3, 2, 4, 4)):
        batch = torch.randint(0, 256, shape, dtype=torch.uint8)
        out = T.normalize(batch)
        assert out.dtype == torch.float32 and out.shape == batch.shape
        assert torch.allclose(out, (batch.float() / 255 - 0.45) / 0.225, atol=1e-5)
    out = T.normalize(torch.full((3, 1, 1, 1), 255, dtype=torch.uint8), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    assert torch.allclose(out.flatten(), torch.tensor([2.5, 2.4, 1.4]), atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        T.normalize(torch.zeros(3, 2, 4, 4))
    with pytest.raises(ValueError, match="channels at dim -4"):
        T.normalize(torch.zeros(2, 4, 2, 4, 4, dtype=torch.uint8))


def test_to_cthw_is_contiguous_channels_first_and_bad_layouts_are_named():
    clip = coordinate_clip(3, 5, 7)
    out = T.to_cthw(clip)
    assert out.shape == (3, 3, 5, 7) and out.is_contiguous() and torch.equal(out[0, 1], clip[1, :, :, 0])
    with pytest.raises(ValueError, match=r"\(T, H, W, C\)"):
        T.random_crop(torch.zeros(3, 5, 7), 2, gen())


def test_temporal_windows_follow_pyslowfast():
    assert T.clip_span(16, 5, 30, 30) == 80 and T.clip_span(16, 5, 15, 30) == 40
    # random window: evenly spread over span - 1, inside the video, starting anywhere in [0, delta]
    starts = set()
    for seed in range(200):
        index = T.random_window(300, 16, 5, 30.0, 30, gen(seed))
        assert index.dtype == torch.int64 and index.shape == (16,)
        assert index.min() >= 0 and index.max() <= 299 and index[-1] - index[0] in (78, 79)
        starts.add(int(index[0]))
    assert min(starts) < 20 and max(starts) > 200
    assert T.center_window(300, 16, 5, 30.0, 30).tolist() == torch.linspace(110, 189, 16).long().tolist()
    windows = T.uniform_windows(300, 16, 5, 30.0, 30, 10)
    assert windows.shape == (10, 16) and windows[:, 0].tolist() == [22 * k for k in range(10)]
    # a video shorter than the clip repeats its last frame
    short = T.random_window(30, 16, 5, 30.0, 30, gen())
    assert short[0] == 0 and short.max() == 29 and (short == 29).sum() > 5
