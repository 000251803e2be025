"""X3D video networks (XS, S, M, L, XL) exactly as FAIR's PySlowFast builds them; depends on torch only.

Output contract (input: float (N, C, T, H, W), contiguous or channels_last_3d):
- ``model(x)``: logits. task='class' -> (N, n_classes), in train and eval; when a crop larger than
  the training crop leaves several positions after the head's pool, the logits of the positions
  are averaged. task='loc' -> (N, n_classes, T) per-time logits (T = input frames; the network
  never strides in time), averaged over spatial positions.
- ``model.predict(x)``: what PySlowFast's X3D returns in eval mode: softmax over classes (sigmoid
  when multi_label=True) at every position left by the pool, then averaged over positions.
  task='loc' -> per-time probabilities (N, n_classes, T).
- Every batch norm is a ``SubBatchNorm3d``. Training with k splits normalises the interleaved
  sub-batches separately (PySlowFast semantics); the plain running statistics that eval uses are
  re-aggregated after every training forward, so eval can never see stale statistics.
  ``state_dict()`` is always plain-BN form and loads at any split count.
- The head pools with kernel min(preset kernel, feature size) per dimension: a global pool for
  every Multigrid shape (no rebuild needed), PySlowFast's fixed window for larger test crops.

API: PRESETS, generate_model, set_bn_splits, recompute_bn_stats (precise BN), load_pretrained,
save_checkpoint, model_complexity, parameter_groups, WIDTH_DIVISORS; model.replace_logits(n), model.set_width_divisor(d),
model.set_activation_checkpointing(on), model.positions(x) -> (N, T', H', W', n_classes).

Command line: ``python x3d.py table`` prints params / GMACs; ``python x3d.py convert --version M
--src FILE --out models/x3d_m.pt`` converts FAIR / pytorchvideo / x3d-multigrid weights.
"""
import argparse
import contextlib
import copy
import dataclasses
import itertools
import math
import os
import re
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclasses.dataclass(frozen=True)
class X3DPreset:
    """One X3D version: sampling, crops and scaling factors of PySlowFast's config."""

    frames: int
    rate: int
    train_crop: int
    test_crop: int
    train_short_side: tuple
    depth_factor: float
    width_factor: float


PRESETS = {
    "XS": X3DPreset(4, 12, 160, 182, (182, 228), 2.2, 2.0),
    "S": X3DPreset(13, 6, 160, 182, (182, 228), 2.2, 2.0),
    "M": X3DPreset(16, 5, 224, 256, (256, 320), 2.2, 2.0),
    "L": X3DPreset(16, 5, 312, 356, (356, 446), 5.0, 2.0),
    "XL": X3DPreset(16, 5, 312, 356, (356, 446), 5.0, 2.9),
}

BN_EPS = 1e-5
BN_MOMENTUM = 0.1
BOTTLENECK_FACTOR = 2.25
HEAD_WIDTH = 2048
SE_RATIO = 1 / 16
_BASE_WIDTH = 12  # PySlowFast X3D.DIM_C1
_BASE_DEPTHS = (1, 2, 5, 3)  # res2..res5 before the depth factor
# Stem and stage widths round to multiples of 8 in the 2020 X3D code (the default here) and to
# whole channels (divisor 1) in PySlowFast's code since June 2021. Only XL differs: its stage
# widths are 32/72/136/280 (11,095,904 params) vs 35/70/139/278 (11,087,571); XS-L have
# multiples of 8 either way. The squeeze-excite width keeps divisor 8 in both.
WIDTH_DIVISORS = (8, 1)


def round_width(width, multiplier, min_width=8, divisor=8):
    """PySlowFast's channel rounding: nearest multiple of divisor, never below 90% of the target."""
    width *= multiplier
    out = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if out < 0.9 * width:
        out += divisor
    return int(out)


class SubBatchNorm3d(nn.Module):
    """BatchNorm3d that, in training, normalises k interleaved sub-batches separately (PySlowFast).

    Split j holds samples j, j+k, j+2k, ...; each split keeps its own running statistics (k*C
    buffers, not saved) and after every training forward the plain running statistics are set to
    PySlowFast's aggregate: mean of split means; mean of split vars + variance of split means.
    Eval always uses those plain statistics; the state dict is that of a plain BatchNorm3d.
    """

    def __init__(self, num_features, num_splits=1, eps=BN_EPS, momentum=BN_MOMENTUM):
        """Create the BN for num_features channels with num_splits training splits."""
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("split_running_mean", None, persistent=False)
        self.register_buffer("split_running_var", None, persistent=False)
        self.num_splits = 1
        self.freeze_stats = False  # set while activation checkpointing recomputes a block
        self.set_splits(num_splits)

    def extra_repr(self):
        """Show channels and split count."""
        return f"{self.num_features}, num_splits={self.num_splits}, eps={self.eps}, momentum={self.momentum}"

    def set_splits(self, k):
        """Use k splits from now on; split statistics start from the current aggregate (as PySlowFast's reload)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"BN split count must be a positive int, got {k!r}")
        if k == self.num_splits and (k == 1 or self.split_running_mean is not None):
            return
        self.num_splits = k
        self._reset_splits()

    def _reset_splits(self):
        """Fill every split's statistics with the plain running statistics."""
        if self.num_splits == 1:
            self.split_running_mean = None
            self.split_running_var = None
        else:
            self.split_running_mean = self.running_mean.detach().repeat(self.num_splits)
            self.split_running_var = self.running_var.detach().repeat(self.num_splits)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Load plain-BN keys, then restart the split statistics from them."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._reset_splits()

    def stat_buffers(self):
        """The (mean, var) buffers a training forward updates at the current split count."""
        if self.num_splits == 1:
            return self.running_mean, self.running_var
        return self.split_running_mean, self.split_running_var

    def aggregate(self):
        """Set the plain running statistics to the aggregate of the split statistics."""
        if self.num_splits == 1:
            return
        with torch.no_grad():
            means = self.split_running_mean.view(self.num_splits, -1)
            mean = means.mean(0)
            var = self.split_running_var.view(self.num_splits, -1).mean(0) + ((means - mean) ** 2).mean(0)
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)

    def forward(self, x):
        """Normalise x (N, C, T, H, W)."""
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        n, c, k = x.shape[0], x.shape[1], self.num_splits
        if n % k != 0:
            raise ValueError(
                f"SubBatchNorm3d: a batch of {n} samples does not divide into {k} BN splits; "
                f"use a per-device batch that is a multiple of {k} or call set_bn_splits(model, k) with k dividing {n}"
            )
        mean, var = self.stat_buffers()
        if self.freeze_stats:  # recompute of a checkpointed block: same ops, throwaway statistics
            mean, var = mean.clone(), var.clone()
        else:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
        if k == 1:
            return F.batch_norm(x, mean, var, self.weight, self.bias, True, self.momentum, self.eps)
        # The affine goes into batch_norm with the weights repeated per split: one pass over the
        # activations instead of three (a separate multiply and add, as PySlowFast has them), which
        # made X3D-XS's training step at 4x34, batch 64, 8 splits 1.2x faster on a CPU.
        y = F.batch_norm(x.reshape(n // k, c * k, *x.shape[2:]), mean, var, self.weight.repeat(k),
                         self.bias.repeat(k), True, self.momentum, self.eps)
        if not self.freeze_stats:
            self.aggregate()
        return y.reshape(x.shape)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global average -> 1x1x1 conv -> ReLU -> 1x1x1 conv -> sigmoid -> scale."""

    def __init__(self, channels):
        """SE over channels with PySlowFast's reduced width round_width(channels, 1/16)."""
        super().__init__()
        width = round_width(channels, SE_RATIO)
        self.fc1 = nn.Conv3d(channels, width, 1, bias=True)
        self.fc2 = nn.Conv3d(width, channels, 1, bias=True)

    def forward(self, x):
        """Scale x's channels by the excitation."""
        s = x.mean((2, 3, 4), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class X3DBlock(nn.Module):
    """Bottleneck: 1x1x1 -> BN -> ReLU -> depthwise 3x3x3 -> BN -> [SE] -> Swish -> 1x1x1 -> BN, plus shortcut."""

    def __init__(self, dim_in, dim_inner, dim_out, stride, use_se, splits):
        """A block; stride (spatial) > 1 or a width change gives a projection shortcut with BN."""
        super().__init__()
        if stride != 1 or dim_in != dim_out:
            self.shortcut = nn.Conv3d(dim_in, dim_out, 1, stride=(1, stride, stride), bias=False)
            self.shortcut_bn = SubBatchNorm3d(dim_out, splits)
        else:
            self.shortcut = None
        self.a = nn.Conv3d(dim_in, dim_inner, 1, bias=False)
        self.a_bn = SubBatchNorm3d(dim_inner, splits)
        self.b = nn.Conv3d(dim_inner, dim_inner, 3, stride=(1, stride, stride), padding=1, groups=dim_inner, bias=False)
        self.b_bn = SubBatchNorm3d(dim_inner, splits)
        self.se = SqueezeExcite(dim_inner) if use_se else None
        self.c = nn.Conv3d(dim_inner, dim_out, 1, bias=False)
        self.c_bn = SubBatchNorm3d(dim_out, splits)
        self.c_bn.final_bn = True

    def forward(self, x):
        """relu(shortcut(x) + branch(x))."""
        y = F.relu(self.a_bn(self.a(x)))
        y = self.b_bn(self.b(y))
        if self.se is not None:
            y = self.se(y)
        y = self.c_bn(self.c(F.silu(y)))
        skip = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x))
        return F.relu(skip + y)


class X3DStem(nn.Module):
    """Conv 1x3x3 stride 1x2x2 -> depthwise conv 5x1x1 -> BN -> ReLU."""

    def __init__(self, dim_in, dim_out, splits):
        """Stem from dim_in input channels to dim_out."""
        super().__init__()
        self.conv_xy = nn.Conv3d(dim_in, dim_out, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False)
        self.conv_t = nn.Conv3d(dim_out, dim_out, (5, 1, 1), padding=(2, 0, 0), groups=dim_out, bias=False)
        self.bn = SubBatchNorm3d(dim_out, splits)

    def forward(self, x):
        """Stem features at half resolution."""
        return F.relu(self.bn(self.conv_t(self.conv_xy(x))))


class X3DHead(nn.Module):
    """1x1x1 conv -> BN -> ReLU -> avg pool -> 1x1x1 conv 2048 -> ReLU -> dropout -> linear, per position."""

    def __init__(self, dim_in, dim_inner, n_classes, pool_kernel, dropout, splits, keep_time):
        """Head; pool_kernel (t, h, w) is PySlowFast's, capped at the feature size at run time."""
        super().__init__()
        self.conv_5 = nn.Conv3d(dim_in, dim_inner, 1, bias=False)
        self.conv_5_bn = SubBatchNorm3d(dim_inner, splits)
        self.lin_5 = nn.Conv3d(dim_inner, HEAD_WIDTH, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(HEAD_WIDTH, n_classes)
        self.pool_kernel = tuple(int(k) for k in pool_kernel)
        self.keep_time = keep_time

    def forward(self, x):
        """Per-position logits (N, T', H', W', n_classes)."""
        x = F.relu(self.conv_5_bn(self.conv_5(x)))
        t, h, w = x.shape[2], x.shape[3], x.shape[4]
        kt = 1 if self.keep_time else min(self.pool_kernel[0], t)
        x = F.avg_pool3d(x, (kt, min(self.pool_kernel[1], h), min(self.pool_kernel[2], w)), stride=1)
        x = F.relu(self.lin_5(x))
        return self.projection(self.dropout(x.permute(0, 2, 3, 4, 1)))


class X3D(nn.Module):
    """The X3D network of one preset; see the module docstring for the output contract.

    PySlowFast's architecture exactly: 3,794,322 parameters for XS/S/M, 6,153,432 for L, 11,095,904
    for XL; 0.6053 / 1.9629 / 4.7325 / 18.3677 GMACs at the train crop; eval outputs equal
    pytorchvideo's create_x3d to 1e-5 with converted weights (tests/test_x3d_parity.py).
    width_divisor (see WIDTH_DIVISORS): 8 builds the 2020 X3D code's widths, 1 PySlowFast's
    current rounding (XL: 11,087,571 parameters); load_pretrained picks the one a checkpoint has.
    Deliberate differences: the head's pool kernel is capped at the feature size (PySlowFast
    rebuilds the model per Multigrid shape instead); forward returns logits in eval too (PySlowFast
    returns probabilities there; predict does); Swish is F.silu (same function).
    """

    def __init__(self, version, n_classes=400, n_input_channels=3, dropout=0.5, base_bn_splits=1,
                 task="class", multi_label=False, width_divisor=8):
        """Build X3D-<version> (XS, S, M, L, XL) for task 'class' or 'loc'."""
        super().__init__()
        if version not in PRESETS:
            raise ValueError(f"unknown X3D version {version!r}; choose one of {sorted(PRESETS)}")
        if task not in ("class", "loc"):
            raise ValueError(f"unknown task {task!r}; choose 'class' or 'loc'")
        if width_divisor not in WIDTH_DIVISORS:
            raise ValueError(f"width_divisor={width_divisor!r}: choose 8 (2020 X3D code) or 1 "
                             f"(PySlowFast's current code)")
        self.version, self.task, self.multi_label = version, task, multi_label
        self.preset = PRESETS[version]
        self.checkpointing = False
        self._build(n_input_channels, n_classes, dropout, base_bn_splits, width_divisor)
        self.reset_parameters()

    def _build(self, n_input_channels, n_classes, dropout, k, width_divisor):
        """Create (or replace) the stem, the four stages and the head at the given width rounding."""
        p, d = self.preset, width_divisor
        self.width_divisor = d
        dim = round_width(_BASE_WIDTH, p.width_factor, d, d)
        self.stem = X3DStem(n_input_channels, dim, k)
        for i, base_depth in enumerate(_BASE_DEPTHS):
            dim_out = round_width(_BASE_WIDTH * 2 ** i, p.width_factor, d, d)
            dim_inner = int(BOTTLENECK_FACTOR * dim_out)
            depth = int(math.ceil(p.depth_factor * base_depth))
            blocks = [X3DBlock(dim if j == 0 else dim_out, dim_inner, dim_out, 2 if j == 0 else 1, j % 2 == 0, k)
                      for j in range(depth)]
            self.add_module(f"s{i + 2}", nn.Sequential(*blocks))
            dim = dim_out
        side = int(math.ceil(p.train_crop / 32))
        self.head = X3DHead(dim, dim_inner, n_classes, (p.frames, side, side), dropout, k, self.task == "loc")

    def set_width_divisor(self, width_divisor):
        """Rebuild every layer at another width rounding (fresh init; classes, dropout, splits, device, dtype, mode kept).

        Parameters change: call it (or load_pretrained, which calls it) before making the optimizer.
        """
        if width_divisor not in WIDTH_DIVISORS:
            raise ValueError(f"width_divisor={width_divisor!r}: choose one of {WIDTH_DIVISORS}")
        if width_divisor == self.width_divisor:
            return
        ref = self.stem.conv_xy.weight
        self._build(self.stem.conv_xy.in_channels, self.n_classes, self.head.dropout.p, self.stem.bn.num_splits,
                    width_divisor)
        self.reset_parameters()
        self.to(device=ref.device, dtype=ref.dtype)
        self.train(self.training)

    @property
    def n_classes(self):
        """Number of classes of the classifier."""
        return self.head.projection.out_features

    def reset_parameters(self):
        """PySlowFast init: conv kaiming-normal fan_out, BN 1/0 (last BN of each branch 0), linear N(0, 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, SubBatchNorm3d):
                nn.init.constant_(m.weight, 0.0 if getattr(m, "final_bn", False) else 1.0)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def replace_logits(self, n_classes):
        """New classifier for n_classes, N(0, 0.01) init, on the old one's device and dtype."""
        old = self.head.projection
        self.head.projection = nn.Linear(HEAD_WIDTH, n_classes, device=old.weight.device, dtype=old.weight.dtype)
        nn.init.normal_(self.head.projection.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.projection.bias)

    def set_activation_checkpointing(self, enabled):
        """Recompute residual blocks in backward during training (less memory, same gradients and BN stats)."""
        self.checkpointing = bool(enabled)

    def _run_block(self, block, x):
        """One residual block, checkpointed when enabled; the recompute does not update BN statistics."""
        if not (self.checkpointing and self.training and torch.is_grad_enabled()):
            return block(x)
        if torch.compiler.is_compiling():  # the compiler recomputes from its functional graph: no double update
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return torch.utils.checkpoint.checkpoint(
            block, x, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _frozen_bn_stats(block)))

    def positions(self, x):
        """Per-position logits (N, T', H', W', n_classes) left by the head's pool."""
        if x.dim() != 5 or not x.is_floating_point():
            raise ValueError(f"X3D expects a float clip batch (N, C, T, H, W), got {x.dtype} of shape {tuple(x.shape)}; "
                             f"convert uint8 clips to float and normalise them first")
        x = self.stem(x)
        for stage in (self.s2, self.s3, self.s4, self.s5):
            for block in stage:
                x = self._run_block(block, x)
        return self.head(x)

    def _reduce(self, p):
        """Average per-position values: (N, classes) for 'class', (N, classes, T) for 'loc'."""
        if self.task == "loc":
            return p.mean((2, 3)).permute(0, 2, 1)
        return p.mean((1, 2, 3))

    def forward(self, x):
        """Logits: (N, n_classes) for task 'class', (N, n_classes, T) for 'loc'."""
        return self._reduce(self.positions(x))

    def predict(self, x):
        """Softmax (sigmoid if multi_label) at every position, averaged: PySlowFast's eval output."""
        p = self.positions(x)
        p = torch.sigmoid(p) if self.multi_label else torch.softmax(p, dim=-1)
        return self._reduce(p)


@contextlib.contextmanager
def _frozen_bn_stats(module):
    """While active, the SubBatchNorm3d layers of module normalise with batch statistics but update nothing."""
    bns = [m for m in module.modules() if isinstance(m, SubBatchNorm3d)]
    for m in bns:
        m.freeze_stats = True
    try:
        yield
    finally:
        for m in bns:
            m.freeze_stats = False


def generate_model(x3d_version, n_classes=400, n_input_channels=3, dropout=0.5, base_bn_splits=1, task="class",
                   multi_label=False, width_divisor=8):
    """Build an X3D model (see X3D); base_bn_splits is the initial SubBatchNorm3d split count."""
    return X3D(x3d_version, n_classes, n_input_channels, dropout, base_bn_splits, task, multi_label, width_divisor)


def set_bn_splits(model, k):
    """Set every SubBatchNorm3d of model to k splits, keeping the learned statistics."""
    for m in model.modules():
        if isinstance(m, SubBatchNorm3d):
            m.set_splits(k)


def _bn_modules(model):
    """Every batch norm layer (SubBatchNorm3d or torch BatchNorm) of model."""
    return [m for m in model.modules() if isinstance(m, (SubBatchNorm3d, nn.modules.batchnorm._BatchNorm))]


def recompute_bn_stats(model, batches, num_batches):
    """Precise BN exactly as fvcore 0.1.5.post20221221 update_bn_stats, which PySlowFast calls before evaluation.

    Each BN's running mean / var (per split at the current split count) becomes the population
    mean / biased variance of up to num_batches training-mode forwards, each batch weighted by its
    element count per channel (fvcore's _PopulationVarianceEstimator; older fvcore averaged the
    per-batch unbiased variances instead); split statistics are then aggregated. batches yields float
    input tensors (or tuples / lists whose first item is the input). Returns the number of batches
    used; ValueError if there were none. The model's train / eval mode is restored.
    """
    bns = _bn_modules(model)
    sizes = {}

    def record_size(m, inputs):
        splits = m.num_splits if isinstance(m, SubBatchNorm3d) else 1
        sizes[m] = inputs[0].numel() // inputs[0].shape[1] // splits

    hooks = [m.register_forward_pre_hook(record_size) for m in bns]
    was_training, momenta = model.training, [m.momentum for m in bns]
    estimates = [[0, None, None] for _ in bns]  # samples seen, mean, mean of squares
    used = 0
    model.train()
    try:
        for m in bns:
            m.momentum = 1.0
        with torch.no_grad():
            for batch in itertools.islice(batches, num_batches):
                sizes.clear()
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                used += 1
                for m, est in zip(bns, estimates):
                    if m not in sizes:
                        continue  # unused in this forward
                    n = sizes[m]
                    mean, var = _stats_of(m)
                    square = mean.square() + var * ((n - 1) / n)
                    est[0] += n
                    if est[1] is None:
                        est[1], est[2] = torch.zeros_like(mean), torch.zeros_like(var)
                    est[1] += (mean - est[1]) * (n / est[0])
                    est[2] += (square - est[2]) * (n / est[0])
    finally:
        for hook in hooks:
            hook.remove()
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
    if used == 0:
        raise ValueError("recompute_bn_stats: the batches iterable yielded no batch; BN statistics left unchanged")
    with torch.no_grad():
        for m, (_, mean, square) in zip(bns, estimates):
            if mean is None:
                continue
            target_mean, target_var = _stats_of(m)
            target_mean.copy_(mean)
            target_var.copy_(square - mean.square())
            if isinstance(m, SubBatchNorm3d):
                m.aggregate()
    return used


def _stats_of(m):
    """The running (mean, var) buffers a training forward of BN layer m updates."""
    return m.stat_buffers() if isinstance(m, SubBatchNorm3d) else (m.running_mean, m.running_var)


def parameter_groups(model, weight_decay, bn_weight_decay=0.0):
    """SGD parameter groups as PySlowFast: BN affine params at bn_weight_decay, everything else (biases too) at weight_decay."""
    bn_ids = {id(p) for m in _bn_modules(model) for p in m.parameters(recurse=False)}
    bn, other = [], []
    for p in model.parameters():
        if p.requires_grad:
            (bn if id(p) in bn_ids else other).append(p)
    return [{"params": other, "weight_decay": weight_decay}, {"params": bn, "weight_decay": bn_weight_decay}]


def model_complexity(model, frames, crop):
    """(parameter count, GMACs of one clip) counting conv + linear multiply-adds as FAIR's model zoo does."""
    params = sum(p.numel() for p in model.parameters())
    shadow = copy.deepcopy(model).to("meta").eval()
    macs = [0]

    def count(m, inputs, out):
        if isinstance(m, nn.Conv3d):
            macs[0] += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        else:
            macs[0] += out.numel() * m.in_features

    for m in shadow.modules():
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            m.register_forward_hook(count)
    in_ch = next(m for m in shadow.modules() if isinstance(m, nn.Conv3d)).in_channels
    with torch.no_grad():
        shadow.positions(torch.empty(1, in_ch, frames, crop, crop, device="meta"))
    return params, macs[0] / 1e9


# ----------------------------------------------------------------------------------------------
# Checkpoint formats. Each converter maps a source state dict onto this model's key names.

@dataclasses.dataclass(frozen=True)
class _Layout:
    """A checkpoint layout: a key that identifies it, its residual-block prefix and its name maps."""

    marker: str
    block: str  # regex of a residual block's prefix; groups: stage, block index
    stage_offset: int  # added to the stage group to get this repo's s2..s5
    inner: dict  # name inside a block -> this repo's
    outer: dict  # stem / head prefix -> this repo's


_LAYOUTS = {
    "pyslowfast": _Layout(
        "s1.pathway0_stem.conv_xy.weight", r"s(\d)\.pathway0_res(\d+)\.", 0,
        {"branch1_bn.": "shortcut_bn.", "branch1.": "shortcut.", "branch2.": ""},
        {"s1.pathway0_stem.conv_xy.": "stem.conv_xy.", "s1.pathway0_stem.conv.": "stem.conv_t.",
         "s1.pathway0_stem.bn.": "stem.bn.", "head.": "head."}),
    "pytorchvideo": _Layout(  # its stem names are swapped: conv_t holds the 1x3x3 spatial conv
        "blocks.0.conv.conv_t.weight", r"blocks\.([1-4])\.res_blocks\.(\d+)\.", 1,
        {"branch1_conv.": "shortcut.", "branch1_norm.": "shortcut_bn.", "branch2.conv_a.": "a.",
         "branch2.norm_a.": "a_bn.", "branch2.conv_b.": "b.", "branch2.norm_b.0.": "b_bn.",
         "branch2.norm_b.1.block.0.": "se.fc1.", "branch2.norm_b.1.block.2.": "se.fc2.",
         "branch2.conv_c.": "c.", "branch2.norm_c.": "c_bn."},
        {"blocks.0.conv.conv_t.": "stem.conv_xy.", "blocks.0.conv.conv_xy.": "stem.conv_t.",
         "blocks.0.norm.": "stem.bn.", "blocks.5.pool.pre_conv.": "head.conv_5.",
         "blocks.5.pool.pre_norm.": "head.conv_5_bn.", "blocks.5.pool.post_conv.": "head.lin_5.",
         "blocks.5.proj.": "head.projection."}),
    "x3d-multigrid": _Layout(
        "conv1_s.weight", r"layer([1-4])\.(\d+)\.", 1,
        {"downsample.0.": "shortcut.", "downsample.1.": "shortcut_bn.", "conv1.": "a.", "bn1.": "a_bn.",
         "conv2.": "b.", "bn2.": "b_bn.", "conv3.": "c.", "bn3.": "c_bn.", "fc1.": "se.fc1.", "fc2.": "se.fc2."},
        {"conv1_s.": "stem.conv_xy.", "conv1_t.": "stem.conv_t.", "bn1.": "stem.bn.", "conv5.": "head.conv_5.",
         "bn5.": "head.conv_5_bn.", "fc1.": "head.lin_5.", "fc2.": "head.projection."}),
    "x3d.py": _Layout("stem.conv_xy.weight", r"s(\d)\.(\d+)\.", 0, {"": ""}, {"": ""}),
}


def _rename(key, layout):
    """Key in this model's names, or None when the layout has no rule for it."""
    m = re.match(layout.block, key)
    table, rest = (layout.inner, key[m.end():]) if m else (layout.outer, key)
    for old, new in table.items():
        if rest.startswith(old):
            if not m:
                return new + rest[len(old):]
            return f"s{int(m[1]) + layout.stage_offset}.{m[2]}.{new}{rest[len(old):]}"
    return None


def _merge_split_bn(sd, notes):
    """x3d-multigrid SubBatchNorm3d: keep weight/bias, take running stats from the aggregated split_bn (fresher than .bn)."""
    out, aggregated = {}, False
    for key, value in sd.items():
        if ".split_bn." in key:
            continue
        if ".bn.running_" in key or key.endswith(".bn.num_batches_tracked"):
            prefix, name = key.rsplit(".bn.", 1)
            split_mean = sd.get(f"{prefix}.split_bn.running_mean")
            tracked = sd.get(f"{prefix}.split_bn.num_batches_tracked")
            if name != "num_batches_tracked" and split_mean is not None and (tracked is None or tracked > 0):
                means = split_mean.view(split_mean.numel() // value.numel(), -1)
                if name == "running_mean":
                    value = means.mean(0)
                else:
                    split_var = sd[f"{prefix}.split_bn.running_var"].view(means.shape)
                    value = split_var.mean(0) + ((means - means.mean(0)) ** 2).mean(0)
                aggregated = True
            key = f"{prefix}.{name}"
        out[key] = value
    if aggregated:
        notes.append("running stats aggregated from x3d-multigrid split_bn buffers")
    return out


def _unwrap(obj):
    """(state dict, format hint, metadata) of a loaded checkpoint object."""
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        meta = {k: v for k, v in obj.items() if k != "model"}
        obj = obj["model"]
    for wrapper in ("model_state", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"checkpoint is not a state dict (got {type(obj).__name__}); expected a dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}, meta


def _load_file(path):
    """torch.load a checkpoint on CPU; non-tensor pickles (old PySlowFast files) only as a trusted-file fallback."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except Exception as e:  # weights_only refuses arbitrary pickled objects
        try:
            return torch.load(path, map_location="cpu", weights_only=False), [
                f"loaded with weights_only=False ({type(e).__name__}); only load files you trust"]
        except Exception as e2:
            raise ValueError(f"cannot read checkpoint {path}: {e2}") from e2


def convert_state_dict(source, model_keys=None):
    """(state dict in this repo's names, format name, notes, metadata) for any supported checkpoint object."""
    sd, meta = _unwrap(source)
    fmt = next((name for name, layout in _LAYOUTS.items() if layout.marker in sd), None)
    if fmt is None:
        raise ValueError(f"unrecognised checkpoint format (not PySlowFast, pytorchvideo, x3d-multigrid or x3d.py); "
                         f"first keys: {list(sd)[:5]}")
    notes = []
    if fmt == "x3d-multigrid":
        sd = _merge_split_bn(sd, notes)
    out, unmatched = {}, []
    for key, value in sd.items():
        new = _rename(key, _LAYOUTS[fmt])
        if new is None or (model_keys is not None and new not in model_keys):
            unmatched.append(key)
        else:
            out[new] = value
    if unmatched:
        raise ValueError(f"checkpoint format {fmt}: {len(unmatched)} keys do not map onto this X3D "
                         f"(another architecture or version?), first: {unmatched[:8]}")
    return out, fmt, notes, meta


def load_pretrained(model, path_or_state_dict, strict_classes=False):
    """Load a PySlowFast .pyth, pytorchvideo, x3d-multigrid .pt or x3d.py checkpoint (path or object) into model.

    Returns a report dict: format (pyslowfast, pytorchvideo, x3d-multigrid, x3d.py), source, converted
    (model keys loaded), missing (model keys left as they were), unexpected (always empty: any would
    raise), classifier_reinitialized, notes (list of str). A different class count re-initialises the classifier (ValueError if strict_classes).
    Raises ValueError on keys that do not map, missing backbone tensors or shape mismatches.
    """
    notes = []
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source, notes = _load_file(os.fspath(path_or_state_dict))
        where = os.fspath(path_or_state_dict)
    else:
        source, where = path_or_state_dict, "<state dict>"
    target = model.state_dict()
    sd, fmt, conv_notes, meta = convert_state_dict(source, set(target))
    notes += conv_notes
    version = meta.get("x3d_version")
    if version is not None and getattr(model, "version", version) != version:
        raise ValueError(f"{where}: checkpoint is X3D-{version} but the model is X3D-{model.version}")
    note = _match_width_divisor(model, sd)
    if note:
        notes.append(note)
        target = model.state_dict()
    if fmt == "pytorchvideo" and "s2.0.shortcut_bn.weight" not in sd:
        ref = target["s2.0.shortcut_bn.running_var"]
        sd["s2.0.shortcut_bn.weight"] = torch.ones_like(ref)
        sd["s2.0.shortcut_bn.bias"] = torch.zeros_like(ref)
        sd["s2.0.shortcut_bn.running_mean"] = torch.zeros_like(ref)
        sd["s2.0.shortcut_bn.running_var"] = torch.full_like(ref, 1.0 - model.s2[0].shortcut_bn.eps)
        notes.append("pytorchvideo has no BN after the res2 shortcut: loaded as an identity BN")
    reinit = False
    classifier = ("head.projection.weight", "head.projection.bias")
    if any(k in sd and sd[k].shape != target[k].shape for k in classifier):
        if strict_classes:
            raise ValueError(f"{where}: checkpoint classifier has {sd[classifier[0]].shape[0]} classes, "
                             f"the model {target[classifier[0]].shape[0]} (strict_classes=True)")
        notes.append(f"classifier re-initialised: checkpoint has {sd[classifier[0]].shape[0]} classes, "
                     f"model {target[classifier[0]].shape[0]}")
        for k in classifier:
            del sd[k]
        reinit = True
    bad = [f"{k}: {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in sd.items() if v.shape != target[k].shape]
    if bad:
        raise ValueError(f"{where} (format {fmt}): shape mismatch, another X3D version? first: {bad[:5]}")
    missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")
               and not (reinit and k in classifier)]
    if missing:
        raise ValueError(f"{where} (format {fmt}): {len(missing)} model tensors absent from the checkpoint, first: {missing[:8]}")
    model.load_state_dict(sd, strict=False)
    if reinit:
        model.replace_logits(model.n_classes)
    return {"format": fmt, "source": where, "converted": sorted(sd), "missing": [k for k in target if k not in sd],
            "unexpected": [], "classifier_reinitialized": reinit, "notes": notes}


def _match_width_divisor(model, sd):
    """Rebuild an X3D model at the other width rounding when only that one fits sd's shapes; returns a note or None."""
    if not isinstance(model, X3D):
        return None
    skip = ("head.projection.weight", "head.projection.bias")  # the class count may differ

    def fits(shapes):
        return all(k in skip or k not in shapes or tuple(v.shape) == shapes[k] for k, v in sd.items())

    if fits({k: tuple(v.shape) for k, v in model.state_dict().items()}):
        return None
    for d in WIDTH_DIVISORS:
        if d == model.width_divisor:
            continue
        with torch.device("meta"):
            twin = X3D(model.version, model.n_classes, model.stem.conv_xy.in_channels, task=model.task,
                       width_divisor=d)
        if fits({k: tuple(v.shape) for k, v in twin.state_dict().items()}):
            model.set_width_divisor(d)
            widths = "/".join(str(model.get_submodule(f"s{i}")[0].c.out_channels) for i in range(2, 6))
            origin = "PySlowFast's current code" if d == 1 else "the 2020 X3D code"
            return (f"the checkpoint has X3D-{model.version} widths {widths} ({origin}): model rebuilt "
                    f"with width_divisor={d}")
    return None


def save_checkpoint(model, path, **extra):
    """Atomically write {'model', 'x3d_version', 'n_classes', 'task', **extra} to path."""
    payload = {"model": model.state_dict(), "x3d_version": model.version, "n_classes": model.n_classes,
               "task": model.task, **extra}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def complexity_table():
    """Rows (version, params, GMACs at train crop, GMACs at test crop) for every preset."""
    rows = []
    for version, p in PRESETS.items():
        model = generate_model(version)
        params, train = model_complexity(model, p.frames, p.train_crop)
        rows.append((version, params, train, model_complexity(model, p.frames, p.test_crop)[1]))
    return rows


def _main(argv=None):
    """Command line: `table` or `convert`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("table", help="params and GMACs at train / test crop for every version")
    conv = sub.add_parser("convert", help="convert FAIR / pytorchvideo / x3d-multigrid weights to this repo's format")
    conv.add_argument("--version", required=True, choices=sorted(PRESETS))
    conv.add_argument("--src", required=True, help="source checkpoint file")
    conv.add_argument("--out", required=True, help="output .pt file, e.g. models/x3d_m.pt")
    args = parser.parse_args(argv)
    if args.command == "table":
        print(f"{'version':8}{'frames':>7}{'train':>6}{'test':>6}{'params':>12}{'GMACs train':>13}{'GMACs test':>12}")
        for version, params, train, test in complexity_table():
            p = PRESETS[version]
            print(f"{version:8}{p.frames:>7}{p.train_crop:>6}{p.test_crop:>6}{params:>12,}{train:>13.4f}{test:>12.4f}")
        return 0
    source, _ = _load_file(args.src)
    sd, fmt, _, _ = convert_state_dict(source)
    n_classes = sd["head.projection.weight"].shape[0] if "head.projection.weight" in sd else 400
    model = generate_model(args.version, n_classes=n_classes)
    report = load_pretrained(model, source, strict_classes=True)
    save_checkpoint(model, args.out, source=os.path.abspath(args.src), source_format=fmt)
    print(f"converted {args.src} ({fmt}, {len(report['converted'])} tensors, {n_classes} classes) -> {args.out}")
    for note in report["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
