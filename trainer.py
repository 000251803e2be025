"""What the three X3D training scripts share: config, processes, the Multigrid loop, checkpoints, logs.

A script (train_x3d_kinetics_multigrid.py, ...) defines its constants at the top and a `Task` (how
to build its datasets, its loss and its metrics) and calls `main(task, constants)`. Everything else
lives here:

- config: every UPPERCASE constant becomes a command-line flag (`--batch-size 64`, `-gpu 0,1`);
  the X3D preset fills unset shapes (`fill_preset`), `--demo` settings apply where no flag was given;
- processes: one process per GPU (NCCL) launched from `-gpu`, several CPU processes (gloo) from
  `--cpu-processes`, or whatever `torchrun` set up across nodes;
- the loop: a `multigrid.MultigridPlan` decides every batch's shape and the learning rate; the
  trainer only reacts to a long-cycle phase change by setting the BN splits (statistics are kept);
- checkpoints: written atomically and checksummed (checkpoints.py) every N iterations and epochs,
  plus `last` and `best`; a run restarted in the same folder resumes model, optimizer, scaler, LR
  position, Multigrid phase, RNG states, sampler position and counters from the newest intact
  one, so a killed run ends with the same weights;
- evaluation: precise BN, clip-level validation, multi-view test, per-video predictions;
- logs: `logs/<run>/` holds config.json, log.txt, metrics.jsonl, PNG plots and checkpoints.
"""
import argparse
import contextlib
import dataclasses
import datetime
import errno
import itertools
import json
import os
import random
import re
import socket
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import checkpoints
import multigrid
import transforms
import video_io
import x3d
import x3d_kernels
from progress import Progress

# training_curves.png is redrawn after an epoch only when this many seconds passed since the last
# drawing, and always at the end: a drawing costs about 0.3 s, and an epoch of an early Multigrid
# phase can take less than that.
PLOT_INTERVAL_S = 60.0


class SetupError(Exception):
    """A configuration, input or run-folder problem: printed as one message, exit 2."""


# ----------------------------------------------------------------------------------------- config

def _flag(name: str) -> str:
    return "--" + name.lower().replace("_", "-")


def _parse_list(text: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    for cast in (int, float):
        try:
            return [cast(t) for t in items]
        except ValueError:
            pass
    return items


def constants_of(namespace: dict, exclude=()) -> dict:
    """The UPPERCASE settings (bool, number, string or list) of a script, in definition order."""
    return {k: v for k, v in namespace.items()
            if k.isupper() and k not in exclude and isinstance(v, (bool, int, float, str, list, tuple))}


def _constant_comments(path: str | None = None) -> dict:
    """NAME -> the comment on its `NAME = value  # comment` line in `path` (default: the running script)."""
    path = path or getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        pairs = (re.match(r"([A-Z][A-Z0-9_]*) = .*?#\s*(.+)$", line) for line in f)
        return {m.group(1): m.group(2).strip() for m in pairs if m}


class _Parser(argparse.ArgumentParser):
    """argparse that answers a bad command line with one line (and a "did you mean"), not the usage."""

    def error(self, message: str):
        """Print `error: ...` with the closest flag for an unknown one; exit 2."""
        import difflib
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            word = unknown.group(1).split("=")[0]
            flags = [f for f in self._option_string_actions if f.startswith("--")]
            close = ([f for f in flags if f.startswith(word)] if len(word) > 3 else [])[:1] \
                or difflib.get_close_matches(word, flags, n=1, cutoff=0.6)
            message = (f"unknown {'flag' if word.startswith('-') else 'argument'} {word}"
                       + (f": did you mean {close[0]}?" if close else ""))
        message += f" ({self.prog} --help lists every flag)"
        self.exit(2, f"error: {message}\n")


def build_parser(constants: dict, description: str = "", comments: dict | None = None):
    """The command line of a script: one flag per constant, its comment as help, its value as default."""
    parser = _Parser(description=description, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = _constant_comments() if comments is None else comments
    for name, value in constants.items():
        flags = [_flag(name)] + (["-gpu"] if name == "GPU" else [])
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        text = f"{comments.get(name, '')} (default: {shown!r})".strip()
        if isinstance(value, bool):
            parser.add_argument(*flags, default=value, action=argparse.BooleanOptionalAction,
                                help=text)
        elif isinstance(value, (list, tuple)):
            parser.add_argument(*flags, default=list(value), type=_parse_list,
                                metavar="A,B,..", help=text)
        elif isinstance(value, (int, float)):
            parser.add_argument(*flags, default=value, type=type(value), help=text)
        else:
            parser.add_argument(*flags, default=value, type=str, help=text)
    return parser


def parse_config(constants: dict, argv=None, description: str = "") -> argparse.Namespace:
    """Turn a script's UPPERCASE constants into command-line flags with those defaults; parse argv.

    `cfg.explicit` lists the settings given on the command line (abbreviated flags are refused, so
    every given flag is known by its full name).
    """
    parser = build_parser(constants, description)
    cfg = parser.parse_args(argv)
    given = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("-")]
    actions = parser._option_string_actions
    cfg.explicit = sorted({actions[a].dest for a in given if a in actions})
    return cfg


def parse_gpus(spec: str) -> list[int]:
    """`"0,1,3"` -> [0, 1, 3]; empty -> [] (CPU). Names a missing GPU in a SetupError."""
    spec = (spec or "").strip()
    if not spec:
        return []
    try:
        gpus = [int(g) for g in spec.split(",") if g.strip()]
    except ValueError:
        raise SetupError(f"-gpu {spec!r}: expected comma-separated GPU numbers such as 0,1,2,3 "
                         "(or nothing for CPU)") from None
    available = torch.cuda.device_count()
    missing = [g for g in gpus if g < 0 or g >= available]
    if missing:
        raise SetupError(f"-gpu {spec}: GPU {missing[0]} does not exist on this machine "
                         f"(torch.cuda.device_count() = {available}); "
                         + ("omit -gpu to train on the CPU" if available == 0
                            else f"use GPUs 0..{available - 1}"))
    if len(set(gpus)) != len(gpus):
        raise SetupError(f"-gpu {spec}: a GPU is listed twice")
    return gpus


# Flag value rules: (settings, test, what the value must be). Only the settings a script has apply.
_VALUE_RULES = (
    (("batch_size", "lr_reference_batch", "max_epoch", "log_period", "bn_base_size",
      "test_temporal_views", "test_batch", "cpu_processes"),
     lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
    (("workers", "threads", "frames", "rate", "crop", "test_crop", "eval_period",
      "checkpoint_period", "checkpoint_iters", "precise_bn_batches"),
     lambda v: isinstance(v, int) and v >= 0, "a whole number >= 0"),
    (("base_lr", "target_fps", "fps", "epoch_factor", "gamma"),
     lambda v: v > 0, "a number > 0"),
    (("warmup_epochs", "warmup_start_lr", "weight_decay", "bn_weight_decay", "momentum"),
     lambda v: v >= 0, "a number >= 0"),
    (("dropout",), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    (("short_side",), lambda v: len(v) == 0 or (len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)
                                                and v[0] <= v[1]), "empty or MIN,MAX whole numbers with MIN <= MAX"),
    (("steps",), lambda v: len(v) > 0 and all(isinstance(x, (int, float)) for x in v),
     "a comma-separated list of epochs such as 0,41,49"),
)
_CHOICES = {"precision": ("fp32", "bf16", "fp16"), "x3d_version": tuple(x3d.PRESETS),
            "lr_policy": multigrid.LR_POLICIES, "test_spatial_views": (1, 3)}


def check_flag_values(cfg) -> None:
    """SetupError naming the first flag whose value is outside what it allows (before any folder is made)."""
    values = vars(cfg)
    for name, choices in _CHOICES.items():
        if name in values and values[name] not in choices:
            raise SetupError(f"{_flag(name)} {values[name]!r}: choose one of "
                             f"{', '.join(map(str, choices))}")
    for names, ok, what in _VALUE_RULES:
        for name in names:
            if name in values and not ok(values[name]):
                shown = ",".join(map(str, values[name])) if isinstance(values[name], list) else values[name]
                raise SetupError(f"{_flag(name)} {shown}: must be {what}")


# -------------------------------------------------------------------------------------- processes

@dataclasses.dataclass
class Dist:
    """This process's place in the job: rank, world size and device."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """True on the process that logs, plots and writes checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op alone)."""
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a list of numbers over all ranks."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_entry(local_rank: int, fn: Callable, cfg, gpus: list[int], port: int, nprocs: int):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    backend = "nccl" if gpus else "gloo"
    if gpus:
        torch.cuda.set_device(gpus[local_rank])
    dist.init_process_group(backend, rank=local_rank, world_size=nprocs,
                            timeout=datetime.timedelta(minutes=30))
    device = torch.device("cuda", gpus[local_rank]) if gpus else torch.device("cpu")
    try:
        fn(cfg, Dist(local_rank, nprocs, device))
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, cfg) -> None:
    """Run `fn(cfg, Dist)` in one process, one process per GPU, N CPU processes, or under torchrun."""
    gpus = parse_gpus(cfg.gpu)
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local = int(os.environ["LOCAL_RANK"])
        if gpus and local >= len(gpus):
            raise SetupError(f"torchrun started local rank {local} but -gpu lists only {gpus}")
        use_cuda = torch.cuda.is_available() and (bool(gpus) or not cfg.gpu)
        if use_cuda:
            device = torch.device("cuda", gpus[local] if gpus else local)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
        try:
            fn(cfg, Dist(dist.get_rank(), dist.get_world_size(), device))
        finally:
            dist.destroy_process_group()
        return
    nprocs = len(gpus) if gpus else max(1, cfg.cpu_processes)
    if nprocs == 1:
        device = torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")
        if gpus:
            torch.cuda.set_device(device)
        fn(cfg, Dist(0, 1, device))
        return
    torch.multiprocessing.spawn(_process_entry, args=(fn, cfg, gpus, _free_port(), nprocs),
                                nprocs=nprocs, join=True)


# ------------------------------------------------------------------------------------ run folder

def read_metrics(run_dir: str) -> list[dict]:
    """Every record of a run folder's metrics.jsonl ([] before the first one is written).

    A last line cut short (a full disk during the append) is left out: resume rewrites the file.
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    return [json.loads(line) for line in lines]


class RunLog:
    """The run folder: plain-text log, JSON-lines metrics, TensorBoard events and PNG plots (rank 0).

    With `create=False` nothing is written until `open()`: lines logged before go to the terminal
    and reach log.txt then, so a run refused during its checks leaves no folder behind.
    """

    def __init__(self, run_dir: str, active: bool, create: bool = True, subdirs=("checkpoints",)):
        self.dir = run_dir
        self.active = active
        self.tb = None
        self.bar = None
        self._subdirs = tuple(subdirs)
        self._text = None
        self._pending = []
        if active and create:
            self.open()

    def open(self) -> None:
        """Make the run folder, write the lines logged so far to log.txt and start TensorBoard."""
        if not self.active or self._text is not None:
            return
        for sub in ("",) + self._subdirs:
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self._text = open(os.path.join(self.dir, "log.txt"), "a", buffering=1)
        self._text.writelines(self._pending)
        self._pending = []
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(self.dir, "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def __call__(self, message: str) -> None:
        """Log one line (rank 0 only): to the terminal and to log.txt."""
        if not self.active:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        if self._text is None:
            self._pending.append(line + "\n")
        else:
            self._text.write(line + "\n")

    def metric(self, record: dict) -> None:
        """Append one record, stamped with its wall-clock `time` (Unix s), to metrics.jsonl (and TensorBoard)."""
        if not self.active:
            return
        record = {**record, "time": round(time.time(), 4)}
        with open(os.path.join(self.dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch", "time"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def records(self) -> list[dict]:
        """Every record in metrics.jsonl."""
        return read_metrics(self.dir)

    def truncate_after(self, step: int) -> None:
        """Drop records written after `step` by a run that was killed (they are replayed on resume)."""
        if not self.active:
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        _atomic_write_text(os.path.join(self.dir, "metrics.jsonl"),
                           "".join(json.dumps(r) + "\n" for r in kept))

    def plot(self) -> None:
        """Write training_curves.png: loss, learning rate, Multigrid shape and evaluation metrics.

        The x axis counts epochs done, as multigrid.plot_schedule does: a phase that starts at
        epoch 14 steps at 14 in both pictures, and a log line's loss and LR span its iterations.
        """
        if not self.active:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter
        recs = self.records()
        train = [r for r in recs if r.get("kind") == "train"]
        phases = [r for r in recs if r.get("kind") == "phase"]
        evals = [r for r in recs if r.get("kind") in ("val", "test")]
        if not train:
            return
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        epochs = [r["epoch_float"] for r in train]
        # A record covers the iterations of its log line, which end at its epoch_float: its mean
        # loss (and its LR) is drawn over that span, from the record before it (the first one from
        # the epoch training started at).
        start = [phases[0]["epoch"]] if phases and phases[0]["epoch"] < epochs[0] else []
        for ax, key in ((axes[0, 0], "loss"), (axes[0, 1], "lr")):
            values = [r[key] for r in train]
            ax.step(start + epochs, values[:len(start)] + values, where="pre")
        axes[0, 0].set(title="training loss", xlabel="epoch",
                       ylabel="loss (mean over the iterations of a log line)")
        axes[0, 1].set(title="learning rate (of the last iteration of a log line)", xlabel="epoch",
                       ylabel="learning rate")
        ax = axes[1, 0]
        edges = [p["epoch"] for p in phases] + [max(epochs[-1], phases[-1]["epoch"] if phases else 0)]
        ticks = set()
        for key, label in (("per_gpu_batch", "batch per GPU (clips)"),
                           ("frames", "frames per clip"), ("crop", "crop (pixels)")):
            values = [p[key] for p in phases]
            ticks.update(values)
            if values:
                ax.step(edges, values + values[-1:], where="post", label=label)
        ax.set(title="Multigrid long-cycle shape", xlabel="epoch", yscale="log",
               ylabel="value (log scale)")
        kept = []  # the values drawn, as ticks; one of two closer than 20% would overlap its label
        for value in sorted(ticks):
            if not kept or value >= 1.2 * kept[-1]:
                kept.append(value)
        ax.yaxis.set_major_locator(FixedLocator(kept))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=8)
        ax = axes[1, 1]
        primary = evals[0]["primary"] if evals else ""
        for kind in ("val", "test"):
            pts = [(r["epoch"], r[r["primary"]]) for r in evals if r["kind"] == kind]
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"{kind} {primary}")
        unit = {"top1": "top-1 accuracy (%)", "mAP": "mAP (0-1)"}.get(primary, primary)
        ax.set(title="evaluation (val: 1 centre clip per video; test: all views)",
               xlabel="epoch", ylabel=unit)
        if evals:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(self.dir, "training_curves.png"), dpi=90)
        plt.close(fig)

    def close(self) -> None:
        """Flush and close the files."""
        if self.active and self._text is not None:
            self._text.close()
            if self.tb is not None:
                self.tb.close()


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:  # e.g. a full disk: leave no partial file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(path: str, state: dict, copies=()) -> None:
    """checkpoints.save (atomic, checksummed, never non-finite, the same state also to `copies`); a failed
    write is a one-line SetupError."""
    try:
        checkpoints.save(path, state, copies)
    except checkpoints.WriteFailed as e:
        raise SetupError(str(e)) from None


def rng_state() -> dict:
    """Every RNG the training step consumes: python, numpy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The X3D inside a torch.compile and / or DistributedDataParallel wrapper."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def param_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of every parameter's bytes: equal on all ranks when DDP kept them in sync."""
    import hashlib
    h = hashlib.sha1()
    for p in unwrap(model).parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def average_bn_buffers(model: torch.nn.Module, d: Dist) -> None:
    """Make every rank hold the mean BN running statistics (DDP runs without buffer broadcast)."""
    if d.world == 1:
        return
    for name, buf in unwrap(model).named_buffers():
        if buf.is_floating_point() and ("running_mean" in name or "running_var" in name):
            dist.all_reduce(buf)
            buf.div_(d.world)


# ------------------------------------------------------------------------------------ evaluation

def to_input(clips: torch.Tensor, d: Dist, cfg) -> torch.Tensor:
    """uint8 clips from a worker -> normalised float on the training device (channels_last_3d)."""
    x = transforms.normalize(clips.to(d.device, non_blocking=True))
    if cfg.channels_last and x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def autocast(cfg, d: Dist):
    """The autocast context of cfg.precision (a no-op for fp32)."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=d.device.type, dtype=dtype)


def _format(metrics: dict) -> str:
    """'top1 83.33, videos 60' or 'mAP 0.8742': percentages with 2 decimals, mAPs (0-1) with 4."""
    def number(k, v):
        if not isinstance(v, float):
            return f"{k} {v}"
        return f"{k} {v:.4f}" if k.lower().endswith("map") else f"{k} {v:.2f}"
    return ", ".join(number(k, v) for k, v in metrics.items())


def _shard(n: int, d: Dist) -> list[int]:
    return list(range(d.rank, n, d.world))


@torch.no_grad()
def predict_clips(model, dataset, cfg, d: Dist, batch_size: int, what: str = "validation"):
    """Clip-level predictions over `dataset` (sharded over ranks): (indices, scores, targets) on every rank."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=_shard(len(dataset), d),
                        num_workers=cfg.workers, pin_memory=d.device.type == "cuda")
    model.eval()
    indices, scores, targets = [], [], []
    progress = Progress(len(loader), what, unit="batches", active=d.main)
    with autocast(cfg, d):
        for clips, target, index, _failures in loader:
            scores.append(unwrap(model).predict(to_input(clips, d, cfg)).float().cpu())
            targets.append(target)
            indices.append(index)
            progress.update()
    progress.close()
    parts = d.gather((torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
                      torch.cat(scores) if scores else None, torch.cat(targets) if targets else None))
    parts = [p for p in parts if p[1] is not None]
    order = torch.cat([p[0] for p in parts]).argsort()
    return (torch.cat([p[0] for p in parts])[order], torch.cat([p[1] for p in parts])[order],
            torch.cat([p[2] for p in parts])[order])


@torch.no_grad()
def predict_views(model, dataset, collate, cfg, d: Dist, aggregate: str = "mean"):
    """Multi-view test: per video, `aggregate` ('mean' or 'max') over its views of `model.predict`.

    Returns (indices, scores, labels, failed) on every rank; `failed` lists the videos that could
    not be decoded and were left out (reported by name in the log by the caller).
    """
    loader = DataLoader(dataset, batch_size=cfg.test_batch, sampler=_shard(len(dataset), d),
                        num_workers=cfg.workers, collate_fn=collate,
                        pin_memory=d.device.type == "cuda")
    model.eval()
    net = unwrap(model)
    indices, scores, labels, failed = [], [], [], []
    progress = Progress(len(loader), "multi-view test", unit="batches", active=d.main)
    with autocast(cfg, d):
        for views, label, index, bad in loader:
            progress.update()
            failed.extend(int(i) for i in bad)
            if views is None or len(index) == 0:
                continue
            b, v = views.shape[:2]
            flat = views.reshape(b * v, *views.shape[2:])
            out = torch.cat([net.predict(to_input(flat[i:i + cfg.test_batch * 3], d, cfg)).float()
                             for i in range(0, b * v, cfg.test_batch * 3)])
            out = out.reshape(b, v, *out.shape[1:])
            scores.append((out.mean(1) if aggregate == "mean" else out.amax(1)).cpu())
            labels.append(label)
            indices.append(index)
    progress.close()
    parts = d.gather((indices, scores, labels, failed))
    idx = torch.cat([i for p in parts for i in p[0]]) if any(p[0] for p in parts) else torch.zeros(0, dtype=torch.long)
    if len(idx) == 0:
        raise RuntimeError("multi-view test: no video could be decoded; see the log for the failures")
    order = idx.argsort()
    return (idx[order], torch.cat([s for p in parts for s in p[1]])[order],
            torch.cat([l for p in parts for l in p[2]])[order], sorted(f for p in parts for f in p[3]))


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """top-1, top-5 and mean class accuracy (percent) of single-label scores (N, C)."""
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hit1 = top[:, 0] == labels
    classes = labels.unique()
    per_class = torch.stack([hit1[labels == c].float().mean() for c in classes])
    return {"top1": 100.0 * hit1.float().mean().item(),
            "top5": 100.0 * (top == labels[:, None]).any(1).float().mean().item(),
            "mean_class_acc": 100.0 * per_class.mean().item(), "videos": len(labels)}


# ----------------------------------------------------------------------------------------- task

def fill_preset(cfg) -> None:
    """Replace 0 / empty shape settings (frames, rate, crops, short side) with the X3D preset's."""
    if cfg.x3d_version not in x3d.PRESETS:
        raise SetupError(f"--x3d-version {cfg.x3d_version!r}: choose one of {', '.join(x3d.PRESETS)}")
    p = x3d.PRESETS[cfg.x3d_version]
    cfg.frames = cfg.frames or p.frames
    cfg.rate = cfg.rate or p.rate
    cfg.crop = cfg.crop or p.train_crop
    cfg.test_crop = cfg.test_crop or p.test_crop
    cfg.short_side = list(cfg.short_side) or list(p.train_short_side)


def num_classes(dataset) -> int:
    """Classes of a dataset with a `num_classes` attribute (Kinetics and Charades datasets)."""
    return dataset.num_classes


@contextlib.contextmanager
def setup_errors(hint: str = ""):
    """Turn a ValueError / FileNotFoundError raised inside into a SetupError (message + hint)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise SetupError(f"{e}{hint}") from None


@dataclasses.dataclass
class Task:
    """What differs between Kinetics, Charades classification and Charades localization."""
    name: str
    build_datasets: Callable  # (cfg, log, test_only) -> (train, val, test); test may be None
    loss: Callable  # (logits, targets) -> scalar loss
    val_metrics: Callable  # (scores, targets) -> dict, incl. the primary key
    test: Callable  # (model, test_dataset, cfg, Dist, log, run_dir) -> dict of results (rank 0)
    primary: str  # metric that decides `best`
    n_classes: Callable = num_classes  # (train dataset) -> int
    model_task: str = "class"
    multi_label: bool = False
    demo: Callable | None = None  # (cfg) -> None: make the demo dataset and point cfg at it
    predict: Callable | None = None  # (cfg) -> None: `--predict FILE`, print the top classes
    data_paths: tuple = ()  # path settings, in the order of their flags: checked before training
    test_data: tuple = ()  # the path settings of the test data: checked for --eval-only, taken from a checkpoint


# What `--eval-only` and `--predict` take from the run config a checkpoint carries when the flag is
# not given: the network, how its clips are cut (frames, rate, crops, views, frame rate) and where
# its run folder is; plus the task's `test_data` paths.
CHECKPOINT_SETTINGS = ("x3d_version", "frames", "rate", "crop", "test_crop", "short_side",
                       "target_fps", "fps", "inverse_uniform", "test_temporal_views",
                       "test_spatial_views", "frame_map_stride", "log_dir", "run_name")


def adopt_checkpoint_settings(cfg, task: Task) -> None:
    """`--eval-only` / `--predict`: settings not given as flags come from the checkpoint's run.

    Sets `cfg.from_checkpoint` (the names taken) and `cfg.class_names` (the checkpoint's
    "class_names", or None). Checkpoints without a run config (FAIR, pytorchvideo, x3d-multigrid)
    give only what they hold: nothing but the weights, or the X3D version.
    """
    if not os.path.isfile(cfg.checkpoint):
        raise SetupError(f"--checkpoint {cfg.checkpoint}: no such file")
    try:
        ckpt, _ = x3d._load_file(cfg.checkpoint)  # the loader x3d.load_pretrained uses
    except ValueError as e:
        raise SetupError(f"--checkpoint {e}") from None
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    saved = dict(ckpt.get("config") or {})
    if "x3d_version" in ckpt:
        saved["x3d_version"] = ckpt["x3d_version"]
    cfg.from_checkpoint = [n for n in CHECKPOINT_SETTINGS + tuple(task.test_data)
                           if n in saved and hasattr(cfg, n) and n not in cfg.explicit
                           and getattr(cfg, n) != saved[n]]
    for name in cfg.from_checkpoint:
        setattr(cfg, name, saved[name])
    cfg.class_names = ckpt.get("class_names")  # test labels map onto these names


def describe_adopted(cfg) -> str:
    """One line naming the settings taken from the checkpoint ('' when none)."""
    taken = getattr(cfg, "from_checkpoint", [])
    if not taken:
        return ""
    values = ", ".join(f"{_flag(n)} {_shown(getattr(cfg, n))}" for n in taken)
    return f"from {cfg.checkpoint} (flags given on the command line win): {values}"


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_paths(cfg, names) -> None:
    """A SetupError for the first of `names` (checked in this order) whose path does not exist.

    The message names the flag, and whether the value was given, came from --checkpoint or is the
    script's default, and says what to do.
    """
    for name in names:
        path = getattr(cfg, name)
        if not path or os.path.exists(path):
            continue
        flag = _flag(name)
        if name in cfg.explicit:
            origin = f"{flag} {path}"
        elif name in getattr(cfg, "from_checkpoint", ()):
            origin = f"{flag} {path} (from --checkpoint {cfg.checkpoint})"
        else:
            origin = f"{flag} {path} (the default, {name.upper()} at the top of the script)"
        raise SetupError(f"{origin} does not exist: give {flag} PATH, or edit {name.upper()} at "
                         "the top of the script, or try --demo")


def run_demo(cfg, data_settings: tuple, data_dir: str, write: Callable, settings: dict,
             hint: str = "") -> None:
    """--demo: refuse dataset flags (the demo writes and uses its own dataset in `data_dir`), call
    `write()` to write it and point cfg's paths at it, then apply the script's demo `settings` not
    given as flags (a missing demo PRETRAINED means training from scratch)."""
    given = [_flag(n) for n in data_settings if n in cfg.explicit]
    if given:
        raise SetupError(f"--demo writes and uses its own dataset ({data_dir}), so it would ignore "
                         f"{', '.join(given)}: leave {'it' if len(given) == 1 else 'them'} out, or "
                         "leave out --demo to use your data")
    with setup_errors(hint):
        write()
    for name, value in settings.items():
        if name.lower() not in cfg.explicit:
            setattr(cfg, name.lower(), value)
    if cfg.pretrained and cfg.pretrained == settings.get("PRETRAINED") and not os.path.exists(cfg.pretrained):
        print(f"demo: {cfg.pretrained} not found (run the demo that writes it first to start from "
              "its weights): training from scratch")
        cfg.pretrained = ""


def load_datasets(task: Task, cfg, log, test_only: bool = False) -> tuple:
    """The task's (train, val, test) datasets after the preset fills the shape settings.

    The task's path settings are checked first (check_paths); a ValueError / FileNotFoundError of the
    dataset readers becomes a SetupError.
    """
    check_paths(cfg, task.test_data if test_only else task.data_paths)
    fill_preset(cfg)
    with setup_errors():
        return task.build_datasets(cfg, log, test_only=test_only)


def build_model(cfg, task: Task, n_classes: int, log) -> torch.nn.Module:
    """The X3D of `cfg.x3d_version`, with `cfg.pretrained` weights loaded when given."""
    model = x3d.generate_model(cfg.x3d_version, n_classes=n_classes, dropout=cfg.dropout,
                               task=task.model_task, multi_label=task.multi_label)
    if cfg.pretrained:
        if not os.path.exists(cfg.pretrained):
            raise SetupError(f"--pretrained {cfg.pretrained}: no such file")
        log(f"loaded pretrained weights {cfg.pretrained}: {_summary(_load(model, cfg.pretrained))}")
    return model


def _summary(report: dict) -> str:
    """One line from x3d.load_pretrained's report: format, counts, classifier, notes."""
    text = (f"{report.get('format')} checkpoint, {len(report.get('converted', []))} tensors loaded, "
            f"{len(report.get('missing', []))} missing")
    if report.get("classifier_reinitialized"):
        text += ", classifier re-initialised"
    return text + "".join(f"; {n}" for n in report.get("notes", []))


def _load(model, path: str) -> dict:
    """x3d.load_pretrained, with its refusal turned into a SetupError naming the file; this repo's
    checkpoints are also checked against their checksum (a note when they have none)."""
    try:
        report = x3d.load_pretrained(model, path)
    except ValueError as e:
        raise SetupError(f"{path}: {e}") from None
    if report.get("format") == "x3d.py":
        try:
            note = checkpoints.load(path)[1]
        except checkpoints.Corrupt as e:
            raise SetupError(f"{e}; use another checkpoint of the run (checkpoints/*.pt)") from None
        report["notes"] = report.get("notes", []) + ([note] if note else [])
    return report


def make_plan(cfg, d: Dist) -> multigrid.MultigridPlan:
    """The Multigrid plan (constant shape when both cycles are off) for this run's per-GPU batch."""
    if cfg.batch_size % d.world:
        raise SetupError(f"--batch-size {cfg.batch_size} (global) does not divide over "
                         f"{d.world} processes")
    per_gpu = cfg.batch_size // d.world
    base_lr = multigrid.scale_lr(cfg.base_lr, cfg.lr_reference_batch, cfg.batch_size)
    return multigrid.MultigridPlan(
        cfg.frames, cfg.crop, cfg.rate, per_gpu, cfg.max_epoch, cfg.steps, base_lr,
        long_cycle=cfg.long_cycle, short_cycle=cfg.short_cycle, lr_policy=cfg.lr_policy,
        gamma=cfg.gamma, warmup_epochs=cfg.warmup_epochs,
        warmup_start_lr=cfg.warmup_start_lr * base_lr / cfg.base_lr if cfg.warmup_start_lr else None,
        epoch_factor=cfg.epoch_factor, bn_base_size=cfg.bn_base_size,
        cosine_batch_factor=cfg.cosine_batch_factor, constant_batch=getattr(cfg, "constant_batch", False))


def _precise_bn(model, train_ds, cfg, d: Dist, epoch: int, splits: int) -> int:
    """Recompute BN statistics over `cfg.precise_bn_batches` full-shape training batches.

    PySlowFast's precise BN reads the training loader; here the batches are drawn at the default
    (frames, crop) and per-GPU base batch with seeds of their own, so the training sampler's
    position and the global RNG are untouched. BN splits are 1 meanwhile, then restored.
    """
    if cfg.precise_bn_batches <= 0:
        return 0
    per_gpu = cfg.batch_size // d.world
    need = cfg.precise_bn_batches * per_gpu * d.world
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 17)
    perm = torch.randperm(len(train_ds), generator=g).repeat(need // len(train_ds) + 1)[:need]
    reqs = [multigrid.ClipRequest(int(i), cfg.frames, cfg.crop, cfg.rate,
                                  int(cfg.seed * 7_919 + epoch * 104_729 + p + 2**40))
            for p, i in enumerate(perm.tolist())][d.rank::d.world]
    batches = [reqs[i:i + per_gpu] for i in range(0, len(reqs) - per_gpu + 1, per_gpu)]
    loader = DataLoader(train_ds, batch_sampler=batches, num_workers=cfg.workers)
    net = unwrap(model)
    x3d.set_bn_splits(net, 1)
    progress = Progress(len(batches), "precise BN", unit="batches", active=d.main)

    def inputs():
        for b in loader:
            x = to_input(b[0], d, cfg)
            progress.update()
            yield x
    with autocast(cfg, d):
        used = x3d.recompute_bn_stats(net, inputs(), len(batches))
    progress.close()
    x3d.set_bn_splits(net, splits)
    average_bn_buffers(model, d)
    return used


# ----------------------------------------------------------------------------------------- train

def _checkpoint_state(model, optimizer, scaler, cfg, task: Task, n_classes, epoch, iteration,
                      step, best, class_names=None, **extra) -> dict:
    """What a checkpoint holds; `class_names` (index = label) lets evaluation map labels by name."""
    return {"model": unwrap(model).state_dict(), "x3d_version": cfg.x3d_version,
            "n_classes": n_classes, "task": task.model_task, "multi_label": task.multi_label,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "iteration": iteration, "step": step, "best": best,
            "rng": rng_state(), "config": vars(cfg), "class_names": class_names, **extra}


def class_names_of(dataset) -> list[str] | None:
    """A dataset's class names in label order: Kinetics names, Charades codes (None: unknown)."""
    classes = getattr(dataset, "classes", None)
    if not classes:
        return None
    return [c if isinstance(c, str) else str(c[0]) for c in classes]


def _resume_state(cfg, folder: str, n_classes: int, class_names, train_samples: int, log):
    """(path, state) of the checkpoint to resume from, None to start fresh.

    The newest intact checkpoint is used (corrupt ones passed over, said in the log). A different
    model or class list stops the run; different schedule settings stop it unless --force-resume.
    """
    try:
        found = checkpoints.newest_intact(folder)
    except checkpoints.Corrupt as e:
        raise SetupError(str(e)) from None
    if found is None:
        return None
    path, state, notes = found
    for note in notes:
        log(f"note: {note}")
    names = state.get("class_names")
    model = [f"model: checkpoint X3D-{state['x3d_version']} with {state['n_classes']} classes, now "
             f"X3D-{cfg.x3d_version} with {n_classes}"] if (state["x3d_version"], state["n_classes"]) != (
        cfg.x3d_version, n_classes) else []
    if not model and names and class_names and list(names) != list(class_names):
        model = [f"class names (index order): checkpoint {names[:5]}..., now {class_names[:5]}..."]
    schedule = checkpoints.schedule_differences(state.get("config", {}), vars(cfg), train_samples,
                                                state.get("train_samples"))
    new_run = (f"choose another --run-name for a new run (or move {run_dir_for(cfg)} away and "
               "rerun)")
    if model:
        raise SetupError(f"{path} cannot be resumed by this run: {'; '.join(model)}; {new_run}")
    if schedule and not getattr(cfg, "force_resume", False):
        raise SetupError(f"{path} was written with other settings that change the schedule: "
                         f"{'; '.join(schedule)}. Rerun with the checkpoint's settings to resume, "
                         f"{new_run}, or add --force-resume to continue it under the new settings")
    if schedule:
        log(f"warning: --force-resume: continuing {path} under new settings: {'; '.join(schedule)}")
    return path, state


class _EpochChain(torch.utils.data.Sampler):
    """The batches of every epoch from a start (epoch, iteration) to max_epoch, in one pass.

    The trainer iterates its DataLoader once over this chain and takes each epoch's batches from
    it, so workers keep prefetching across epoch ends, evaluations and Multigrid shape changes.
    Iterating the loader once per epoch instead restarts the pipeline every epoch: the first batch
    of an epoch then waits for one worker to decode all of it (a Multigrid phase-0 batch of 1152
    X3D-S clips: seconds) while the other workers have nothing to do.
    """

    def __init__(self, sampler: multigrid.MultigridBatchSampler, max_epoch: int):
        self.sampler, self.max_epoch = sampler, max_epoch
        self.epoch, self.iteration = 0, 0

    def start(self, epoch: int, iteration: int) -> None:
        """Where the next pass begins (0, 0, or a resumed position)."""
        self.epoch, self.iteration = epoch, iteration

    def __len__(self) -> int:
        """Batches in one pass."""
        epochs = range(self.epoch, self.max_epoch)
        return sum(self.sampler.iterations_in_epoch(e) for e in epochs) - self.iteration

    def __iter__(self):
        """Yield each epoch's remaining batches (lists of ClipRequest), epoch after epoch."""
        for epoch in range(self.epoch, self.max_epoch):
            self.sampler.set_epoch(epoch, self.iteration if epoch == self.epoch else 0)
            yield from iter(self.sampler)


def run_dir_for(cfg) -> str:
    """logs/<run name>: the folder that holds everything a run writes, and what resume reads."""
    return os.path.join(cfg.log_dir, cfg.run_name)


def train(cfg, d: Dist, task: Task) -> dict | None:
    """Train, evaluate and test one run; returns the test results on rank 0."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run_dir = run_dir_for(cfg)
    log = RunLog(run_dir, d.main, create=False)  # the folder is made once every check passed
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    last_path = os.path.join(ckpt_dir, "last.pt")
    if not cfg.resume and checkpoints.candidates(ckpt_dir):
        raise SetupError(f"{ckpt_dir} holds checkpoints and --no-resume was given: choose another "
                         "--run-name or move that folder away")
    if d.main:
        for path in checkpoints.remove_temp_files(run_dir) + checkpoints.remove_temp_files(ckpt_dir):
            log(f"removed {path}: a write cut short by a kill or a failed write")
    log(f"run folder {run_dir}; {d.world} process(es) on {d.device.type}")

    train_ds, val_ds, test_ds = load_datasets(task, cfg, log)
    n_classes = task.n_classes(train_ds)
    class_names = class_names_of(train_ds)
    model = build_model(cfg, task, n_classes, log)
    try:
        plan = make_plan(cfg, d)
        sampler = multigrid.MultigridBatchSampler(len(train_ds), plan, rank=d.rank,
                                                  world_size=d.world, seed=cfg.seed)
    except ValueError as e:
        raise SetupError(f"Multigrid settings: {e}") from None
    resume = _resume_state(cfg, ckpt_dir, n_classes, class_names, len(train_ds), log) if cfg.resume else None
    log.open()
    log(f"resuming from {resume[0]}" if resume else "starting fresh")
    if d.main:
        _atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(vars(cfg), indent=2))
    log("Multigrid plan:\n" + plan.describe(world_size=d.world, num_samples=len(train_ds)))
    if d.main:
        multigrid.plot_schedule(plan, os.path.join(run_dir, "multigrid_schedule.png"),
                                world_size=d.world, num_samples=len(train_ds))
    epochs = _EpochChain(sampler, plan.max_epoch)
    loader = DataLoader(train_ds, batch_sampler=epochs, num_workers=cfg.workers,
                        pin_memory=d.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed),
                        prefetch_factor=4 if cfg.workers > 0 else None)
    # On the device before the optimizer loads its state, which follows each parameter's device.
    model.to(d.device)
    if cfg.fast_depthwise and d.device.type == "cpu":
        log(f"fast CPU depthwise backward (x3d_kernels) on {x3d_kernels.use_fast_depthwise(model)} convolutions")
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.SGD(x3d.parameter_groups(model, cfg.weight_decay, cfg.bn_weight_decay),
                                lr=plan.lr_at(0.0), momentum=cfg.momentum,
                                nesterov=cfg.nesterov and cfg.momentum > 0)
    scaler = torch.amp.GradScaler(d.device.type) if cfg.precision == "fp16" else None
    epoch, iteration, step, best = 0, 0, 0, None
    counters = {"decode_failures": 0, "dropped": 0}
    if resume:
        ckpt = resume[1]
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        epoch, iteration, step, best = ckpt["epoch"], ckpt["iteration"], ckpt["step"], ckpt["best"]
        counters.update(ckpt.get("counters") or {})
        if epoch < plan.max_epoch and iteration >= sampler.iterations_in_epoch(epoch):
            epoch, iteration = epoch + 1, 0  # --force-resume onto a plan with shorter epochs
        set_rng_state(ckpt["rng"])
        log.truncate_after(step)
        log(f"resumed at epoch {epoch} iteration {iteration} (step {step}); "
            f"{counters['decode_failures']} decode failures replaced so far")
        del ckpt, resume
    if cfg.activation_checkpointing:
        model.set_activation_checkpointing(True)
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            broadcast_buffers=False)
    if cfg.compile:
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        # One static graph per Multigrid shape and BN split: with dynamic shapes, inductor failed to
        # lower a convolution after the split batch norm at the second shape (torch 2.13 on CPU:
        # "ValueRangeError: Invalid ranges [0:-1]").
        net = torch.compile(net, dynamic=False)

    def snapshot(e: int, i: int, s: int) -> dict:
        return _checkpoint_state(model, optimizer, scaler, cfg, task, n_classes, e, i, s, best,
                                 class_names, train_samples=len(train_ds),
                                 counters={"decode_failures": totals["failures_all"],
                                           "dropped": totals["dropped"]})

    phase = None
    # failures: this rank's decode failures (rank 0 also carries the resumed count); failures_all:
    # the sum over ranks at the last log window, which checkpoints store
    totals = {"failures": counters["decode_failures"] if d.main else 0,
              "failures_all": counters["decode_failures"], "dropped": counters["dropped"]}
    t_start = plotted = time.time()
    epochs.start(epoch, iteration)
    run_iters = sum(sampler.iterations_in_epoch(e) for e in range(plan.max_epoch))
    progress = Progress(run_iters, "training", initial=run_iters - len(epochs), active=d.main,
                        lines=False, leave=True)
    log.bar = progress
    batches = iter(loader)  # one pass over all remaining epochs (see _EpochChain)
    while epoch < plan.max_epoch:
        if plan.phase(epoch) != phase:
            phase = plan.phase(epoch)
            x3d.set_bn_splits(model, phase.bn_splits)
            log(f"epoch {epoch}: Multigrid phase {phase.index} (LR step {phase.step_index}): "
                f"per-GPU batch {phase.per_gpu_batch}, {phase.frames} frames, crop {phase.crop}, "
                f"BN splits {phase.bn_splits}, until epoch {phase.end_epoch}")
            log.metric({"kind": "phase", "step": step, "epoch": epoch, **phase._asdict()})
        n_iter = sampler.iterations_in_epoch(epoch)
        totals["dropped"] += sampler.dropped_in_epoch(epoch) if iteration == 0 else 0
        step = _train_epoch(net, itertools.islice(batches, n_iter - iteration), optimizer, scaler,
                            plan, cfg, d, task, log, epoch, iteration, n_iter, step, totals,
                            save=lambda e, i, s: save_checkpoint(last_path, snapshot(e, i, s)),
                            progress=progress)
        epoch, iteration, copies = epoch + 1, 0, []
        due = cfg.eval_period and epoch % cfg.eval_period == 0
        if val_ds is not None and (due or epoch == plan.max_epoch):
            _precise_bn(model, train_ds, cfg, d, epoch, phase.bn_splits)
            _, scores, targets = predict_clips(net, val_ds, cfg, d, cfg.batch_size // d.world)
            metrics = task.val_metrics(scores, targets)
            log(f"epoch {epoch} validation (1 centre clip per video): " + _format(metrics))
            log.metric({"kind": "val", "step": step, "epoch": epoch, "primary": task.primary,
                        **metrics})
            if best is None or metrics[task.primary] > best:
                best = metrics[task.primary]
                copies.append(os.path.join(run_dir, "checkpoints", "best.pt"))
        average_bn_buffers(model, d)
        if d.main:
            if cfg.checkpoint_period and epoch % cfg.checkpoint_period == 0:
                copies.append(os.path.join(run_dir, "checkpoints", f"epoch_{epoch:04d}.pt"))
            # One snapshot, checksummed and serialised once for last.pt, best.pt and the epoch file.
            save_checkpoint(last_path, snapshot(epoch, 0, step), copies)
            if time.time() - plotted >= PLOT_INTERVAL_S:
                log.plot()
                plotted = time.time()
        d.barrier()
    progress.close()
    log.bar = None
    del batches, loader  # stops the training workers before the final evaluation
    fingerprints = d.gather(param_fingerprint(model))
    log.metric({"kind": "ranks", "step": step, "param_fingerprints": fingerprints})
    if len(set(fingerprints)) > 1:
        log(f"warning: the ranks hold different weights: {fingerprints}")
    log(f"training done: {step} iterations in {time.time() - t_start:.0f} s, "
        f"{totals['failures_all']} decode failures replaced, {totals['dropped']} samples dropped "
        "(epoch remainders that do not fill a batch)")
    results = None
    _precise_bn(model, train_ds, cfg, d, plan.max_epoch, plan.phase(plan.max_epoch - 1).bn_splits)
    if d.main:
        save_checkpoint(os.path.join(run_dir, "checkpoints", "final.pt"),
                        {k: v for k, v in snapshot(epoch, 0, step).items()
                         if k not in ("optimizer", "scaler", "rng")})
    if test_ds is not None:
        results = task.test(net, test_ds, cfg, d, log, run_dir)
        if d.main:
            log.metric({"kind": "test", "step": step, "epoch": epoch, "primary": task.primary,
                        **{k: v for k, v in results.items() if isinstance(v, (int, float))}})
            _atomic_write_text(os.path.join(run_dir, "results.json"), json.dumps(results, indent=2))
    if d.main:
        log.plot()
    log.close()
    return results


def _train_epoch(net, loader, optimizer, scaler, plan, cfg, d, task, log, epoch,
                 start_iteration, n_iter, step, totals, save, progress) -> int:
    """One (possibly partial) epoch; returns the global step after it."""
    net.train()
    window = {"loss": 0.0, "n": 0, "clips": 0, "wait": 0.0, "t0": time.time(), "bad": None}
    iteration = start_iteration
    t_wait = time.time()
    for clips, targets, _index, failures in loader:
        window["wait"] += time.time() - t_wait
        lr = plan.lr_at(epoch + iteration / n_iter)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = to_input(clips, d, cfg)
        targets = targets.to(d.device, non_blocking=True)
        with autocast(cfg, d):
            loss = task.loss(net(x), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        iteration += 1
        step += 1
        bad = ~torch.isfinite(loss.detach())
        window["bad"] = bad if window["bad"] is None else window["bad"] | bad
        window["loss"] += loss.detach().float()
        window["n"] += 1
        window["clips"] += clips.shape[0] * d.world
        totals["failures"] += int(failures.sum())
        progress.update()
        due_ckpt = cfg.checkpoint_iters and step % cfg.checkpoint_iters == 0
        if step % cfg.log_period == 0 or iteration == n_iter or due_ckpt:
            _flush_window(window, cfg, d, log, epoch, iteration, n_iter, step, lr, clips, totals,
                          progress)
            if due_ckpt:
                average_bn_buffers(net, d)
                if d.main:
                    save(epoch, iteration, step)
        t_wait = time.time()
    return step


def _flush_window(window, cfg, d, log, epoch, iteration, n_iter, step, lr, clips, totals,
                  progress) -> None:
    """Log the mean loss, throughput and time left after the last iterations; stop on a non-finite loss."""
    bad, loss, failures = d.sum([float(window["bad"].item()), window["loss"].item() / window["n"],
                                 float(totals["failures"])])
    totals["failures_all"] = int(failures)
    if bad:
        raise checkpoints.NonFinite(f"non-finite loss at epoch {epoch}, within the {window['n']} "
                                    f"iterations before iteration {iteration} (step {step})")
    elapsed = time.time() - window["t0"]
    rec = {"kind": "train", "step": step, "epoch": epoch, "iteration": iteration,
           "epoch_float": epoch + iteration / n_iter, "loss": loss / d.world, "lr": lr,
           "batch": clips.shape[0], "frames": clips.shape[2], "crop": clips.shape[-1],
           "clips_per_s": window["clips"] / max(elapsed, 1e-9),
           "data_wait": window["wait"] / max(elapsed, 1e-9), "decode_failures": int(failures),
           "window_s": elapsed}
    if d.device.type == "cuda":
        rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
    log.metric(rec)
    if step % cfg.log_period == 0 or iteration == n_iter:
        log(f"epoch {epoch} it {iteration}/{n_iter} loss {rec['loss']:.4f} lr {lr:.4g} "
            f"shape {rec['batch']}x{rec['frames']}x{rec['crop']}^2 "
            f"{rec['clips_per_s']:.1f} clips/s data-wait {100 * rec['data_wait']:.0f}% "
            f"decode failures {rec['decode_failures']}; training {progress.status()}")
    window.update(loss=0.0, n=0, clips=0, wait=0.0, t0=time.time(), bad=None)


# ------------------------------------------------------------------------------------ entry point

def eval_dir_for(cfg) -> str:
    """Where `--eval-only` writes: logs/<run name>/eval_<checkpoint name>/, beside the run's own
    results (never over them); evaluating the same checkpoint again replaces that folder's files."""
    name = os.path.splitext(os.path.basename(cfg.checkpoint))[0]
    return os.path.join(run_dir_for(cfg), f"eval_{name}")


def evaluate_checkpoint(cfg, d: Dist, task: Task) -> dict | None:
    """`--eval-only --checkpoint PATH`: the multi-view test of any checkpoint x3d.py can load.

    Writes log.txt, results.json and the task's per-video files to `eval_dir_for(cfg)`.
    """
    out = eval_dir_for(cfg)
    log = RunLog(out, d.main, create=False, subdirs=())  # no folder for a refused evaluation
    if describe_adopted(cfg):
        log("settings " + describe_adopted(cfg))
    _, _, test_ds = load_datasets(task, cfg, log, test_only=True)
    cfg.pretrained = ""  # the checkpoint's weights replace any initial weights
    model = build_model(cfg, task, task.n_classes(test_ds), log)
    log(f"evaluating {cfg.checkpoint}: {_summary(_load(model, cfg.checkpoint))}")
    log.open()
    model.to(d.device)
    results = task.test(model, test_ds, cfg, d, log, out)
    if d.main:
        _atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2))
        log(f"results in {out}")
    log.close()
    return results


# Write errors that stop a run with one line (permission errors only for files in the run folder).
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _stop_message(e: BaseException, cfg) -> str | None:
    """The one-line message for an error that ends a run cleanly, or None for a bug (traceback)."""
    run_dir = run_dir_for(cfg)
    if isinstance(e, SetupError):
        return str(e)
    if isinstance(e, checkpoints.NonFinite):
        return (f"{e}; the run stopped (nothing non-finite is ever written). Last good checkpoint: "
                f"{checkpoints.last_written(os.path.join(run_dir, 'checkpoints'))}. Lower --base-lr "
                "or lengthen --warmup-epochs (or check the data), then rerun to resume from it; a "
                "large |value| there means the divergence began earlier: start a new --run-name")
    if isinstance(e, video_io.TooManyFailures):
        # from a DataLoader worker the text is the worker's traceback: its last line is the message
        text = str(e).strip().splitlines()[-1]
        return text.split("TooManyFailures: ", 1)[-1] + " The run stopped; rerun to resume from its last checkpoint."
    if isinstance(e, OSError) and (e.errno in _NO_SPACE or (
            e.errno in (errno.EACCES, errno.EPERM)
            and os.path.abspath(str(e.filename or "")).startswith(os.path.abspath(run_dir)))):
        return checkpoints.write_failed_message(str(e.filename or run_dir), e)
    return None


def _worker(cfg, d: Dist, task: Task) -> None:
    try:
        (evaluate_checkpoint if cfg.eval_only else train)(cfg, d, task)
    except (SetupError, checkpoints.NonFinite, video_io.TooManyFailures, OSError) as e:
        message = _stop_message(e, cfg)
        if message is None:
            raise
        if d.main or isinstance(e, video_io.TooManyFailures):  # the others stop on every rank
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class _Bound:
    """Picklable (cfg, Dist) -> None callable for process spawning."""

    def __init__(self, task):
        self.task = task

    def __call__(self, cfg, d):
        _worker(cfg, d, self.task)


def main(task: Task, constants: dict, argv=None, description: str = "") -> None:
    """Parse the script's constants and command line, then train / evaluate as configured."""
    cfg = parse_config(constants, argv, description)
    try:
        check_flag_values(cfg)
        predict = getattr(cfg, "predict", "")
        if predict and task.predict is None:
            raise SetupError(f"{task.name}: --predict is not available for this script")
        if (cfg.eval_only or predict) and not cfg.checkpoint:
            raise SetupError(f"{f'--predict {predict}' if predict else '--eval-only'} needs "
                             "--checkpoint PATH")
        if cfg.eval_only or predict:
            adopt_checkpoint_settings(cfg, task)
        if cfg.demo:
            if task.demo is None:
                raise SetupError(f"{task.name}: --demo is not available for this script")
            task.demo(cfg)
        if predict:
            task.predict(cfg)
            return
        launch(_Bound(task), cfg)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.multiprocessing.ProcessExitedException as e:
        print(f"error: process {e.error_index} exited with code {e.exit_code} (its message is "
              "above)", file=sys.stderr)
        sys.exit(e.exit_code or 1)
