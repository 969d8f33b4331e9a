"""Complete, atomic, resumable training state; weights-only loading.

A checkpoint is a dict of tensors and plain Python values (str, int, float, bool, lists,
dicts), so `torch.load(path, weights_only=True)` reads it and a file from someone else cannot
run code. Files are written to a temporary name, flushed, fsynced and renamed, so
`checkpoints/last.pt` always names a complete checkpoint, even if the writer is killed.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from pathlib import Path

import torch

# 2: per-layer RNN cells (format-1 stacked-cell weights are mapped on loading), no RNG state
FORMAT = 2
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


class CheckpointError(RuntimeError):
    pass


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def link_atomic(src: Path, dest: Path) -> None:
    """Make `dest` name the same complete file as `src` (hard link, else copy), atomically."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
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
    """Keep the newest `keep` periodic checkpoints. Also removes temporary files of writers
    killed mid-save: called by the only writer (rank 0) between its own saves."""
    for old in periodic(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    for partial in checkpoint_dir(run_dir).glob("*.tmp"):
        partial.unlink(missing_ok=True)


def check_compatible(state: dict, cfg_dict: dict, vocab: list[str], path: Path) -> None:
    from .config import flatten

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
