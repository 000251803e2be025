"""Clip transforms on whole uint8 clips, and temporal sampling indices.

Layout: every spatial function takes and returns a uint8 clip laid out (T, H, W, C), the layout the
decoders produce (`video_io`); `to_cthw` turns the final clip into the (C, T, H, W) the model eats.
Resizing runs `torch.nn.functional.interpolate` on uint8 directly (bilinear, antialiased when
downscaling); a (T, H, W, C) tensor viewed as (T, C, H, W) is channels-last, torch's fast uint8 path.
The fused `random_scale_crop` / `scale_uniform_crop` cut the window out of the source frames first
and resize only that window: 544 X3D-S clips/s per core against 54 for per-frame PIL
(docs/reference.md).
Every random function takes an explicit `torch.Generator`. PySlowFast numbers reproduced here:
short-side size floor(long / short * size), random crop offsets in [0, L - size) (numpy's exclusive
randint: the last offset is never drawn), centre offset ceil((L - size) / 2), temporal windows
linspace(start, start + span - 1, T) clamped and truncated, span = rate * T / target_fps * fps.
Deliberate difference: PySlowFast interpolates normalised float frames without antialiasing; we
resize uint8 with antialiasing when shrinking (less aliasing, and no float copy in the workers).
"""
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)


def _uniform(low, high, generator):
    """A float drawn uniformly from [low, high)."""
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _randint(low, high, generator):
    """An int drawn uniformly from [low, high] (inclusive, like random.randint)."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def _check_clip(clip):
    """Raise a clear error unless `clip` is a uint8 (T, H, W, C) tensor."""
    if not isinstance(clip, torch.Tensor) or clip.dim() != 4 or clip.dtype != torch.uint8:
        got = f"{tuple(clip.shape)} {clip.dtype}" if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise ValueError(f"expected a uint8 clip laid out (T, H, W, C), got {got}")


def resize(clip, height, width):
    """Resize a uint8 (T, H, W, C) clip to (height, width): bilinear, antialiased when shrinking."""
    _check_clip(clip)
    if clip.shape[1] == height and clip.shape[2] == width:
        return clip
    shrink = height < clip.shape[1] or width < clip.shape[2]
    out = F.interpolate(clip.permute(0, 3, 1, 2), size=(height, width), mode="bilinear",
                        align_corners=False, antialias=shrink)
    return out.permute(0, 2, 3, 1)


def scaled_size(height, width, short_side):
    """(height, width) after scaling the short side to `short_side` (PySlowFast: long side floored)."""
    if width <= height:
        return int(math.floor(height / width * short_side)), short_side
    return short_side, int(math.floor(width / height * short_side))


def draw_short_side(min_size, max_size, generator, inverse_uniform=False):
    """Short-side size drawn from [min_size, max_size]: uniform, or uniform in 1/size (PySlowFast).

    PySlowFast: round(uniform(min, max)) or round(1 / uniform(1 / max, 1 / min)).
    """
    if min_size > max_size:
        raise ValueError(f"short-side range [{min_size}, {max_size}] is empty")
    if inverse_uniform:
        return int(round(1.0 / _uniform(1.0 / max_size, 1.0 / min_size, generator)))
    return int(round(_uniform(min_size, max_size, generator)))


def short_side_scale(clip, size):
    """Scale a (T, H, W, C) clip so its short side is `size`."""
    _check_clip(clip)
    return resize(clip, *scaled_size(clip.shape[1], clip.shape[2], size))


def random_short_side_scale(clip, min_size, max_size, generator, inverse_uniform=False):
    """Scale the short side to a size drawn by `draw_short_side`."""
    return short_side_scale(clip, draw_short_side(min_size, max_size, generator, inverse_uniform))


def _crop_offset(length, size, generator):
    """PySlowFast's random crop offset: 0 if the clip fits, else from [0, length - size)."""
    if length < size:
        raise ValueError(f"cannot crop {size} pixels from a side of {length}")
    return int(torch.randint(0, length - size, (), generator=generator).item()) if length > size else 0


def random_crop(clip, size, generator):
    """A random size x size crop of a (T, H, W, C) clip (offsets as PySlowFast `random_crop`)."""
    _check_clip(clip)
    y = _crop_offset(clip.shape[1], size, generator)
    x = _crop_offset(clip.shape[2], size, generator)
    return clip[:, y:y + size, x:x + size]


def _position_offset(length, size, position):
    """Crop offset along one side: 0 = start, 1 = centre (ceil, as PySlowFast), 2 = end."""
    if length < size:
        raise ValueError(f"cannot crop {size} pixels from a side of {length}")
    if position not in (0, 1, 2):
        raise ValueError(f"crop position must be 0 (start), 1 (centre) or 2 (end), got {position}")
    return (0, int(math.ceil((length - size) / 2)), length - size)[position]


def uniform_crop(clip, size, position):
    """A size x size crop at the start (0), centre (1) or end (2) of the long side, centred on the
    short side (PySlowFast `uniform_crop`)."""
    _check_clip(clip)
    height, width = clip.shape[1:3]
    y = _position_offset(height, size, position if height > width else 1)
    x = _position_offset(width, size, position if height <= width else 1)
    return clip[:, y:y + size, x:x + size]


def center_crop(clip, size):
    """The centre size x size crop."""
    return uniform_crop(clip, size, 1)


def three_crop(clip, size):
    """The three size x size crops at the start, centre and end of the long side."""
    return [uniform_crop(clip, size, position) for position in (0, 1, 2)]


def horizontal_flip(clip):
    """Mirror a (T, H, W, C) clip left-right."""
    _check_clip(clip)
    return clip.flip(2)


def draw_flip(generator, p=0.5):
    """Whether to mirror a clip: True with probability p (PySlowFast: flip when uniform() < 0.5)."""
    return _uniform(0.0, 1.0, generator) < p


def random_horizontal_flip(clip, generator, p=0.5):
    """Mirror with probability p (PySlowFast: flip when uniform() < 0.5)."""
    return horizontal_flip(clip) if draw_flip(generator, p) else clip


def _bounds(top, left, box_height, box_width, height, width):
    """(top, bottom, left, right): the whole pixels of a height x width frame a fractional box covers."""
    top, left = int(round(top)), int(round(left))
    bottom = min(height, max(top + 1, int(round(top + box_height))))
    right = min(width, max(left + 1, int(round(left + box_width))))
    return top, bottom, left, right


def _crop_box_resize(clip, top, left, box_height, box_width, out_height, out_width):
    """Cut a (possibly fractional) box out of the source frames, then resize it: crop before resize."""
    top, bottom, left, right = _bounds(top, left, box_height, box_width, *clip.shape[1:3])
    return resize(clip[:, top:bottom, left:right], out_height, out_width)


def box_bounds(box, source_size, size):
    """(top, bottom, left, right) pixels that `crop_box_resize` cuts for `box` (drawn on a frame of
    `source_size`) from frames decoded at `size` = (height, width)."""
    sy, sx = size[0] / source_size[0], size[1] / source_size[1]
    return _bounds(box[0] * sy, box[1] * sx, box[2] * sy, box[3] * sx, *size)


def draw_scale_crop(height, width, crop, min_size, max_size, generator, inverse_uniform=False):
    """The draws of a training crop on a height x width frame, before any pixel is decoded:
    (short side, box), box = (top, left, box height, box width) in the frame's pixels (fractional)
    that the crop x crop output covers. Short side by `draw_short_side`, offsets as `random_crop`."""
    if min_size < crop:
        raise ValueError(f"short-side minimum {min_size} is smaller than the crop {crop}")
    short_side = draw_short_side(min_size, max_size, generator, inverse_uniform)
    scaled_h, scaled_w = scaled_size(height, width, short_side)
    y = _crop_offset(scaled_h, crop, generator)
    x = _crop_offset(scaled_w, crop, generator)
    fy, fx = height / scaled_h, width / scaled_w
    return short_side, (y * fy, x * fx, crop * fy, crop * fx)


def crop_box_resize(clip, box, source_size, size):
    """The size x size crop of `box` (drawn on a frame of `source_size` = (height, width)) from `clip`,
    which may hold those frames decoded smaller (the box is scaled to the clip's own size)."""
    _check_clip(clip)
    top, bottom, left, right = box_bounds(box, source_size, clip.shape[1:3])
    return resize(clip[:, top:bottom, left:right], size, size)


def random_scale_crop(clip, crop, min_size, max_size, generator, inverse_uniform=False):
    """Short-side jitter then random crop (PySlowFast training), fused: the crop window is mapped
    back to the source frames and only it is resized. Same draws and offsets as
    `random_short_side_scale` followed by `random_crop`; pixels equal up to sub-pixel rounding."""
    _check_clip(clip)
    height, width = clip.shape[1:3]
    _, box = draw_scale_crop(height, width, crop, min_size, max_size, generator, inverse_uniform)
    return crop_box_resize(clip, box, (height, width), crop)


class TrainCrop(NamedTuple):
    """The spatial draws of one training clip, made before decoding: the short side, the crop box on
    the source frame (top, left, height, width in its pixels), the flip, the source (height, width);
    `window` (top, left, full height, full width) when the decoded frames are only the part of the
    whole decoded frame that holds the box (a frame store's `read_window`)."""
    short_side: int
    box: tuple
    flip: bool
    source_size: tuple
    window: tuple | None = None


def multigrid_short_side_range(short_side, crop, default_crop):
    """PySlowFast Multigrid's jitter range at `crop`: only the minimum scales with crop / default crop."""
    min_size = int(round(short_side[0] * crop / default_crop))
    return min_size, max(short_side[1], min_size)


def draw_train_crop(height, width, crop, short_range, generator, inverse_uniform=False, flip=True):
    """A TrainCrop for a height x width source: `draw_scale_crop` then `draw_flip` (when `flip`), the
    draw order of `random_scale_crop` followed by `random_horizontal_flip`."""
    short_side, box = draw_scale_crop(height, width, crop, *short_range, generator, inverse_uniform)
    return TrainCrop(short_side, box, draw_flip(generator) if flip else False, (height, width))


def apply_train_crop(frames, plan, crop):
    """uint8 (C, T, crop, crop) of decoded (T, H, W, C) `frames` (any decoded scale) cut as `plan` says."""
    if plan.window is None:
        return to_cthw(crop_box_resize(frames, plan.box, plan.source_size, crop), plan.flip)
    _check_clip(frames)
    y, x, height, width = plan.window
    top, bottom, left, right = box_bounds(plan.box, plan.source_size, (height, width))
    return to_cthw(resize(frames[:, top - y:bottom - y, left - x:right - x], crop, crop), plan.flip)


def scale_uniform_crop(clip, size, position):
    """Short side scaled to `size`, then `uniform_crop(size, position)`; fused (crop first, resize the crop)."""
    _check_clip(clip)
    height, width = clip.shape[1:3]
    scaled_h, scaled_w = scaled_size(height, width, size)
    y = _position_offset(scaled_h, size, position if height > width else 1)
    x = _position_offset(scaled_w, size, position if height <= width else 1)
    fy, fx = height / scaled_h, width / scaled_w
    return _crop_box_resize(clip, y * fy, x * fx, size * fy, size * fx, size, size)


def multi_view_crops(frames, window, size, spatial_views=3):
    """Multi-view test crops of K windows stored one after another in `frames` ((K * window, H, W, C)),
    made as PySlowFast makes them: each frame's short side scaled to `size` once, then the start /
    centre / end size x size crops of the long side (the centre alone when spatial_views == 1).
    Returns uint8 (K * spatial_views, C, window, size, size), window-major."""
    if spatial_views not in (1, 3):
        raise ValueError(f"spatial_views must be 1 (centre) or 3 (start/centre/end), got {spatial_views}")
    _check_clip(frames)
    if frames.shape[0] % window:
        raise ValueError(f"{frames.shape[0]} frames do not split into windows of {window}")
    positions = (0, 1, 2) if spatial_views == 3 else (1,)
    scaled = short_side_scale(frames, size)
    return torch.stack([to_cthw(uniform_crop(clip, size, position))
                        for clip in scaled.split(window) for position in positions])


def random_resized_crop(clip, size, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """Inception-style crop (PySlowFast `random_resized_crop`): area fraction from `scale`, log-uniform
    aspect ratio from `ratio`, up to 10 attempts, then the whole frame clamped to `ratio`; resized to size."""
    _check_clip(clip)
    height, width = clip.shape[1:3]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = _uniform(scale[0], scale[1], generator) * area
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(0, height - h, generator)
            left = _randint(0, width - w, generator)
            return resize(clip[:, top:top + h, left:left + w], size, size)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return resize(clip[:, top:top + h, left:left + w], size, size)


def to_cthw(clip, flip=False):
    """(T, H, W, C) -> contiguous (C, T, H, W), the layout every dataset returns; mirrored left-right
    with `flip`. One copy through numpy, whose strided copy (negative strides included) took a
    16x224 clip's layout change from 4.0 to 1.8 ms and the flip with it from 4.0 to 3.1 ms here."""
    _check_clip(clip)
    array = clip.numpy().transpose(3, 0, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array[..., ::-1] if flip else array))


def normalize(batch, mean=KINETICS_MEAN, std=KINETICS_STD):
    """uint8 clips with channels at dim -4 ((C, T, H, W), (N, C, T, H, W), (N, V, C, T, H, W), ...)
    -> float32 (x / 255 - mean) / std, on the batch's device. Run it on the training device."""
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8 or batch.dim() < 4:
        got = f"{tuple(batch.shape)} {batch.dtype}" if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"normalize expects uint8 clips with channels at dim -4, got {got}")
    if batch.shape[-4] != len(mean) or len(mean) != len(std):
        raise ValueError(f"batch has {batch.shape[-4]} channels at dim -4 but mean/std have "
                         f"{len(mean)}/{len(std)} values")
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(-1, 1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(-1, 1, 1, 1)
    return batch.to(torch.float32).mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)


def clip_span(frames, rate, fps, target_fps):
    """Source frames a clip of `frames` at sampling `rate` covers: rate * frames / target_fps * fps
    (PySlowFast `clip_size`: the rate counts frames at target_fps, e.g. 30)."""
    return rate * frames / target_fps * fps


def window_indices(start, span, frames, num_frames):
    """`frames` indices evenly spread over [start, start + span - 1], clamped to the video and truncated
    (PySlowFast `temporal_sampling`; a short video repeats its last frame)."""
    index = torch.linspace(start, start + span - 1, frames, dtype=torch.float32)
    return index.clamp_(0, num_frames - 1).long()


def random_window(num_frames, frames, rate, fps, target_fps, generator):
    """Training indices: a window started uniformly in [0, max(num_frames - span, 0)] (PySlowFast)."""
    span = clip_span(frames, rate, fps, target_fps)
    start = _uniform(0.0, max(num_frames - span, 0.0), generator)
    return window_indices(start, span, frames, num_frames)


def center_window(num_frames, frames, rate, fps, target_fps):
    """The window in the middle of the video (fast clip-level validation)."""
    span = clip_span(frames, rate, fps, target_fps)
    return window_indices(max(num_frames - span, 0.0) / 2, span, frames, num_frames)


def uniform_windows(num_frames, frames, rate, fps, target_fps, count):
    """int64 (count, frames): test windows starting at delta * k / count, k = 0..count-1, with
    delta = max(num_frames - span, 0) (PySlowFast multi-view test, `get_start_end_idx`)."""
    span = clip_span(frames, rate, fps, target_fps)
    delta = max(num_frames - span, 0.0)
    return torch.stack([window_indices(delta * k / count, span, frames, num_frames) for k in range(count)])
