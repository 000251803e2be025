"""Training-step benchmark: clips/s, ms/step and peak memory of one SGD step, this repo's X3D vs pytorchvideo's.

    python bench/bench_train_step.py [--versions XS S M L] [--precisions fp32 bf16] [--out FILE]
    python bench/bench_train_step.py --device cpu --quick      # smoke run, numbers meaningless

Every row is a full training step on random data made once on the device: forward (bf16 rows under
torch.autocast), cross-entropy, backward, SGD (lr 0.1, momentum 0.9, weight decay 5e-5 on all but
BN affine parameters, via x3d.parameter_groups for every model); cudnn.benchmark on; warm-up steps
(which include any compilation) are not timed; torch.cuda.synchronize before and after the timed
steps. Peak memory is torch.cuda.max_memory_allocated over the row (model, optimizer, data and
step); on CPU it is n/a and the process's max RSS is printed instead. Rows per version and precision:
pytorchvideo's create_x3d (same shape, head_activation=None so it returns logits, the baseline of
the ratio column), this repo's model plain, with channels_last_3d, and under torch.compile
(fullgraph); on request also `fast_depthwise` (x3d_kernels' CPU depthwise backward), `checkpoint`
(activation checkpointing) and `separate_bn_affine` (split BN's affine as a separate multiply and
add, PySlowFast's arithmetic: the baseline of x3d's fused one; with `--bn-splits`, as in a
Multigrid long-cycle phase). A row that cannot run says why in its note. Batches: XS 128,
S 64, M 32, L 16 at the presets' train shapes (frames x crop, or `--frames` / `--crop`); `--batch-scale`
shrinks them.

Memory-traffic floor: forward activation values per clip are counted with forward hooks (outputs of
every conv / linear, every batch norm and the ReLU / Swish after it); an unfused training step is
assumed to move `--traffic-factor` (4.5) times their bytes (docs/reference.md: 4-5x the
forward activations), 4 bytes a value in fp32 rows and 2 in bf16 rows. At `--bandwidth-gbs` (3000, an H100)
that gives the floor's clips/s; the "of floor" column is each row's share of it.
"""
import argparse
import contextlib
import gc
import importlib.util
import math
import os
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import x3d  # noqa: E402
import x3d_kernels  # noqa: E402

BATCHES = {"XS": 128, "S": 64, "M": 32, "L": 16}
QUICK = {"frames": 4, "crop": 64, "batch": 2, "iters": 2, "warmup": 1}
VARIANTS = ("pytorchvideo", "plain", "channels_last", "compile", "channels_last+compile", "checkpoint",
            "fast_depthwise", "separate_bn_affine", "fast_depthwise+separate_bn_affine")
DEFAULT_VARIANTS = ("pytorchvideo", "plain", "channels_last", "compile")
PRECISIONS = ("fp32", "bf16")
BYTES_PER_VALUE = {"fp32": 4, "bf16": 2}
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-5
N_CLASSES = 400
COLUMNS = ("version", "shape", "batch", "precision", "model", "clips/s", "ms/step", "peak GiB",
           "vs pytorchvideo", "of floor", "note")


class Unavailable(Exception):
    """A row that cannot run here; the message is the reason shown in the table."""


def load_create_x3d():
    """pytorchvideo's create_x3d; the tests' torchvision stand-in is put on sys.path only when torchvision is absent."""
    if importlib.util.find_spec("pytorchvideo") is None:
        raise Unavailable("pytorchvideo not installed")
    if importlib.util.find_spec("torchvision") is None:
        stub = os.path.join(ROOT, "tests", "_torchvision_stub")
        if stub not in sys.path:
            sys.path.append(stub)
    try:
        from pytorchvideo.models.x3d import create_x3d
    except ImportError as e:
        raise Unavailable(f"pytorchvideo does not import: {e}") from e
    return create_x3d


def compile_unavailable_reason(device, quick):
    """Why torch.compile cannot run here, or None when it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Triton not installed (inductor needs it on CUDA)"
    if quick and device.type == "cpu":
        return "not run with --quick on CPU (compiling takes minutes)"
    return None


def _separate_affine_forward(bn, x):
    """Split BN as PySlowFast computes it: normalise the sub-batches without the affine, then multiply and add."""
    if not bn.training or bn.num_splits == 1:
        return x3d.SubBatchNorm3d.forward(bn, x)
    n, c, k = x.shape[0], x.shape[1], bn.num_splits
    mean, var = bn.stat_buffers()
    y = F.batch_norm(x.reshape(n // k, c * k, *x.shape[2:]), mean, var, None, None, True, bn.momentum, bn.eps)
    bn.aggregate()
    return y.reshape(x.shape) * bn.weight.view(-1, 1, 1, 1) + bn.bias.view(-1, 1, 1, 1)


def build_model(variant, version, frames, crop, device, dropout=0.5, quick=False, bn_splits=1):
    """(model to call, module that owns the parameters, memory format of its input) for one table row.

    Raises Unavailable with the reason when the variant cannot run on this machine.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose from {VARIANTS}")
    if variant == "pytorchvideo":
        if bn_splits > 1:
            raise Unavailable("pytorchvideo's X3D has no split batch norm")
        p = x3d.PRESETS[version]
        module = load_create_x3d()(input_clip_length=frames, input_crop_size=crop, model_num_class=N_CLASSES,
                                   dropout_rate=dropout, depth_factor=p.depth_factor, width_factor=p.width_factor,
                                   head_activation=None)
    else:
        module = x3d.generate_model(version, n_classes=N_CLASSES, dropout=dropout, base_bn_splits=bn_splits)
        module.set_activation_checkpointing(variant == "checkpoint")
        if "fast_depthwise" in variant:
            if device.type != "cpu":
                raise Unavailable("x3d_kernels' depthwise backward is a CPU path")
            x3d_kernels.use_fast_depthwise(module)
        if "separate_bn_affine" in variant:
            for bn in module.modules():
                if isinstance(bn, x3d.SubBatchNorm3d):
                    bn.forward = _separate_affine_forward.__get__(bn)
    module = module.to(device).train()
    memory_format = torch.contiguous_format
    if "channels_last" in variant:
        memory_format = torch.channels_last_3d
        module = module.to(memory_format=memory_format)
    model = module
    if "compile" in variant:
        reason = compile_unavailable_reason(device, quick)
        if reason:
            raise Unavailable(reason)
        model = torch.compile(module, fullgraph=True)
    return model, module, memory_format


def random_batch(batch, frames, crop, device, memory_format=torch.contiguous_format, seed=0):
    """Random clips (batch, 3, frames, crop, crop) float32 in memory_format and int64 labels (batch,), made on device."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, 3, frames, crop, crop, generator=g, device=device).contiguous(memory_format=memory_format)
    return x, torch.randint(0, N_CLASSES, (batch,), generator=g, device=device)


def _autocast(device, precision):
    """The autocast context of a precision: bf16 autocast, or nothing for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def forward_backward(model, x, y, precision):
    """One forward (autocast in bf16) and backward of the cross-entropy; returns (logits, loss), both detached."""
    with _autocast(x.device, precision):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    return logits.detach(), loss.detach()


def make_step(model, module, x, y, precision):
    """A function running one full SGD training step (zero grad, forward, loss, backward, update)."""
    optimizer = torch.optim.SGD(x3d.parameter_groups(module, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM)

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, x, y, precision)
        optimizer.step()

    return step


def _sync(device):
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, iters, warmup, device):
    """Seconds per step over iters timed steps, after warmup untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - started) / iters


def _release(device):
    """Free what the previous row left: Python garbage, compiled graphs, cached CUDA blocks."""
    gc.collect()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(variant, version, frames, crop, batch, precision, device, iters, warmup, quick=False, bn_splits=1):
    """(clips/s, ms/step, peak GiB or None on CPU) of one row; Unavailable when it cannot run here."""
    _release(device)
    try:
        model, module, memory_format = build_model(variant, version, frames, crop, device, quick=quick,
                                                   bn_splits=bn_splits)
        x, y = random_batch(batch, frames, crop, device, memory_format)
        seconds = time_steps(make_step(model, module, x, y, precision), iters, warmup, device)
    except torch.cuda.OutOfMemoryError as e:
        raise Unavailable(f"out of memory at batch {batch}") from e
    except Unavailable:
        raise
    except Exception as e:  # a failing option (compile error, missing kernel) must not stop the other rows
        message = str(e).strip().splitlines()
        raise Unavailable(f"failed: {type(e).__name__}: {message[0][:160] if message else ''}") from e
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return batch / seconds, seconds * 1e3, peak


def activation_values(version, frames, crop):
    """Forward activation values of one clip: outputs of every conv / linear, batch norm and the activation after it.

    Counted with forward hooks on this repo's model (on the meta device). Every batch norm except
    the projection shortcut's is followed by a ReLU or Swish of its size (the last BN of a block
    through the residual ReLU), so those BN outputs count twice. X3D-M 16x224: 251.8 M values;
    docs/reference.md's 260 M counted pytorchvideo's leaf modules, which adds 9.8 M Identity outputs.
    """
    with torch.device("meta"):
        model = x3d.generate_model(version).train()
    shortcut_bns = {id(m.shortcut_bn) for m in model.modules() if isinstance(m, x3d.X3DBlock) and m.shortcut is not None}
    total = [0]

    def count(weight):
        def hook(module, inputs, output):
            total[0] += weight * output.numel()
        return hook

    for m in model.modules():
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            m.register_forward_hook(count(1))
        elif isinstance(m, x3d.SubBatchNorm3d):
            m.register_forward_hook(count(1 if id(m) in shortcut_bns else 2))
    with torch.no_grad():
        model(torch.empty(1, 3, frames, crop, crop, device="meta"))
    return total[0]


def floor_clips_per_s(values, precision, bandwidth_gbs, traffic_factor):
    """Clips/s if a step moved only traffic_factor x the forward activation bytes at bandwidth_gbs GB/s."""
    return bandwidth_gbs * 1e9 / (traffic_factor * values * BYTES_PER_VALUE[precision])


def copy_bandwidth_gbs(device, mib=1024, repeats=10):
    """Measured device copy bandwidth (GB/s, read + write) of a mib MiB tensor copy; None on CPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(mib * 2 ** 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - started
    del src, dst
    return 2 * mib * 2 ** 20 * repeats / seconds / 1e9


def format_table(rows, columns=COLUMNS):
    """Markdown table of rows (dicts of strings keyed by columns), columns padded to equal width."""
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = [[c for c in columns], ["-" * widths[c] for c in columns]] + [[r[c] for c in columns] for r in rows]
    return "\n".join("| " + " | ".join(cell.ljust(widths[c]) for cell, c in zip(line, columns)) + " |"
                     for line in lines)


def bench(args, device):
    """(table rows, floor lines) for every version, precision and variant asked for."""
    rows, floors = [], []
    for version in args.versions:
        p = x3d.PRESETS[version]
        frames, crop = (QUICK["frames"], QUICK["crop"]) if args.quick else (p.frames, p.train_crop)
        frames, crop = args.frames or frames, args.crop or crop
        batch = QUICK["batch"] if args.quick else max(1, round(BATCHES[version] * args.batch_scale))
        values = activation_values(version, frames, crop)
        floor = {pr: floor_clips_per_s(values, pr, args.bandwidth_gbs, args.traffic_factor) for pr in args.precisions}
        floors.append(f"X3D-{version} {frames}x{crop}: {values / 1e6:.1f} M activation values per clip -> "
                      + ", ".join(f"{pr} {args.traffic_factor * values * BYTES_PER_VALUE[pr] / 1e9:.2f} GB "
                                  f"moved per clip per step, floor {floor[pr]:.0f} clips/s" for pr in args.precisions))
        for precision in args.precisions:
            baseline = None
            for variant in args.variants:
                row = dict(version=version, shape=f"{frames}x{crop}", batch=str(batch), precision=precision,
                           model=variant, note="")
                try:
                    clips, ms, peak = measure(variant, version, frames, crop, batch, precision, device,
                                              args.iters, args.warmup, args.quick, args.bn_splits)
                except Unavailable as e:
                    row.update({"clips/s": "-", "ms/step": "-", "peak GiB": "-", "vs pytorchvideo": "-",
                                "of floor": "-", "note": f"skipped: {e}"})
                    print(f"X3D-{version} {precision} {variant}: skipped: {e}", file=sys.stderr, flush=True)
                    rows.append(row)
                    continue
                if variant == "pytorchvideo":
                    baseline = clips
                row.update({"clips/s": significant(clips), "ms/step": significant(ms),
                            "peak GiB": "n/a" if peak is None else f"{peak:.2f}",
                            "vs pytorchvideo": "n/a" if baseline is None else f"{clips / baseline:.2f}x",
                            "of floor": f"{100 * clips / floor[precision]:.3g}%"})
                print(f"X3D-{version} {precision} {variant}: {clips:.1f} clips/s", file=sys.stderr, flush=True)
                rows.append(row)
    return rows, floors


def significant(value, digits=3):
    """`value` with at least `digits` significant digits and one decimal, never in exponent form, so a
    ratio of two printed rates is as exact as the printed ratio (CPU rates are a few clips/s)."""
    decimals = max(1, digits - 1 - math.floor(math.log10(value))) if value > 0 else 1
    return f"{value:.{decimals}f}"


def _setup_line(args, device):
    """What the run measured on: device, software, fp32 math flags and memory note."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        measured = copy_bandwidth_gbs(device)
        where = (f"{name}; measured copy bandwidth {measured:.0f} GB/s, floor computed at {args.bandwidth_gbs:g} GB/s; "
                 f"cudnn.benchmark on, TF32 convolutions {torch.backends.cudnn.allow_tf32}, "
                 f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        where = (f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), peak memory n/a per row, "
                 f"process max RSS {rss:.0f} MiB; floor computed at {args.bandwidth_gbs:g} GB/s")
    splits = f"; {args.bn_splits} BN splits in this repo's rows" if args.bn_splits > 1 else ""
    return (f"{where}{splits}; {args.iters} timed steps after {args.warmup} warm-up; traffic factor {args.traffic_factor:g}x "
            f"forward activations; torch {torch.__version__}, Python {sys.version.split()[0]}"
            + ("; --quick: tiny shapes, numbers meaningless" if args.quick else ""))


def parse_args(argv=None):
    """Command-line options; quick mode fills in iters / warm-up / versions not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", choices=sorted(BATCHES), help="X3D versions (default XS S M L; quick XS)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                        help="rows per version and precision (pytorchvideo is the ratio's baseline)")
    parser.add_argument("--iters", type=int, help="timed steps per row (default 20; quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them, compilation included (default 5; quick 1)")
    parser.add_argument("--batch-scale", type=float, default=1.0, help="multiply the batches (XS 128, S 64, M 32, L 16)")
    parser.add_argument("--frames", type=int, default=0, help="clip frames instead of the preset's (e.g. a Multigrid phase); 0: the preset's")
    parser.add_argument("--crop", type=int, default=0, help="crop instead of the preset's; 0: the preset's")
    parser.add_argument("--bn-splits", type=int, default=1,
                        help="BN splits of this repo's rows (a long-cycle phase's: batch / 8); must divide the batch")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes for a smoke test: {QUICK}")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; cpu with --quick for a smoke run)")
    parser.add_argument("--bandwidth-gbs", type=float, default=3000.0, help="card memory bandwidth in GB/s for the floor")
    parser.add_argument("--traffic-factor", type=float, default=4.5,
                        help="bytes a step moves, in units of the forward activation bytes (docs/reference.md: 4-5)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 rows for matmuls as well as convolutions")
    parser.add_argument("--out", default="bench_train_step_table.md", help="file the table is written to (markdown)")
    args = parser.parse_args(argv)
    args.versions = args.versions or (["XS"] if args.quick else list(BATCHES))
    for name, default in (("iters", 20), ("warmup", 5)):
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else default)
    for name, value, low in (("--iters", args.iters, 1), ("--warmup", args.warmup, 0), ("--frames", args.frames, 0),
                             ("--crop", args.crop, 0), ("--bn-splits", args.bn_splits, 1)):
        if value < low:
            parser.error(f"{name} must be at least {low}, got {value}")
    for name in ("batch_scale", "bandwidth_gbs", "traffic_factor"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device}: {e}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu --quick for a smoke run")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: only cuda and cpu are supported")
    return args


def main(argv=None):
    """Run the benchmark, print the table and the floor estimate, write both to --out."""
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    rows, floors = bench(args, device)
    text = (f"{format_table(rows)}\n\nMemory-traffic floor ({args.traffic_factor:g}x the forward activation bytes "
            f"per step at {args.bandwidth_gbs:g} GB/s):\n" + "\n".join(f"- {line}" for line in floors)
            + f"\n\n{_setup_line(args, device)}\n")
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
