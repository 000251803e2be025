"""Multigrid training (Wu et al., 2020) as FAIR's PySlowFast defines it, for a stock DataLoader.

Long cycle: the (batch, frames, crop) shape changes per epoch range (a "phase") so that
batch x T x S x S stays about constant; short cycle: inside a phase the crop and batch cycle
iteration by iteration. This module owns the arithmetic (schedule, LR, BN splits) and the batch
sampler that hands the dataset one `ClipRequest` per sample; it has no model and no data code.

    python multigrid.py --help        # print a schedule table, optionally write a PNG plot
"""
from __future__ import annotations

import argparse
import math
import numbers
import sys
import textwrap
from typing import NamedTuple, Optional, Sequence

import torch
from torch.utils.data import Sampler

DEFAULT_LONG_CYCLE_FACTORS = ((0.25, 0.5 ** 0.5), (0.5, 0.5 ** 0.5), (0.5, 1.0), (1.0, 1.0))
DEFAULT_SHORT_CYCLE_FACTORS = (0.5, 0.5 ** 0.5)
LR_POLICIES = ("steps_with_relative_lrs", "cosine")
_MASK64 = (1 << 64) - 1


class ClipRequest(NamedTuple):
    """What the sampler asks the dataset for, per sample: which video and at what clip shape.

    index: dataset index; frames: T of the clip; crop: spatial crop (the dataset scales its
    minimum short side by crop / default crop, as PySlowFast does); max_rate: the temporal
    sampling rate is drawn uniformly from [rate, max_rate]; seed: per-sample RNG seed, a function
    of (run seed, epoch, position in the epoch's global permutation) only.
    """

    index: int
    frames: int
    crop: int
    max_rate: int
    seed: int


class Phase(NamedTuple):
    """One long-cycle phase: epochs [start_epoch, end_epoch) at one long-cycle shape.

    per_gpu_batch is the phase's base per-GPU batch (the short cycle's last position); shapes
    lists (per-GPU batch, crop) for each short-cycle position, cycled iteration by iteration.
    """

    index: int
    step_index: int
    batch_factor: int
    frames: int
    crop: int
    per_gpu_batch: int
    bn_splits: int
    start_epoch: int
    end_epoch: int
    max_rate: int
    shapes: tuple


def check_request(index: int, frames: int, crop: int, max_rate: int, count: int, rate: int) -> None:
    """A dataset's check of one request: index in range, positive shape, max_rate >= its base rate."""
    if not 0 <= index < count:
        raise IndexError(f"index {index} outside 0..{count - 1}")
    if frames < 1 or crop < 1 or max_rate < rate:
        raise ValueError(f"bad clip request frames={frames} crop={crop} max_rate={max_rate} "
                         f"(needs frames, crop >= 1 and max_rate >= rate {rate})")


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Per-sample seed in [0, 2**63) from (run seed, epoch, global position); splitmix64 mixing."""
    state = 0
    for value in (seed, epoch, position):
        state = (state ^ (value & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


def scale_lr(base_lr: float, base_batch: int, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): the LR grows in proportion to the global batch."""
    if base_lr <= 0 or base_batch <= 0 or global_batch <= 0:
        raise ValueError(f"scale_lr needs positive values, got base_lr={base_lr}, "
                         f"base_batch={base_batch}, global_batch={global_batch}")
    return base_lr * global_batch / base_batch


def _positive_int(name, value):
    """`value` as an int, or a ValueError naming `name` unless it is an integer >= 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_steps(steps, max_epoch, what="steps"):
    """Raise unless steps is [0, ...] strictly increasing ints below max_epoch; return ints."""
    steps = list(steps)
    if (not steps or steps[0] != 0 or any(not isinstance(s, numbers.Integral) for s in steps)
            or any(b <= a for a, b in zip(steps, steps[1:])) or steps[-1] >= max_epoch):
        raise ValueError(f"{what}={steps} must be strictly increasing integer epochs starting at 0 "
                         f"and ending below max_epoch={max_epoch}, e.g. [0, 94, 154, 196] for 239")
    return [int(s) for s in steps]


def long_cycle_schedule(steps: Sequence[int], max_epoch: int, frames: int, crop: int,
                        long_cycle_factors=DEFAULT_LONG_CYCLE_FACTORS,
                        short_cycle_factors=DEFAULT_SHORT_CYCLE_FACTORS,
                        epoch_factor: float = 1.5, short_cycle: bool = True) -> list:
    """PySlowFast's `get_long_cycle_schedule`: a list of (step_index, (b, T, S), end_epoch).

    Same arithmetic in the same order, so the worked example (steps [0, 94, 154, 196], max epoch
    239, T=32, S=224) gives exactly PySlowFast's 13 phases ending at epoch 358. The short cycle
    only enters through each long cycle's average batch factor. With short_cycle=False PySlowFast
    raises IndexError (it takes the fine-tune shape from the third short-cycle shape); here every
    long cycle then has its one long-cycle shape, and the fine-tune phase takes the last long
    cycle's shape, which is what PySlowFast uses whenever it does not crash.
    """
    steps = _check_steps(steps, max_epoch)
    if len(steps) < 2:
        raise ValueError(f"the long cycle needs at least two steps (one cycle before the fine-tune "
                         f"phase), got steps={steps}; e.g. steps=[0, {max(1, max_epoch * 2 // 5)}]")
    default_size = float(frames * crop ** 2)
    avg_bs, cycle_shapes = [], []
    for t_factor, s_factor in long_cycle_factors:
        base_t = int(round(frames * t_factor))
        base_s = int(round(crop * s_factor))
        shapes = [(base_t, crop * f) for f in short_cycle_factors] if short_cycle else []
        shapes.append((base_t, base_s))
        shapes = [(int(round(default_size / (t * s * s))), t, s) for t, s in shapes]
        if base_t < 1 or base_s < 1 or min(b for b, _, _ in shapes) < 1:
            raise ValueError(f"long-cycle factors {(t_factor, s_factor)} with short-cycle factors "
                             f"{tuple(short_cycle_factors)} give shapes {shapes} for T={frames}, "
                             f"S={crop}: every frame count, crop and batch factor must be >= 1")
        avg_bs.append(sum(b for b, _, _ in shapes) / len(shapes))
        cycle_shapes.append(shapes[-1])

    total_iters = 0.0
    raw = []
    for step_index in range(len(steps) - 1):
        step_epochs = steps[step_index + 1] - steps[step_index]
        for cycle_index, shape in enumerate(cycle_shapes):
            cur_epochs = step_epochs * avg_bs[cycle_index] / sum(avg_bs)
            total_iters += cur_epochs / avg_bs[cycle_index]
            raw.append((step_index, shape, cur_epochs))
    iter_saving = steps[-1] / total_iters
    # The fine-tune phase gets the same iteration saving as the rest of training.
    raw.append((len(steps) - 1, cycle_shapes[-1],
                (max_epoch - steps[-1]) / iter_saving * avg_bs[-1]))

    scale = max_epoch * epoch_factor / sum(epochs for _, _, epochs in raw)
    schedule, total = [], 0.0
    for step_index, shape, epochs in raw:
        total += epochs * scale
        schedule.append((step_index, shape, int(round(total))))
    return schedule


def multigrid_lr_steps(schedule: list, gamma: float = 0.1) -> tuple:
    """PySlowFast's `init_multigrid`: (steps, relative_lrs, max_epoch) from a long-cycle schedule.

    steps = [0] + phase ends with the last replaced by the integer midpoint of the last two;
    relative LR = gamma**step_index * batch_factor, with the fine-tune phase split into the
    previous phase's LR then its own (worked example: [..., 329, 343], [..., 0.01, 0.01, 0.001]).
    """
    steps = [0] + [end for _, _, end in schedule]
    steps[-1] = (steps[-2] + steps[-1]) // 2
    lrs = [gamma ** step_index * shape[0] for step_index, shape, _ in schedule]
    lrs = lrs[:-1] + [lrs[-2], lrs[-1]]
    return steps, lrs, schedule[-1][-1]


class MultigridPlan:
    """The whole training schedule, built once by the trainer: phases, shapes, BN splits, LR.

    frames, crop, rate: default T, train crop S and base temporal sampling rate; batch_per_gpu:
    the base per-GPU batch (global batch / GPUs); max_epoch, steps: the LR schedule before
    Multigrid rescaling (steps of the long cycle's LR / cycle placement, starting at 0);
    base_lr: the LR at the base batch (use `scale_lr` first). With long_cycle and short_cycle
    both off this is plain constant-shape training with the same LR policy.

    Rules (PySlowFast where it defines them):
    - Long cycle: phases and steps_with_relative_lrs LRs from `long_cycle_schedule` and
      `multigrid_lr_steps`; max_epoch becomes the last phase end (239 -> 358 in the example).
    - Short cycle alone: steps and max_epoch become int(x * epoch_factor) (239 -> 358);
      neither cycle: epochs and steps stay as given.
    - No long cycle with steps_with_relative_lrs: relative LR of step i is gamma**i (the
      stepwise config's LRS [1, 0.1, 0.01, 0.001]); one phase per LR step. Cosine without the
      long cycle ignores steps (as PySlowFast does) and has one phase.
    - Cosine with the long cycle: `steps` place the long cycles; phases are exactly those of
      `long_cycle_schedule(steps, ...)` and the cosine runs over the rescaled max_epoch.
      Cosine is PySlowFast's: end_lr + (base_lr - end_lr) * (cos(pi * epoch / max_epoch) + 1) / 2,
      no offset for warm-up. By default (cosine_batch_factor=True) the LR is the phase's batch
      factor x that cosine: the linear scaling rule, as steps_with_relative_lrs applies per phase
      and x3d-multigrid does. PySlowFast (which raises IndexError only when its SOLVER.STEPS is
      empty, its default) uses BASE_LR x cosine without the batch factor;
      cosine_batch_factor=False gives exactly that. They differ in every epoch whose batch factor
      is not 1, and in warm-up: in the X3D-M recipe (preset 'x3d-m') at epoch 0.25 PySlowFast's
      LR is 0.010632 and the default's 0.015558, and 371 of its 450 epochs differ.
    - Warm-up (both policies, PySlowFast): for epoch < warmup_epochs the LR goes linearly from
      warmup_start_lr to the policy's LR at warmup_epochs. warmup_epochs is not rescaled by
      Multigrid (PySlowFast does not). warmup_start_lr=None means 0.1 x base_lr (the recipes'
      0.01 at base LR 0.1).
    - BN splits: 1 without the long cycle (PySlowFast keeps plain BN). With it, per phase
      per_gpu_batch // bn_base_size (PySlowFast's int(batch / GPUs / BN_BASE_SIZE)), kept through
      the phase's short-cycle iterations. Where the per-GPU batch is below bn_base_size
      PySlowFast syncs BN across GPUs, and where the splits do not divide a batch its
      SubBatchNorm crashes mid-training: this plan refuses both at construction with a
      ValueError naming the phase, the per-GPU batch, bn_base_size and what to set.
    - constant_batch=True (not PySlowFast's; a variant for small datasets, where the long cycle's
      large batches leave too few steps): the long cycle's phases, shapes and epochs unchanged,
      every phase at the base per-GPU batch with batch factor 1, so its LR is the constant-shape
      run's and a small-shape epoch takes as many steps as a base-shape one, each cheaper.
    """

    def __init__(self, frames: int, crop: int, rate: int, batch_per_gpu: int, max_epoch: int,
                 steps: Optional[Sequence[int]], base_lr: float, *, long_cycle: bool = True,
                 short_cycle: bool = True, lr_policy: str = "steps_with_relative_lrs",
                 gamma: float = 0.1, warmup_epochs: float = 0.0,
                 warmup_start_lr: Optional[float] = None, epoch_factor: float = 1.5,
                 long_cycle_factors=DEFAULT_LONG_CYCLE_FACTORS,
                 short_cycle_factors=DEFAULT_SHORT_CYCLE_FACTORS, bn_base_size: int = 8,
                 cosine_end_lr: float = 0.0, cosine_batch_factor: bool = True, constant_batch: bool = False):
        frames, crop, rate, batch_per_gpu, max_epoch, bn_base_size = (
            _positive_int(name, value) for name, value in (
                ("frames", frames), ("crop", crop), ("rate", rate),
                ("batch_per_gpu", batch_per_gpu), ("max_epoch", max_epoch),
                ("bn_base_size", bn_base_size)))
        if lr_policy not in LR_POLICIES:
            raise ValueError(f"lr_policy={lr_policy!r} is not one of {LR_POLICIES}")
        if not base_lr > 0 or not gamma > 0 or not epoch_factor > 0:
            raise ValueError(f"base_lr, gamma and epoch_factor must be > 0, got "
                             f"{base_lr}, {gamma}, {epoch_factor}")
        if not isinstance(cosine_batch_factor, bool):
            raise ValueError(f"cosine_batch_factor must be True or False, got {cosine_batch_factor!r}")
        if lr_policy == "cosine" and not cosine_end_lr < base_lr:
            raise ValueError(f"cosine_end_lr={cosine_end_lr} must be below base_lr={base_lr}")
        if len(short_cycle_factors) != 2:
            raise ValueError(f"short_cycle_factors must hold 2 spatial factors (PySlowFast's "
                             f"short cycle has 3 positions), got {short_cycle_factors}")
        if steps is None and (long_cycle or lr_policy != "cosine"):
            raise ValueError("steps=None is only allowed for cosine without the long cycle; "
                             "give steps such as [0, 94, 154, 196] (max_epoch 239)")
        self.frames, self.crop, self.rate = frames, crop, rate
        self.batch_per_gpu, self.base_lr, self.lr_policy = batch_per_gpu, base_lr, lr_policy
        self.long_cycle, self.short_cycle, self.gamma = long_cycle, short_cycle, gamma
        self.bn_base_size, self.cosine_end_lr = bn_base_size, cosine_end_lr
        self.cosine_batch_factor, self.constant_batch = cosine_batch_factor, constant_batch
        self.short_cycle_factors = tuple(short_cycle_factors)
        self.input_max_epoch = max_epoch
        self.schedule = None
        self.steps, self.relative_lrs = None, None

        if long_cycle:
            self.schedule = long_cycle_schedule(steps, max_epoch, frames, crop, long_cycle_factors,
                                                short_cycle_factors, epoch_factor, short_cycle)
            if constant_batch:  # the long cycle's shapes and epochs, each at the base batch and LR
                self.schedule = [(step, (1, t, s), end) for step, (_, t, s), end in self.schedule]
            if lr_policy == "steps_with_relative_lrs":
                self.steps, self.relative_lrs, _ = multigrid_lr_steps(self.schedule, gamma)
            self.max_epoch = self.schedule[-1][-1]
            segments, start = [], 0
            for step_index, (factor, t, s), end in self.schedule:
                segments.append((step_index, factor, t, s, start, end))
                start = end
        else:
            if lr_policy == "steps_with_relative_lrs":
                steps = _check_steps(steps, max_epoch)
            if short_cycle:
                max_epoch = int(max_epoch * epoch_factor)
                steps = None if steps is None else [int(s * epoch_factor) for s in steps]
            self.max_epoch = max_epoch
            if lr_policy == "steps_with_relative_lrs":
                self.steps = _check_steps(steps, max_epoch, f"steps x epoch_factor={epoch_factor}")
                self.relative_lrs = [gamma ** i for i in range(len(self.steps))]
                ends = self.steps[1:] + [max_epoch]
                segments = [(i, 1, frames, crop, start, end)
                            for i, (start, end) in enumerate(zip(self.steps, ends))]
            else:
                segments = [(0, 1, frames, crop, 0, max_epoch)]
        if not 0 <= warmup_epochs < self.max_epoch:
            raise ValueError(f"warmup_epochs={warmup_epochs} must be in [0, max_epoch="
                             f"{self.max_epoch}) (max_epoch after Multigrid rescaling)")
        self.warmup_epochs = warmup_epochs
        self.warmup_start_lr = 0.1 * base_lr if warmup_start_lr is None else warmup_start_lr
        if self.warmup_start_lr < 0:
            raise ValueError(f"warmup_start_lr={warmup_start_lr} must be >= 0")
        self.phases = [self._make_phase(i, *segment) for i, segment in enumerate(segments)]

    def _make_phase(self, index, step_index, factor, frames, crop, start, end) -> Phase:
        """Build one Phase: its short-cycle shapes, max sampling rate and checked BN splits.

        Short cycle as PySlowFast's ShortCycleBatchSampler: batch x round((crop / (f x S))**2)
        at crop round(f x S) for each factor f, then the phase shape; at crop 224 and 16 per GPU
        that is 64 / 32 / 16 at 112 / 158 / 224, at crop 158 (8 per GPU) 16 / 8 / 8.
        """
        per_gpu = factor * self.batch_per_gpu
        shapes = []
        if self.short_cycle:
            for f in self.short_cycle_factors:
                multiplier = int(round((crop / (f * self.crop)) ** 2))
                if multiplier < 1:
                    raise ValueError(f"phase {index}: crop {crop} is too small for short-cycle "
                                     f"factor {f} (batch multiplier rounds to 0); check "
                                     f"short_cycle_factors={self.short_cycle_factors}")
                shapes.append((per_gpu * multiplier, int(round(f * self.crop))))
        shapes.append((per_gpu, crop))
        splits = 1
        if self.long_cycle:
            where = (f"Multigrid phase {index} (epochs {start}-{end}, {frames}x{crop}, "
                     f"batch factor {factor}): per-GPU batch {per_gpu}")
            if per_gpu < self.bn_base_size:
                raise ValueError(
                    f"{where} is below bn_base_size={self.bn_base_size}. PySlowFast would sync BN "
                    f"across GPUs there, which this repo does not do. Set bn_base_size <= "
                    f"{per_gpu} or batch_per_gpu >= {math.ceil(self.bn_base_size / factor)}")
            splits = per_gpu // self.bn_base_size
            if any(batch % splits for batch, _ in shapes):
                fits = [b for b in range(1, per_gpu + 1)
                        if all(batch % (per_gpu // b) == 0 for batch, _ in shapes)]
                raise ValueError(
                    f"{where} with bn_base_size={self.bn_base_size} gives {splits} BN splits, "
                    f"which do not divide the batches {[b for b, _ in shapes]}. Set bn_base_size "
                    f"to one of {fits} or change batch_per_gpu")
        return Phase(index, step_index, factor, frames, crop, per_gpu, splits, start, end,
                     self.rate * (self.frames // frames), tuple(shapes))

    def phase(self, epoch: int) -> Phase:
        """The phase that trains epoch `epoch` (PySlowFast: first phase with epoch < end)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        for phase in self.phases:
            if epoch < phase.end_epoch:
                return phase
        return self.phases[-1]

    def iteration_shape(self, epoch: int, iteration: int) -> tuple:
        """(per-GPU batch, frames, crop) of iteration `iteration` (0-based) of epoch `epoch`."""
        phase = self.phase(epoch)
        batch, crop = phase.shapes[iteration % len(phase.shapes)]
        return batch, phase.frames, crop

    def _policy_lr(self, epoch: float) -> float:
        """The LR policy without warm-up at fractional epoch `epoch`."""
        if self.lr_policy == "cosine":
            cosine = self.cosine_end_lr + (self.base_lr - self.cosine_end_lr) * (
                math.cos(math.pi * epoch / self.max_epoch) + 1.0) * 0.5
            if not self.cosine_batch_factor:
                return cosine
            return self.phase(int(epoch)).batch_factor * cosine
        steps = self.steps + [self.max_epoch]
        for index, step in enumerate(steps):
            if epoch < step:
                break
        return self.relative_lrs[index - 1] * self.base_lr

    def lr_at(self, epoch: float) -> float:
        """Absolute LR at epoch + iteration / iterations_in_epoch, warm-up included."""
        if not 0 <= epoch <= self.max_epoch:
            raise ValueError(f"epoch {epoch} is outside [0, max_epoch={self.max_epoch}]")
        lr = self._policy_lr(epoch)
        if epoch < self.warmup_epochs:
            lr_end = self._policy_lr(self.warmup_epochs)
            alpha = (lr_end - self.warmup_start_lr) / self.warmup_epochs
            lr = epoch * alpha + self.warmup_start_lr
        return lr

    @property
    def trained_phases(self) -> list:
        """Phases with at least one epoch. Phases keep their index; see `zero_epoch_note`."""
        return [p for p in self.phases if p.end_epoch > p.start_epoch]

    def zero_epoch_note(self) -> str:
        """One line naming the phases of zero epochs, which never train; empty when there are none.

        With few epochs the rounding of the long-cycle ends (PySlowFast's int(round(...)) of the
        running sum) gives two phases the same end, e.g. the demo's 20 -> 30 epoch plan has phases
        6 (29-29) and 8 (30-30); PySlowFast has them too and, like this repo, never trains them
        (an epoch goes to the first phase ending after it). Tables and plots leave them out; the
        other phases keep their numbers, the ones logs and metrics use.
        """
        empty = [p for p in self.phases if p.end_epoch <= p.start_epoch]
        if not empty:
            return ""
        names = ", ".join(f"{p.index} ({p.start_epoch}-{p.end_epoch})" for p in empty)
        return (f"zero-epoch phases {names} never train (PySlowFast's rounding of the phase ends "
                f"gives them too) and are left out")

    @property
    def mode(self) -> str:
        """Which cycles are on: 'long+short cycle', 'long cycle', 'short cycle' or 'constant shape'."""
        return ("long+short cycle" if self.long_cycle and self.short_cycle else
                "long cycle" if self.long_cycle else "short cycle" if self.short_cycle else
                "constant shape")

    @property
    def lr_name(self) -> str:
        """The LR policy as printed: says whether a long-cycle cosine carries the batch factor."""
        if self.lr_policy == "cosine" and self.long_cycle:
            return ("cosine x batch factor" if self.cosine_batch_factor else
                    "cosine without batch factor (PySlowFast)")
        return self.lr_policy

    def describe(self, world_size: int = 1, num_samples: Optional[int] = None) -> str:
        """The schedule as a text table; with num_samples it adds iterations per epoch per GPU.

        Phases of zero epochs are left out of the table and named in a line below it.
        """
        head = ["phase", "step", "epochs", "batch/GPU", "global batch", "frames x rate", "crop",
                "BN splits", "LR start -> end"]
        sampler = None
        if num_samples is not None:
            head.append("iters/epoch")
            sampler = MultigridBatchSampler(num_samples, self, world_size=world_size)
        rows = [head]
        for p in self.trained_phases:
            end_lr = self.lr_at(p.end_epoch - 1e-6)
            row = [str(p.index), str(p.step_index), f"{p.start_epoch}-{p.end_epoch}",
                   "/".join(str(b) for b, _ in p.shapes),
                   "/".join(str(b * world_size) for b, _ in p.shapes),
                   f"{p.frames} x {self.rate}" + (f"..{p.max_rate}" if p.max_rate > self.rate
                                                  else ""),
                   "/".join(str(c) for _, c in p.shapes), str(p.bn_splits),
                   f"{self.lr_at(p.start_epoch):.4g} -> {end_lr:.4g}"]
            if sampler is not None:
                row.append(str(sampler.iterations_in_epoch(p.start_epoch)))
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        title = (f"Multigrid plan ({self.mode}): T={self.frames} S={self.crop} rate={self.rate} "
                 f"batch/GPU={self.batch_per_gpu} x {world_size} GPU(s), {self.lr_name}, "
                 f"base LR {self.base_lr:g}, warm-up {self.warmup_epochs:g} epochs from "
                 f"{self.warmup_start_lr:g}; max epoch {self.input_max_epoch} -> {self.max_epoch}")
        note = self.zero_epoch_note()
        return "\n".join([title] + lines[:1] + ["-" * len(lines[0])] + lines[1:]
                         + ([f"({note})"] if note else []))


class MultigridBatchSampler(Sampler[list[ClipRequest]]):
    """Batch sampler for a stock DataLoader: yields list[ClipRequest] shaped by the plan.

    Per epoch, one permutation of range(num_samples) seeded by (seed, epoch) only. Rank r of W
    takes positions r, r+W, r+2W, ... of it (like DistributedSampler), num_samples // W each;
    batches are consecutive runs of that share, sized by the epoch's phase and the iteration's
    short-cycle position (restarting at position 0 every epoch, as PySlowFast's loader does). A
    batch that the rest of the share cannot fill ends the epoch (PySlowFast's drop_last), so every
    rank runs the same number of iterations and `dropped_in_epoch` counts what is left out.
    len() is exact (PySlowFast's estimate floor(n / mean batch) can differ from what it yields).

    Several processes: the num_samples % W samples that do not fill a round are dropped for the
    epoch, where PySlowFast's DistributedSampler pads the permutation with repeats to a multiple
    of W. With 2 processes, 1007 videos and the short cycle at 8 clips per GPU (batches 32 / 16 /
    8), PySlowFast gives each rank 504 samples, 27 batches; this sampler 503, of which 26 batches
    use 496 (7 more fall to drop_last). Dropping keeps every sample at most once per epoch and
    makes a W-process run equal to one process with W times the batch (below); the permutation
    changes every epoch, so no video is left out for long.

    DDP equivalence: iteration i of rank r covers global positions W*c + W*k + r (k < b), so the
    W ranks' batches of b together are exactly the batch of a 1-process run whose plan has
    batch_per_gpu multiplied by W (same bn_base_size, seed and num_samples). SubBatchNorm splits
    are interleaved (split j holds samples j, j+n, j+2n, ...), so with n splits per rank the
    1-process run with W*n splits normalises split W*j + r over the same samples as split j of rank
    r, e.g. W=2 ranks with 1 split each == 1 process with 2 splits. Seeds depend on the global
    position, not the rank, so the clips are identical too.
    """

    def __init__(self, num_samples: int, plan: MultigridPlan, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.num_samples, self.plan = _positive_int("num_samples", num_samples), plan
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_rank = num_samples // world_size
        for phase in plan.phases:
            if phase.shapes[0][0] > self.per_rank:
                raise ValueError(
                    f"{num_samples} samples over {world_size} process(es) leave {self.per_rank} "
                    f"per process, fewer than the first batch ({phase.shapes[0][0]}) of phase "
                    f"{phase.index} (epochs {phase.start_epoch}-{phase.end_epoch}): lower "
                    f"batch_per_gpu or use more data")
        self._sizes = {}
        self.epoch, self.start_iteration = 0, 0

    def _batch_sizes(self, epoch: int) -> list:
        """Per-rank batch size of every iteration of `epoch`."""
        phase = self.plan.phase(epoch)
        if phase.index not in self._sizes:
            sizes, used = [], 0
            while True:
                batch = phase.shapes[len(sizes) % len(phase.shapes)][0]
                if used + batch > self.per_rank:
                    break
                sizes.append(batch)
                used += batch
            self._sizes[phase.index] = sizes
        return self._sizes[phase.index]

    def iterations_in_epoch(self, epoch: int) -> int:
        """Total iterations of `epoch` (the same on every rank), for LR and progress bars."""
        return len(self._batch_sizes(epoch))

    def dropped_in_epoch(self, epoch: int) -> int:
        """Samples of `epoch` that no rank uses: num_samples % W plus each share's unfilled tail."""
        return self.num_samples - self.world_size * sum(self._batch_sizes(epoch))

    def set_epoch(self, epoch: int, start_iteration: int = 0) -> None:
        """Select the epoch to iterate and the iteration to start from (0, or k to resume)."""
        if not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        total = self.iterations_in_epoch(epoch)
        if not isinstance(start_iteration, numbers.Integral) or not 0 <= start_iteration <= total:
            raise ValueError(f"start_iteration={start_iteration!r} is outside [0, {total}] "
                             f"(iterations in epoch {epoch})")
        self.epoch, self.start_iteration = int(epoch), int(start_iteration)

    def state_dict(self, iteration: int) -> dict:
        """Position to save: `iteration` = batches of the current epoch the trainer finished.

        The trainer counts them itself because the DataLoader prefetches ahead of training.
        """
        return {"epoch": self.epoch, "iteration": iteration, "seed": self.seed,
                "num_samples": self.num_samples, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; refuses a different seed, dataset size or mid-epoch W."""
        for key in ("seed", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this run has "
                                 f"{getattr(self, key)}: resume with the same {key}")
        if state["iteration"] and state["world_size"] != self.world_size:
            raise ValueError(f"sampler state is mid-epoch ({state['epoch']}, iteration "
                             f"{state['iteration']}) with world_size={state['world_size']}, this "
                             f"run has {self.world_size}: resume from an epoch-end checkpoint")
        self.set_epoch(state["epoch"], state["iteration"])

    def __len__(self) -> int:
        """Batches the next iteration yields: from start_iteration to the end of the epoch."""
        return self.iterations_in_epoch(self.epoch) - self.start_iteration

    def __iter__(self):
        """Yield the remaining batches of the selected epoch as lists of ClipRequest."""
        return self._batches(self.epoch, self.start_iteration)

    def _batches(self, epoch: int, start: int):
        """Generator behind __iter__, bound to the epoch and start selected when it was made."""
        # Position -1 (2**64 - 1 once masked) is never a sample's: it seeds the permutation.
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        phase = self.plan.phase(epoch)
        sizes = self._batch_sizes(epoch)
        offset = sum(sizes[:start])
        for iteration in range(start, len(sizes)):
            batch, crop = phase.shapes[iteration % len(phase.shapes)]
            positions = range(offset * self.world_size + self.rank,
                              (offset + batch) * self.world_size, self.world_size)
            yield [ClipRequest(order[p], phase.frames, crop, phase.max_rate,
                               sample_seed(self.seed, epoch, p)) for p in positions]
            offset += batch


def schedule_figure(plan: MultigridPlan, *, world_size: int = 1,
                    num_samples: Optional[int] = None):
    """A matplotlib Figure of batch size, frames, crop and LR over epochs (plus iterations/epoch).

    Batch is per GPU (global when world_size > 1); the shaded bands are the short cycle's range.
    Phases of zero epochs are left out (the title says which); the legend sits above the panels,
    clear of every curve, and every axis is labelled.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    phases = plan.trained_phases
    panels = 5 if num_samples is not None else 4
    fig, axes = plt.subplots(panels, 1, figsize=(9, 2.2 * panels + 1.4), sharex=True)
    edges = [p.start_epoch for p in phases] + [plan.max_epoch]

    def steps_of(values):
        """Per-phase values repeated so that a 'post' step plot spans every phase."""
        values = list(values)
        return values + values[-1:]

    batch_label = (f"global batch\n({world_size} GPUs, clips)" if world_size > 1
                   else "batch per GPU\n(clips)")
    series = [
        (axes[0], batch_label, [p.per_gpu_batch * world_size for p in phases],
         [[b * world_size for b, _ in p.shapes] for p in phases]),
        (axes[1], "frames per clip", [p.frames for p in phases], None),
        (axes[2], "crop (pixels)", [p.crop for p in phases], [[c for _, c in p.shapes]
                                                              for p in phases]),
    ]
    for ax, label, values, cycles in series:
        ax.step(edges, steps_of(values), where="post", color="C0", lw=2, label="long cycle")
        if cycles is not None and plan.short_cycle:
            ax.fill_between(edges, steps_of(min(c) for c in cycles),
                            steps_of(max(c) for c in cycles), step="post", color="C1",
                            alpha=0.3, label="short-cycle range")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
    # The last epoch ends just before max_epoch: lr_at(max_epoch) would be an LR never used.
    grid = [min(plan.max_epoch * i / 2000, plan.max_epoch - 1e-6) for i in range(2001)]
    axes[3].plot(grid, [plan.lr_at(e) for e in grid], color="C2", label="learning rate")
    axes[3].set_yscale("log" if plan.lr_policy == "steps_with_relative_lrs" else "linear")
    axes[3].set_ylabel("learning rate")
    if num_samples is not None:
        sampler = MultigridBatchSampler(num_samples, plan, world_size=world_size)
        axes[4].step(edges, steps_of(sampler.iterations_in_epoch(p.start_epoch) for p in phases),
                     where="post", color="C3", label="iterations per epoch")
        axes[4].set_ylabel(f"iterations/epoch\n({num_samples} clips)")
    for ax in axes:
        for edge in edges[1:-1]:
            ax.axvline(edge, color="grey", lw=0.5, ls="--")
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelbottom=True)
        ax.set_xlabel("epoch", labelpad=1)
    title = (f"Multigrid ({plan.mode}): T={plan.frames}, S={plan.crop}, {plan.lr_name}, "
             f"{plan.input_max_epoch} -> {plan.max_epoch} epochs")
    note = plan.zero_epoch_note()
    fig.suptitle("\n".join([title] + textwrap.wrap(note, 95)), fontsize=10 if note else 12)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=9,
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1), h_pad=0.6)
    return fig


def plot_schedule(plan: MultigridPlan, path: str, *, world_size: int = 1,
                  num_samples: Optional[int] = None) -> None:
    """Write `schedule_figure`'s PNG to path."""
    import matplotlib.pyplot as plt
    fig = schedule_figure(plan, world_size=world_size, num_samples=num_samples)
    fig.savefig(path, dpi=110)
    plt.close(fig)


PRESETS = {
    # PySlowFast configs/Kinetics/SLOWFAST_8x8_R50_stepwise_multigrid.yaml (batch 64 on 8 GPUs).
    "slowfast-stepwise": dict(frames=32, crop=224, rate=2, batch_per_gpu=8, gpus=8, max_epoch=239,
                              steps=[0, 94, 154, 196], base_lr=0.1,
                              lr_policy="steps_with_relative_lrs", warmup_epochs=34.0,
                              warmup_start_lr=0.01),
    # PySlowFast configs/Kinetics/X3D_M.yaml (batch 128 on 8 GPUs, cosine); the long cycles are
    # placed at the stepwise config's steps scaled to 300 epochs (round(s * 300 / 239)).
    "x3d-m": dict(frames=16, crop=224, rate=5, batch_per_gpu=16, gpus=8, max_epoch=300,
                  steps=[0, 118, 193, 246], base_lr=0.1, lr_policy="cosine", warmup_epochs=35.0,
                  warmup_start_lr=0.01),
}


def main(argv=None) -> None:
    """Command line: print a plan's table and optionally write its plot."""
    parser = argparse.ArgumentParser(
        description="Print a Multigrid schedule table (and plot it). Unset options come from "
                    "--preset: 'slowfast-stepwise' is PySlowFast's stepwise multigrid config "
                    "(steps 0 94 154 196 over 239 epochs, which its long cycle turns into 13 "
                    "phases over 358 epochs), 'x3d-m' the X3D-M recipe (cosine; its long cycles "
                    "placed at the stepwise steps scaled to 300 epochs).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="slowfast-stepwise")
    parser.add_argument("--frames", type=int, help="default clip length T")
    parser.add_argument("--crop", type=int, help="default train crop S")
    parser.add_argument("--rate", type=int, help="base temporal sampling rate")
    parser.add_argument("--batch-per-gpu", type=int, help="base per-GPU batch")
    parser.add_argument("--gpus", type=int, help="number of GPUs (for global batch)")
    parser.add_argument("--max-epoch", type=int, help="epochs before Multigrid rescaling")
    parser.add_argument("--steps", type=int, nargs="+", help="LR steps / long-cycle placement")
    parser.add_argument("--base-lr", type=float, help="LR at the base batch")
    parser.add_argument("--lr-policy", choices=LR_POLICIES)
    parser.add_argument("--cosine-batch-factor", action=argparse.BooleanOptionalAction,
                        default=True, help="cosine with the long cycle: multiply the LR by the "
                        "phase's batch factor (default); --no-cosine-batch-factor gives "
                        "PySlowFast's LR, BASE_LR x cosine")
    parser.add_argument("--warmup-epochs", type=float)
    parser.add_argument("--warmup-start-lr", type=float)
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("--epoch-factor", type=float, default=1.5)
    parser.add_argument("--bn-base-size", type=int, default=8)
    parser.add_argument("--no-long-cycle", action="store_true")
    parser.add_argument("--no-short-cycle", action="store_true")
    parser.add_argument("--num-samples", type=int, help="dataset size: adds iterations/epoch")
    parser.add_argument("--plot", metavar="PNG", help="write the schedule plot here")
    args = parser.parse_args(argv)
    config = dict(PRESETS[args.preset])
    for key in config:
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    gpus = config.pop("gpus")
    try:
        plan = MultigridPlan(
            config.pop("frames"), config.pop("crop"), config.pop("rate"),
            config.pop("batch_per_gpu"), config.pop("max_epoch"), config.pop("steps"),
            config.pop("base_lr"), long_cycle=not args.no_long_cycle,
            short_cycle=not args.no_short_cycle, gamma=args.gamma, epoch_factor=args.epoch_factor,
            bn_base_size=args.bn_base_size, cosine_batch_factor=args.cosine_batch_factor,
            **config)
        print(plan.describe(world_size=gpus, num_samples=args.num_samples))
    except ValueError as error:
        sys.exit(f"error: {error}")
    if args.plot:
        plot_schedule(plan, args.plot, world_size=gpus, num_samples=args.num_samples)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
