"""The one preparation path: a source's text, in chunks -> counts -> vocabulary -> ids.

Every source gives its text the same way (textfile.py: a text file of any size or the
built-in zip; hf.py: a Hugging Face dataset, streamed or not): a list of *pieces*,
picklable objects whose `chunks()` yield `(split, text, own)`, `own` being how many of the
source's own characters the text holds (a dataset's documents without their separators; an
empty split is one without any). The pieces of a split follow each other in its text.
This module does the rest, for every source alike:

1. count: every piece in one of data.num_proc processes: per split, one count per code
   point, its characters and its own characters (memory: a chunk and the counts);
2. the vocabulary from train's counts (Vocab.build; the other splits' characters decide
   whether `<unk>` is needed);
3. write: every piece again, its ids through the vocabulary's lookup table into its place of
   the split's file (offsets from the count: the same ids for any number of processes);
   uint16 when the vocabulary fits, else uint32;
4. meta.json, and the folder renamed into the id cache whole (idcache.py). A small text read
   whole (`build(source, None)`) is written into memory instead: no folder, as before.

`prepare` is what a job start runs (on local rank 0, through idcache.shared): the source
names its cache folder without reading its text, and an intact folder is reused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.data.common import Corpus, DataError, sha256_of
from pipeline.data.idcache import FORMAT, replace_dir, verify
from pipeline.data.vocab import CODE_POINTS, Vocab, as_counter, code_point_counts


class Piece(Protocol):
    def chunks(self) -> Iterator[tuple[str, str, int]]: ...  # (split, text, own characters)


class Source(Protocol):
    data: object  # the DataConfig: num_proc, min_freq, max_vocab
    label: str  # the log lines start with it, e.g. "prepared data"
    in_memory: bool  # built into memory by every rank (a small text), not into the cache

    def locate(self) -> tuple[Path, str | None]:
        """The cache folder for this config and a line for the log; reads no text."""

    def open(self) -> None:
        """Load what the pieces read (a dataset), before the build's clock starts."""

    def pieces(self) -> tuple[list[str], list[Piece]]:
        """The split names in order, and the pieces of text that fill them."""

    def check(self, split: str, own: int) -> None:
        """A DataError when `split` (with `own` of the source's characters) cannot be used."""

    def meta(self, splits: list[str]) -> tuple[dict, dict[str, dict]]:
        """The source's own entries of meta.json, and per split."""


def _count(piece: Piece) -> dict[str, list]:
    """split -> [counts per code point, characters, own characters] of one piece."""
    out: dict[str, list] = {}
    for split, text, own in piece.chunks():
        acc = out.setdefault(split, [np.zeros(CODE_POINTS, np.int64), 0, 0])
        acc[0] += code_point_counts(text)
        acc[1] += len(text)
        acc[2] += own
    return out


def _write(job: dict) -> None:
    """One piece's ids into its targets: split -> (a file's path or an array, first id)."""
    lut, n_vocab, dtype = job["lut"], job["n_vocab"], np.dtype(job["dtype"])
    at = {split: offset for split, (_, offset) in job["targets"].items()}
    files = {}
    try:
        for split, text, _ in job["piece"].chunks():
            ids = lut[_code_points(text)]
            if (ids >= n_vocab).any():  # lookup_table's marker: never counted
                raise DataError("a character is missing from the vocabulary (no <unk>)")
            target = job["targets"][split][0]
            if isinstance(target, np.ndarray):
                target[at[split] : at[split] + len(ids)] = ids
            else:
                if split not in files:
                    files[split] = open(target, "r+b")
                    files[split].seek(at[split] * dtype.itemsize)
                files[split].write(memoryview(np.ascontiguousarray(ids.astype(dtype))))
            at[split] += len(ids)
    finally:
        for f in files.values():
            f.close()


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class _Workers:
    """data.num_proc forked worker processes (as datasets' own map forks), started once for
    both passes; with one process, or one piece, the jobs run here."""

    def __init__(self, num_proc: int):
        self.pool = None
        if num_proc > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context("fork").Pool(num_proc)

    def run(self, fn, jobs: list) -> Iterator:
        if self.pool is None or len(jobs) <= 1:
            return map(fn, jobs)
        return self.pool.imap(fn, jobs, chunksize=1)  # in order, each result as it comes

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def build(source: Source, folder: Path | None) -> dict | Corpus:
    """Count, build the vocabulary, write the ids: into `folder` (atomically: a temporary
    folder renamed into place; returns its meta), or into memory (`folder` None: returns
    the Corpus; the pieces run in this process)."""
    source.open()
    t0 = time.perf_counter()
    names, pieces = source.pieces()
    num_proc = source.data.num_proc if folder is not None and len(pieces) > 1 else 1
    workers = _Workers(num_proc)
    try:
        counts = {}  # split -> counts per code point (the first piece's array, added to)
        chars, own = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
        sizes = []  # per piece: split -> characters
        for result in workers.run(_count, pieces):
            for split, (c, n, k) in result.items():
                if split in counts:
                    counts[split] += c
                else:
                    counts[split] = c
                chars[split] += n
                own[split] += k
            sizes.append({split: r[1] for split, r in result.items()})
        for name in names:
            source.check(name, own[name])
        data = source.data
        extra = set().union(*(as_counter(c).keys() for k, c in counts.items() if k != "train"))
        vocab = Vocab.build(as_counter(counts["train"]), data.min_freq, data.max_vocab, extra)
        del counts
        lut, dtype = vocab.lookup_table(), vocab.dtype()
        offsets, at = [], dict.fromkeys(names, 0)
        for size in sizes:  # each piece's ids follow the earlier pieces' of its split
            offsets.append({split: at[split] for split in size})
            for split, n in size.items():
                at[split] += n
        if folder is None:
            arrays = {name: np.empty(chars[name], dtype) for name in names}
            for piece, offset in zip(pieces, offsets):
                targets = {split: (arrays[split], o) for split, o in offset.items()}
                _write(dict(piece=piece, lut=lut, n_vocab=len(vocab), dtype=dtype.name,
                            targets=targets))  # fmt: skip
            return Corpus(vocab, arrays)
        return _fill(source, folder, names, pieces, offsets, chars, vocab, lut, workers, t0)
    finally:
        workers.close()


def _fill(source, folder, names, pieces, offsets, chars, vocab, lut, workers, t0) -> dict:
    dtype = vocab.dtype()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        paths = {name: work / f"{name}.bin" for name in names}
        for name, path in paths.items():
            with open(path, "wb") as f:
                f.truncate(chars[name] * dtype.itemsize)
        jobs = [
            {"piece": piece, "lut": lut, "n_vocab": len(vocab), "dtype": dtype.name,
             "targets": {split: (paths[split], o) for split, o in offset.items()}}
            for piece, offset in zip(pieces, offsets)
        ]  # fmt: skip
        for _ in workers.run(_write, jobs):
            pass
        own, per_split = source.meta(names)
        meta = {"format": FORMAT, **own, "vocab": vocab.to_list(), "dtype": dtype.name}
        meta["splits"] = {}
        for name, path in paths.items():
            info = {"file": path.name, "length": chars[name], "bytes": path.stat().st_size}
            info["sha256"] = sha256_of(path)
            meta["splits"][name] = {**info, **per_split.get(name, {})}
        seconds = time.perf_counter() - t0
        meta["build"] = {
            "seconds": round(seconds, 3),
            "chars_per_s": round(sum(chars.values()) / seconds),
            "num_proc": source.data.num_proc,
        }
        (work / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        replace_dir(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def prepare(source: Source, log=print, full_check: bool = False) -> Path:
    """The source's cached folder, (re)built when missing or damaged. A job start checks the
    meta record and the files' sizes (instant, whatever the corpus; the source names its
    folder without reading its text); the sha256 of every file is computed while building,
    and checked again with `full_check` (`python -m pipeline prepare --verify`)."""
    folder, line = source.locate()
    if line:
        log(line)
    label = source.label
    if verify(folder, full=full_check) is not None:
        log(f"{label}: reusing {folder}" + (" (sha256 verified)" if full_check else ""))
        return folder
    if folder.exists():
        log(f"{label}: {folder} is damaged; rebuilding it")
    b = build(source, folder)["build"]
    log(f"{label}: {folder} in {b['seconds']:.1f} s ({b['chars_per_s']:,} characters/s)")
    return folder
