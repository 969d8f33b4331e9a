"""Text files larger than memory (`data.source=text`, or a plain .txt as `data.path`): read
in chunks, never whole, into the prepared-id cache (pipeline/idcache.py), then memory-mapped.

Three passes over the file, each holding one chunk: its length (after data.newlines and
data.max_chars) to place the validation cut, the character counts of the training part and
the characters of the validation part (the vocabulary, as for a file read whole), then the
ids. The result equals what reading the file whole gives: the same vocabulary, the same ids.
A file below STREAM_BYTES is read whole (no cache folder), as before.

    <cache>/text/<file name>-<key>/meta.json, train.bin, validation.bin
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .config import DataConfig
from .data import DataError, cache_dir, sha256_of
from .idcache import FORMAT, replace_dir, verify
from .vocab import CODE_POINTS, Vocab, as_counter

# files at least this large are streamed (the variable: for tests of real jobs)
STREAM_BYTES = int(os.environ.get("PIPELINE_TEXT_STREAM_BYTES", 256 << 20))
CHUNK = 1 << 24  # characters a read


def chunks(path: Path, data: DataConfig) -> Iterator[str]:
    """The file's text as data.newlines and data.max_chars make it, CHUNK characters a time."""
    left = data.max_chars or float("inf")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            while left > 0 and (text := f.read(CHUNK)):
                if data.newlines == "space":
                    text = text.replace("\n", " ").replace("\r", " ")
                text = text[: int(min(left, len(text)))]
                left -= len(text)
                yield text
    except UnicodeDecodeError as err:
        raise DataError(f"data file '{path}' is not UTF-8 text: {err.reason} in a chunk") from None


def _parts(path: Path, data: DataConfig, cut: int) -> Iterator[tuple[str, np.ndarray]]:
    """(split, code points) of each chunk, cut at the validation boundary."""
    at = 0
    for text in chunks(path, data):
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        head = max(0, min(len(cps), cut - at))
        if head:
            yield "train", cps[:head]
        if head < len(cps):
            yield "validation", cps[head:]
        at += len(cps)


def key(path: Path, data: DataConfig) -> str:
    st = path.stat()
    inputs = [FORMAT, str(path.resolve()), st.st_size, st.st_mtime_ns, data.newlines]
    inputs += [data.max_chars, data.valid_fraction, data.min_freq, data.max_vocab]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:20]


def build(path: Path, data: DataConfig, folder: Path) -> None:
    total = sum(len(t) for t in chunks(path, data))
    cut = total if data.valid_fraction <= 0 else int(round(total * (1 - data.valid_fraction)))
    if cut == 0:
        raise DataError(f"data file '{path}' gives an empty training text")
    counts = {split: np.zeros(CODE_POINTS, np.int64) for split in ("train", "validation")}
    for split, cps in _parts(path, data, cut):
        counts[split] += np.bincount(cps, minlength=CODE_POINTS)
    extra = as_counter(counts["validation"]).keys()
    vocab = Vocab.build(as_counter(counts["train"]), data.min_freq, data.max_vocab, extra=extra)
    lut = vocab.lookup_table()
    dtype = vocab.dtype()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        names = ["train"] + (["validation"] if data.valid_fraction > 0 else [])
        files = {name: open(work / f"{name}.bin", "wb") for name in names}
        try:
            for split, cps in _parts(path, data, cut):
                files[split].write(memoryview(np.ascontiguousarray(lut[cps].astype(dtype))))
        finally:
            for f in files.values():
                f.close()
        splits = {}
        for name in names:
            p = work / f"{name}.bin"
            length = p.stat().st_size // dtype.itemsize
            splits[name] = {"file": p.name, "length": length, "bytes": p.stat().st_size}
            splits[name]["sha256"] = sha256_of(p)
        meta = {"format": FORMAT, "source": str(path), "vocab": vocab.to_list()}
        meta.update(dtype=dtype.name, splits=splits)
        (work / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        replace_dir(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare(path: Path, data: DataConfig, log=print, full_check: bool = False) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.name)
    folder = cache_dir(data) / "text" / f"{slug}-{key(path, data)}"
    if verify(folder, full=full_check) is not None:
        log(f"prepared text: reusing {folder}")
        return folder
    build(path, data, folder)
    log(f"prepared text: {folder}")
    return folder
