"""Training checkpoints on disk: atomic writes that survive kills and full disks, verified reads.

- `save` refuses a state whose model holds a non-finite value, adds a SHA-256 checksum of every
  tensor and number in the state, writes it to `<path>.tmp<pid>`, fsyncs and renames it over
  `path`. A write that fails (no space, no permission) removes its temp file and raises
  `WriteFailed`, whose message names the path, the free space and the last checkpoint written.
- `load` reads a checkpoint and verifies its checksum; a truncated or corrupted file raises
  `Corrupt`. Checkpoints written before checksums existed load with a note saying so.
- `newest_intact` picks the checkpoint a run resumes from: `last.pt`, else the newest intact kept
  one (`epoch_N.pt`, `best.pt`), saying why each newer one was passed over.
- `remove_temp_files` deletes the temp files a killed or failed write left behind.
"""
import contextlib
import errno
import hashlib
import io
import os
import re
import shutil

import numpy as np
import torch

CHECKSUM_KEY = "checksum"
# Settings that decide which sample each (epoch, iteration) position trains on and at what shape:
# resuming under different values would continue at the old position of another schedule. (The
# model and its classes must match outright; the learning rate may change, e.g. after divergence.)
SCHEDULE_KEYS = ("batch_size", "frames", "rate", "crop", "max_epoch", "steps", "long_cycle",
                 "short_cycle", "epoch_factor", "bn_base_size", "seed")
_TEMP = re.compile(r".+\.tmp\d+$")
_LAST_WRITTEN = {}  # folder -> (path, description) of the newest checkpoint this process wrote


class Corrupt(Exception):
    """A checkpoint file that cannot be read or whose tensors do not match their checksum."""


class WriteFailed(Exception):
    """A checkpoint (or other run file) could not be written: the message says why and what is safe."""


class NonFinite(Exception):
    """A state whose model holds NaN or infinity: it is never written."""


def _leaves(obj, prefix=""):
    """(name, value) of every tensor, array and plain number / string in a nested state, in order."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{prefix}/{i}")
    elif isinstance(obj, (torch.Tensor, np.ndarray, bool, int, float, str)) or obj is None:
        yield prefix, obj


def _update(h, name: str, value) -> None:
    h.update(name.encode())
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, np.ndarray):
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    else:
        h.update(repr(value).encode())


def checksums(state: dict) -> dict:
    """{top-level key: SHA-256 hex of its tensors and numbers} for every key of `state` but the checksum."""
    out = {}
    for key, value in state.items():
        if key == CHECKSUM_KEY:
            continue
        h = hashlib.sha256()
        for name, leaf in _leaves(value, key):
            _update(h, name, leaf)
        out[key] = h.hexdigest()
    return out


def largest_weight(model_state: dict) -> float:
    """max |value| over a model state dict's floating-point tensors (weights, BN statistics); inf / nan if any."""
    worst = 0.0
    for value in model_state.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            m = value.detach().abs().max().item()
            if not np.isfinite(m):
                return m
            worst = max(worst, m)
    return worst


def free_space(path: str) -> str:
    """'12.3 MB free on <mount folder>' for the file system holding `path` (or the nearest existing parent)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free in {folder}"


def last_written(folder: str) -> str:
    """The newest checkpoint this process wrote into `folder`, described, or what is on disk."""
    folder = os.path.abspath(folder)
    if folder in _LAST_WRITTEN:
        return _LAST_WRITTEN[folder]
    last = os.path.join(folder, "last.pt")
    if os.path.exists(last):
        return f"{last} (written before this process started)"
    return "none yet (rerunning starts this run afresh)"


def describe(state: dict) -> str:
    """'epoch E iteration I (step S)' of a training state."""
    return f"epoch {state.get('epoch')} iteration {state.get('iteration')} (step {state.get('step')})"


def write_failed_message(path: str, error: OSError) -> str:
    """One line: what could not be written and why, the free space, the last good checkpoint, what to do."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    folder = os.path.dirname(os.path.abspath(path))
    ckpt_folder = folder if os.path.basename(folder) == "checkpoints" else os.path.join(folder, "checkpoints")
    fix = {errno.ENOSPC: "Free some space", errno.EDQUOT: "Free some space"}.get(
        error.errno, "Make the folder writable")
    return (f"cannot write {path}: {reason}; {free_space(path)}; last good checkpoint: "
            f"{last_written(ckpt_folder)}. {fix}, then rerun the same command to resume from it.")


def _write_atomically(path: str, data) -> None:
    """Write `data` to `<path>.tmp<pid>`, fsync it and rename it to `path`; WriteFailed naming `path` on I/O errors."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise WriteFailed(write_failed_message(path, error)) from None


def save(path: str, state: dict, copies=()) -> None:
    """Write `state` atomically with its checksums; NonFinite for a non-finite model, WriteFailed on I/O errors.

    `copies`: more paths that get the same checkpoint. It is checksummed and serialised once, then each
    file is written and fsynced on its own (independent files: damage to one leaves the others)."""
    model = state.get("model")
    worst = largest_weight(model) if isinstance(model, dict) else 0.0
    if not np.isfinite(worst):
        raise NonFinite(f"the weights hold {worst} values at {describe(state)} (for {path})")
    state = {**state, CHECKSUM_KEY: {"algorithm": "sha256", "parts": checksums(state)}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _write_atomically(path, buffer.getbuffer())
    if os.path.basename(path) == "last.pt":  # what the run resumes from
        _LAST_WRITTEN[os.path.dirname(os.path.abspath(path))] = (
            f"{path}, {describe(state)}, finite weights, largest |value| in the model {worst:.3g}")
    for copy in copies:
        _write_atomically(copy, buffer.getbuffer())


def verify(state, path: str) -> str:
    """'' when `state`'s checksums match, a note when it has none; Corrupt naming the parts that differ."""
    if not isinstance(state, dict) or CHECKSUM_KEY not in state:
        return f"{path} carries no checksum (written before checksums were added): loaded unverified"
    stored = state[CHECKSUM_KEY].get("parts", {})
    actual = checksums(state)
    bad = [key for key in stored if actual.get(key) != stored[key]]
    if bad or set(actual) != set(stored):
        parts = bad or sorted(set(actual) ^ set(stored))
        raise Corrupt(f"{path} is corrupt: the contents of {', '.join(repr(p) for p in parts)} "
                      "do not match the checksum written with them")
    return ""


def load(path: str) -> tuple[dict, str]:
    """(state, note) of a checkpoint file, checksum verified; Corrupt when unreadable or altered."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several kinds for truncated or garbled archives
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Corrupt(f"{path} cannot be read (truncated or corrupt: {text})") from None
    return state, verify(state, path)


def remove_temp_files(folder: str) -> list[str]:
    """Delete `*.tmp<pid>` files (writes cut short by a kill or a full disk) in `folder`; their names."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for entry in os.scandir(folder):
        if entry.is_file() and _TEMP.match(entry.name):
            with contextlib.suppress(OSError):
                os.remove(entry.path)
                removed.append(entry.path)
    return removed


def candidates(folder: str) -> list[str]:
    """Checkpoints a run can resume from, newest first: last.pt, then best.pt and epoch_N.pt by time."""
    last = os.path.join(folder, "last.pt")
    kept = [e.path for e in os.scandir(folder) if e.is_file()
            and (e.name == "best.pt" or re.fullmatch(r"epoch_\d+\.pt", e.name))] if os.path.isdir(folder) else []
    kept.sort(key=lambda p: (os.path.getmtime(p), p), reverse=True)
    return ([last] if os.path.exists(last) else []) + kept


def newest_intact(folder: str) -> tuple[str, dict, list[str]] | None:
    """(path, state, notes) of the newest checkpoint in `folder` that reads and verifies, or None.

    Notes say which newer files were passed over and why, and when the one used has no checksum.
    """
    notes = []
    for path in candidates(folder):
        try:
            state, note = load(path)
        except Corrupt as error:
            notes.append(f"{error}; passed over")
            continue
        if not isinstance(state, dict) or "optimizer" not in state or "epoch" not in state:
            notes.append(f"{path} holds no training state; passed over")
            continue
        if note:
            notes.append(note)
        return path, state, notes
    if notes:
        raise Corrupt("no intact checkpoint to resume from: " + "; ".join(notes)
                      + ". Move the folder away (or choose another --run-name) to start afresh.")
    return None


def schedule_differences(saved: dict, cfg: dict, train_samples: int | None = None,
                         saved_samples: int | None = None) -> list[str]:
    """'name: checkpoint X, now Y' for every schedule setting (and training-set size) that differs."""
    out = []
    for key in SCHEDULE_KEYS:
        if key in saved and key in cfg and _same(saved[key]) != _same(cfg[key]):
            out.append(f"--{key.replace('_', '-')}: checkpoint {saved[key]!r}, now {cfg[key]!r}")
    if saved_samples is not None and train_samples is not None and saved_samples != train_samples:
        out.append(f"training videos: checkpoint {saved_samples}, now {train_samples}")
    return out


def _same(value):
    """A comparable form: lists and tuples alike, ints and equal floats alike."""
    if isinstance(value, (list, tuple)):
        return tuple(_same(v) for v in value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
