"""The prepared-id cache: a folder of flat id files and their meta.json, built under a
temporary name and renamed into place whole, checked by size (every start) or sha256
(`prepare --verify`), and opened as read-only memory maps; `shared` is the one way ranks
share a prepared corpus. Nothing here knows where the ids came from (pipeline/data/builder.py
fills it from any source).

    <folder>/meta.json    format, vocab, dtype, per split: file, length, bytes, sha256
    <folder>/train.bin    (validation.bin, test.bin): the ids, uint16 or uint32
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.data.common import Corpus, DataError, sha256_of
from pipeline.data.vocab import Vocab

FORMAT = 1  # bump when the layout or the tokenization rule changes: old folders are ignored


def replace_dir(src: Path, dest: Path) -> None:
    """Rename `src` to `dest`, moving a damaged `dest` aside first. An intact `dest` was built
    meanwhile by another node on a shared file system (same key, same bytes): keep it, since
    its ranks may be reading it already."""
    if dest.exists():
        if verify(dest, full=True) is not None:
            return
        aside = dest.with_name(f"{dest.name}.old-{os.getpid()}")
        os.rename(dest, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(src, dest)
    except OSError:
        if verify(dest, full=False) is None:
            raise


def verify(folder: Path, full: bool) -> dict | None:
    """The folder's meta if every file is intact (sizes; and sha256 when `full`), else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for info in meta["splits"].values():
            path = folder / info["file"]
            if path.stat().st_size != info["bytes"] or info["bytes"] != info["length"] * itemsize:
                return None
            if full and sha256_of(path) != info["sha256"]:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def open_prepared(folder: Path, meta: dict) -> Corpus:
    """Read-only memmaps: pages are read on demand, so a rank touches only its own rows."""
    dtype = np.dtype(meta["dtype"])
    splits = {
        name: np.memmap(folder / info["file"], dtype=dtype, mode="r", shape=(info["length"],))
        for name, info in meta["splits"].items()
    }
    return Corpus(Vocab(meta["vocab"]), splits)


def shared(prepare: Callable[[], Path], ctx) -> Corpus:
    """Collective: every rank calls it. Local rank 0 runs `prepare` (the folder, built or
    checked) while the others wait for it; errors travel with it, so every rank raises the
    same DataError instead of hanging. Then every rank opens the folder, and the ranks check
    that their nodes prepared one vocabulary."""
    from pipeline import dist

    result: tuple[str | None, str | None] = (None, None)
    if ctx.local_rank == 0:  # one line per node that prepares: "reusing" or "built"
        try:
            result = (str(prepare()), None)
        except DataError as err:
            result = (None, str(err))
    # One all-gather doubles as the barrier; torchrun numbers a node's ranks contiguously,
    # so this node's local rank 0 is rank - local_rank.
    folder, error = dist.all_gather_object(result)[ctx.rank - ctx.local_rank]
    if error is not None:
        raise DataError(error)
    meta = verify(Path(folder), full=False)
    if meta is None:
        raise DataError(f"prepared data folder '{folder}' is missing or damaged")
    corpus = open_prepared(Path(folder), meta)
    vocab_hash = int(hashlib.sha256("\0".join(meta["vocab"]).encode()).hexdigest()[:15], 16)
    dist.check_same(vocab_hash, "the prepared vocabulary (hash)")  # nodes prepared alike
    return corpus
