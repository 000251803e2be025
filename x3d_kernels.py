"""Optional fast paths for X3D's depthwise convolutions; `x3d.py` works without this file.

CPU backward: PyTorch's CPU backward of a depthwise 3D convolution (oneDNN) runs 10-40x slower
than its forward, and it was 78% of an X3D-XS training step at 16x48x48 on 2 cores. Here the
input gradient is computed with forward depthwise convolutions (a flipped kernel; at spatial
stride 2, one small convolution per output phase). The weight gradient of a stride-1 layer is one
depthwise convolution too (each sample's channel correlated with its own output gradient, then
summed over the batch); at spatial stride 2 it is one batched matmul per (temporal, vertical)
kernel offset where that measured faster, else PyTorch's. The forward pass, the
parameters and the state_dict are unchanged; gradients equal PyTorch's to float rounding.
`bench/bench_train_step.py --device cpu --variants plain fast_depthwise` measures it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _grad_input(g, weight, stride, padding, input_shape):
    """d loss / d input of a depthwise conv, written as forward depthwise convolutions of `g`."""
    channels = weight.shape[0]
    if stride == (1, 1, 1):
        return F.conv3d(g, weight.flip(2, 3, 4), None, 1, padding, 1, channels)
    # Spatial stride 2, kernel 3, padding 1: along each spatial axis, input position 2j gets
    # g[j] * w[1] and 2j + 1 gets g[j] * w[2] + g[j + 1] * w[0]; time is a stride-1 correlation.
    height, width = input_shape[3], input_shape[4]
    padded = F.pad(g, (0, 1, 0, 1, padding[0], padding[0]))
    kernel = weight.flip(2)
    taps = ([1], [2, 0])
    out = g.new_empty(input_shape)
    for ph in (0, 1):
        for pw in (0, 1):
            k = kernel[:, :, :, taps[ph]][:, :, :, :, taps[pw]]
            source = padded[:, :, :, :padded.shape[3] - 1 + ph, :padded.shape[4] - 1 + pw]
            phase = F.conv3d(source, k, None, 1, 0, 1, channels)
            out[:, :, :, ph::2, pw::2] = phase[:, :, :, :(height - ph + 1) // 2, :(width - pw + 1) // 2]
    return out


def _grad_weight_bmm(x, g, stride, padding):
    """d loss / d weight: for each kernel offset (a, b), one matmul over channels, then diagonals."""
    n, channels, frames, height, width = g.shape
    kt, kh, kw = (2 * p + 1 for p in padding)
    sh, sw = stride[1], stride[2]
    padded = F.pad(x.transpose(0, 1), (padding[2], padding[2], padding[1], padding[1], padding[0], padding[0]))
    grad = g.transpose(0, 1).reshape(channels, n * frames * height, width)
    out = x.new_empty(channels, kt, kh, kw)
    for a in range(kt):
        for b in range(kh):
            rows = padded[:, :, a:a + frames, b:b + sh * (height - 1) + 1:sh].reshape(channels, n * frames * height, -1)
            products = torch.bmm(rows.transpose(1, 2), grad)      # channels, padded width, width
            for d in range(kw):
                out[:, a, b, d] = products[:, d:d + sw * (width - 1) + 1:sw].diagonal(dim1=1, dim2=2).sum(-1)
    return out.unsqueeze(1)


def _grad_weight_conv(x, g, padding):
    """d loss / d weight at stride 1: the padded input of every (sample, channel) correlated with its g."""
    n, channels = x.shape[:2]
    padded = F.pad(x, (padding[2], padding[2], padding[1], padding[1], padding[0], padding[0]))
    per_sample = F.conv3d(padded.reshape(1, n * channels, *padded.shape[2:]),
                          g.reshape(n * channels, 1, *g.shape[2:]), None, 1, 0, 1, n * channels)
    return per_sample.reshape(n, channels, 1, *per_sample.shape[2:]).sum(0)


def _grad_weight(x, g, weight, stride, padding):
    """d loss / d weight: the form that measured fastest on 2 cores for this layer (see the module docstring)."""
    if stride == (1, 1, 1):
        return _grad_weight_conv(x, g, padding)
    if g.shape[4] <= 3:
        return _grad_weight_bmm(x, g, stride, padding)
    return torch.ops.aten.convolution_backward(
        g, x, weight, None, list(stride), list(padding), [1, 1, 1], False, [0, 0, 0], weight.shape[0],
        [False, True, False])[1]


class _DepthwiseConv3d(torch.autograd.Function):
    """A depthwise conv3d with the CPU backward above (autocast-safe: grads are computed in g's dtype)."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv3d(x, weight.to(x.dtype), None, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = g.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input(g, weight.to(g.dtype), ctx.stride, ctx.padding, x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _grad_weight(x.to(g.dtype), g, weight.to(g.dtype), ctx.stride, ctx.padding).to(weight.dtype)
        return grad_x, grad_w, None, None


class FastDepthwiseConv3d(nn.Conv3d):
    """nn.Conv3d (depthwise, no bias) whose CPU backward uses `_DepthwiseConv3d`; other devices run PyTorch's."""

    def _conv_forward(self, x, weight, bias):
        if x.device.type != "cpu" or not torch.is_grad_enabled():
            return super()._conv_forward(x, weight, bias)
        return _DepthwiseConv3d.apply(x, weight, tuple(self.stride), tuple(self.padding))


def _supported(m):
    """A depthwise, bias-free, undilated conv with 'same' odd kernels and stride 1 (or spatial 2 at 3x3)."""
    if type(m) is not nn.Conv3d or not (m.groups == m.in_channels == m.out_channels) or m.bias is not None:
        return False
    if m.dilation != (1, 1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
        return False
    if any(k != 2 * p + 1 for k, p in zip(m.kernel_size, m.padding)):
        return False
    return m.stride == (1, 1, 1) or (m.stride == (1, 2, 2) and m.kernel_size[1:] == (3, 3))


def use_fast_depthwise(model: nn.Module) -> int:
    """Switch every supported depthwise Conv3d in `model` to the fast CPU backward; return how many."""
    count = 0
    for m in model.modules():
        if _supported(m):
            m.__class__ = FastDepthwiseConv3d
            count += 1
    return count
