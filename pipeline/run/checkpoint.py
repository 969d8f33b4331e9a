"""Complete, atomic, resumable training state; weights-only loading.

A checkpoint is a dict of tensors and plain Python values (str, int, float, bool, lists,
dicts), so `torch.load(path, weights_only=True)` reads it and a file from someone else cannot
run code. Files are written to a temporary name, flushed, fsynced and renamed, so
`checkpoints/last.pt` always names a complete checkpoint, even if the writer is killed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

# 2: per-layer RNN cells (format-1 stacked-cell weights are mapped on loading), no RNG state
# 3: random sampling's window order is a seeded bijection (pipeline.data.shuffle), not a randperm
FORMAT = 3
RANDOM_ORDER_SINCE = 3
STEP_RE = re.compile(r"step_(\d+)\.pt$")
# Keys whose change makes a checkpoint unusable for a run (named in the error).
COMPATIBLE_KEYS = (
    "model.kind",
    "model.hidden_size",
    "model.num_layers",
    "model.embedding_size",
    "model.tie_weights",
    "train.batch_size",
    "train.num_steps",
    "train.sampling",
    "model.adaptive_cutoffs",
    "model.adaptive_div",
)
# What a key added since format 1 means where an older checkpoint's config lacks it.
ADDED_SINCE_FORMAT_1 = {"model.adaptive_cutoffs": [], "model.adaptive_div": 4}


DISK_FULL_EXIT = 74  # EX_IOERR: a checkpoint did not fit or could not be written
# Written besides the tensors: pickled plain values, zip headers (a generous bound).
OVERHEAD_BYTES = 1 << 20


class CheckpointError(RuntimeError):
    pass


class DiskFull(Exception):
    """A checkpoint did not fit on the run directory's filesystem, or writing it failed."""


def tensors(obj, prefix: str = ""):
    """(name, tensor) for every tensor in a nested checkpoint dict/list."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}[{i}]")


def first_nonfinite(state: dict) -> str | None:
    """The name of the first floating tensor holding NaN or inf, else None (one host read:
    the per-tensor checks are stacked on each device first)."""
    named = [(n, t) for n, t in tensors(state) if t.is_floating_point()]
    by_device: dict = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    order, flags = [], []
    for idx in by_device.values():
        order += idx
        flags.append(torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).cpu())
    if not flags:
        return None
    bad = (~torch.cat(flags)).nonzero().flatten().tolist()  # an int read, once per save
    return named[min(order[j] for j in bad)][0] if bad else None


def nbytes(state: dict) -> int:
    """About what torch.save writes for `state`: its tensors' bytes plus OVERHEAD_BYTES."""
    return sum(t.numel() * t.element_size() for _, t in tensors(state)) + OVERHEAD_BYTES


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_space(directory: Path, need: int, what: str) -> None:
    """DiskFull naming the path, the space needed and the space free when `need` bytes do
    not fit into `directory`'s filesystem."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise DiskFull(
            f"disk full: {what} in '{directory}' needs about {_mib(need)}, "
            f"{_mib(free)} free; free space there (or move run.dir), then resume"
        )


# Set by pipeline.faults (PIPELINE_FAULTS, tests only): called with the _Writer before each
# chunk of a checkpoint is written; it may raise an OSError or end the process.
write_fault = None


class _Writer:
    """A file object that keeps the OSError of a failed write: torch.save reports a full
    disk as "unexpected pos ..." from inside its zip writer, and the cause is lost."""

    def __init__(self, f, path: Path, expected: int):
        self.f, self.error = f, None
        self.path, self.expected, self.written = path, expected, 0  # for write_fault

    def write(self, data) -> int:
        try:
            if write_fault is not None:
                write_fault(self)
            n = self.f.write(data)
        except OSError as err:
            self.error = err
            raise
        self.written += n
        return n

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(state: dict, path: Path) -> None:
    """Write to a temporary name, fsync, rename. A full disk or an I/O error is DiskFull
    naming the path (errno's words, space needed and free); no temporary file stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    need = nbytes(state)
    check_space(path.parent, need, f"checkpoint '{path.name}'")
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f, path, need - OVERHEAD_BYTES)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        cause = writer.error if writer is not None and writer.error is not None else err
        if not isinstance(cause, OSError):
            raise
        free = shutil.disk_usage(path.parent).free
        raise DiskFull(
            f"disk full: writing checkpoint '{path}' failed ({cause.strerror or cause}); "
            f"it needs about {_mib(need)}, {_mib(free)} free; the previous checkpoints are "
            f"intact; free space there (or move run.dir), then resume"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def link_atomic(src: Path, dest: Path) -> None:
    """Make `dest` name the same complete file as `src` (hard link, else copy), atomically."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DiskFull(
            f"disk full: making '{dest}' name '{src.name}' failed ({err.strerror or err}); "
            f"{_mib(shutil.disk_usage(dest.parent).free)} free"
        ) from None
    _fsync_dir(dest.parent)


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely; a damaged or foreign file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint '{path}' cannot be loaded: {_why(path, err)}") from None
    if not isinstance(state, dict) or "model" not in state or "vocab" not in state:
        raise CheckpointError(
            f"checkpoint '{path}' is not a checkpoint of this pipeline (no 'model'/'vocab' entries)"
        )
    bad = first_nonfinite({k: state.get(k) for k in ("model", "optimizer", "hidden")})
    if bad is not None:
        raise CheckpointError(
            f"checkpoint '{path}' holds non-finite values (NaN or inf in {bad}): it was saved "
            f"from a diverged run"
        )
    if state.get("format", 1) > FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' has format {state['format']}, written by a newer version of "
            f"this pipeline (this one reads formats up to {FORMAT}); update the package"
        )
    return state


def _why(path: Path, err: Exception) -> str:
    """torch's message, reduced to the cause: damaged archive, or a pickled callable."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; its directory is at the end
        return "truncated or corrupt (not a complete torch.save archive)"
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if found:
        return (
            f"it holds a pickled object ({found.group(1)}) that could run code when "
            f"loaded; checkpoints hold only tensors and plain values (weights-only)"
        )
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def periodic(run_dir: Path) -> list[Path]:
    """Periodic checkpoints, newest first."""
    found = [p for p in checkpoint_dir(run_dir).glob("step_*.pt") if STEP_RE.search(p.name)]
    return sorted(found, key=lambda p: int(STEP_RE.search(p.name).group(1)), reverse=True)


def candidates(run_dir: Path) -> list[Path]:
    last = checkpoint_dir(run_dir) / "last.pt"
    return ([last] if last.is_file() else []) + periodic(run_dir)


def load_latest_good(run_dir: Path, warn=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; damaged ones are reported and skipped."""
    errors = []
    for path in candidates(run_dir):
        try:
            state = load(path)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        for e in errors:
            warn(f"{e}; falling back to '{path}'")
        return path, state
    if errors:
        raise CheckpointError(
            f"no usable checkpoint in '{checkpoint_dir(run_dir)}': " + "; ".join(errors)
        )
    return None


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` periodic checkpoints, and always the one last.pt names. Also
    removes temporary files of writers killed mid-save: called by the only writer (rank 0)
    between its own saves."""
    last = checkpoint_dir(run_dir) / "last.pt"
    for old in periodic(run_dir)[keep:]:
        if last.is_file() and os.path.samefile(old, last):
            continue
        old.unlink(missing_ok=True)
    for partial in checkpoint_dir(run_dir).glob("*.tmp"):
        partial.unlink(missing_ok=True)


def check_compatible(state: dict, cfg_dict: dict, vocab: list[str], path: Path) -> None:
    from pipeline.config import flatten

    saved, now = flatten(state["config"]), flatten(cfg_dict)
    saved, now = {**ADDED_SINCE_FORMAT_1, **saved}, {**ADDED_SINCE_FORMAT_1, **now}
    for key in COMPATIBLE_KEYS:
        if saved.get(key) != now.get(key):
            raise CheckpointError(
                f"checkpoint '{path}' has {key}={saved.get(key)!r} but this "
                f"run has {key}={now.get(key)!r}; use another run.dir or "
                f"train.resume=never"
            )
    if list(state["vocab"]) != list(vocab):
        diff = len(state["vocab"]) - len(vocab)
        raise CheckpointError(
            f"checkpoint '{path}' has a different vocabulary "
            f"({len(state['vocab'])} vs {len(vocab)} characters, "
            f"{'same size, other order/chars' if not diff else 'other size'})"
        )
