"""x3d_kernels: the fast CPU depthwise backward gives PyTorch's gradients and leaves the model as it was."""
import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import x3d
import x3d_kernels


def _grads(conv, x, g):
    """(d input, d weight) of sum(conv(x) * g)."""
    x = x.clone().requires_grad_()
    conv.zero_grad()
    (conv(x) * g).sum().backward()
    return x.grad, conv.weight.grad.clone()


CASES = [  # (kernel, stride, channels): X3D's depthwise convs, plus the stem's temporal 5x1x1
    ((3, 3, 3), (1, 1, 1), 6), ((3, 3, 3), (1, 2, 2), 6), ((5, 1, 1), (1, 1, 1), 4)]


@pytest.mark.parametrize("kernel,stride,channels", CASES)
def test_gradients_equal_pytorch_in_float64(kernel, stride, channels):
    """Every size the phases split differently (odd, even, 1) and 1-frame clips: exact up to float64 rounding."""
    torch.manual_seed(0)
    for n, frames, size in itertools.product((1, 3), (1, 4), (1, 2, 3, 5, 8, 17)):
        native = nn.Conv3d(channels, channels, kernel, stride, tuple(k // 2 for k in kernel),
                           groups=channels, bias=False).double()
        fast = copy.deepcopy(native)
        assert x3d_kernels.use_fast_depthwise(fast) == 1
        x = torch.randn(n, channels, frames, size, size, dtype=torch.float64)
        g = torch.randn_like(native(x))
        for a, b in zip(_grads(native, x, g), _grads(fast, x, g)):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_whole_x3d_gradients_are_as_accurate_as_pytorchs():
    """X3D-XS: 27 depthwise convs switched, same keys and forward; float32 grads as close to float64 as PyTorch's.

    Some BN gradients are sums with heavy cancellation (PyTorch's own float32 error on them is
    ~3e-4 of their largest value), so each parameter is held to PyTorch's own error against a
    float64 run, not to a fixed tolerance.
    """
    torch.manual_seed(0)
    native = x3d.generate_model("XS", n_classes=5, dropout=0.0)
    with torch.no_grad():  # the zero-initialised last BNs would leave most branches without gradient
        for name, p in native.named_parameters():
            if name.endswith("c_bn.weight"):
                p.fill_(0.3)
    fast, reference = copy.deepcopy(native), copy.deepcopy(native).double()
    assert x3d_kernels.use_fast_depthwise(fast) == 27
    assert list(fast.state_dict()) == list(native.state_dict())
    x, y = torch.randn(3, 3, 4, 40, 40), torch.tensor([0, 3, 4])
    out_native, out_fast = native(x), fast(x)
    assert torch.equal(out_native, out_fast)
    F.cross_entropy(out_native, y).backward()
    F.cross_entropy(out_fast, y).backward()
    F.cross_entropy(reference(x.double()), y).backward()
    worst = 0.0
    for (name, a), b, r in zip(native.named_parameters(), fast.parameters(), reference.parameters()):
        scale = r.grad.abs().max().item() + 1e-30
        err_native = (a.grad.double() - r.grad).abs().max().item() / scale
        err_fast = (b.grad.double() - r.grad).abs().max().item() / scale
        assert err_fast <= 2 * err_native + 1e-6, (name, err_fast, err_native)
        worst = max(worst, err_fast)
    assert worst < 1e-3


def test_channels_last_autocast_and_inference_paths():
    """channels_last_3d input, bf16 autocast (grads in the parameters' dtype) and no_grad all run."""
    torch.manual_seed(1)
    native = nn.Conv3d(8, 8, 3, (1, 2, 2), 1, groups=8, bias=False)
    fast = copy.deepcopy(native)
    x3d_kernels.use_fast_depthwise(fast)
    x = torch.randn(2, 8, 4, 9, 9).contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn_like(native(x))
    for a, b in zip(_grads(native, x, g), _grads(fast, x, g)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x.requires_grad_())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert fast.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(fast(x), native(x))


def test_other_convolutions_are_left_alone():
    """Dense, grouped (not depthwise), biased, dilated and strided-in-time convs keep nn.Conv3d."""
    model = nn.Sequential(
        nn.Conv3d(4, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1, groups=2, bias=False),
        nn.Conv3d(8, 8, 3, padding=1, groups=8), nn.Conv3d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False),
        nn.Conv3d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.Conv3d(8, 8, 3, groups=8, bias=False))
    assert x3d_kernels.use_fast_depthwise(model) == 0
    assert all(type(m) is nn.Conv3d for m in model)
