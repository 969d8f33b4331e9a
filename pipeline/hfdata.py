"""Hugging Face datasets as prepared, memory-mapped id files (`data.source: hf`).

    python -m pipeline prepare --config configs/songci.yaml        # once, ahead of a job
    torchrun --standalone --nproc_per_node=2 -m pipeline train --config configs/songci.yaml

`data.path` is a Hub id or a local dataset folder, loaded with `datasets.load_dataset`. The
vocabulary comes from the training split alone (`<unk>` for the rest). Each split becomes one
flat file of ids (uint16 when the vocabulary fits, else uint32), documents joined by
`data.separator`, in a folder of the prepared-data cache:

    <cache>/hf/<dataset>-<key>/meta.json    vocab, dtype, per split: file, length, bytes, sha256
    <cache>/hf/<dataset>-<key>/train.bin    (validation.bin, test.bin)

The key hashes the datasets' fingerprints with every option that changes the ids, so a later run
with the same key reuses the folder without reading the text. The folder is built under a
temporary name and renamed into place whole, so a reader never sees half of it. Local rank 0
checks it (sizes at a job start; sha256 with `prepare --verify`) or builds it while the other
ranks of its node wait; then every rank opens the
files read-only with numpy.memmap, and streams.py slices only its own rows from them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dist
from .config import DataConfig
from .data import Corpus, DataError, cache_dir, sha256_of
from .idcache import FORMAT, replace_dir, shared, verify
from .vocab import CODE_POINTS, Vocab, as_counter, code_point_counts

BATCH = 1000  # documents per batch: bounds memory while preparing


# ---------------------------------------------------------------- loading the dataset

VALID_NAMES = ("validation", "valid", "val", "dev")  # what valid_split=auto looks for, in order
TEST_NAMES = ("test",)
_KEY = {"train": "train_split", "validation": "valid_split", "test": "test_split"}
_FRACTION = {"validation": "valid_fraction", "test": "test_fraction"}


@dataclass(frozen=True)
class Plan:
    """Where each split comes from. `source`: canonical name -> the dataset's own split;
    `held_out`: canonical name -> the fraction of train's documents taken from its end (test
    last, validation just before it); `line`: what the log says, in one line."""

    source: dict[str, str]
    held_out: dict[str, float]
    line: str


def _is_none(value: str) -> bool:
    return value.lower() in ("", "none", "null")


def plan_splits(data: DataConfig, available: list[str]) -> Plan:
    """The splits this config takes from a dataset with `available` splits. A split the
    config names and the dataset lacks is a DataError; `auto` takes the first common name
    there, else holds out data.valid_fraction (data.test_fraction) of train's documents."""
    if data.train_split not in available:
        raise DataError(
            f"config key 'data.train_split': dataset '{data.path}' has no split "
            f"'{data.train_split}' (available: {sorted(available)})"
        )
    source, held_out = {"train": data.train_split}, {}
    said = [f"train '{data.train_split}'"]
    for canon, names in (("validation", VALID_NAMES), ("test", TEST_NAMES)):
        key, fkey = _KEY[canon], _FRACTION[canon]
        wanted, fraction = getattr(data, key), getattr(data, fkey)
        found = None
        if wanted == "auto":
            found = next((n for n in names if n in available), None)
        elif not _is_none(wanted):
            if wanted not in available:
                raise DataError(
                    f"config key 'data.{key}': dataset '{data.path}' has no split '{wanted}' "
                    f"(available: {sorted(available)}); set data.{key}=none to go without "
                    f"it, or data.{key}=auto to hold out data.{fkey} of train when the "
                    f"dataset has no {'/'.join(names)} split"
                )
            found = wanted
        if found is not None:
            source[canon] = found
            unused = f" (data.{fkey}={fraction:g} unused: the dataset has one)" if fraction else ""
            said.append(f"{canon} '{found}'{unused}")
        elif fraction > 0:
            held_out[canon] = fraction
            said.append(f"{canon} held out: the last {fraction * 100:g}% of train's documents")
        else:
            why = "the dataset has none" if wanted == "auto" else f"data.{key}=none"
            said.append(f"no {canon} split ({why}; data.{fkey}=0.1 holds one out of train)")
    return Plan(source, held_out, "data splits: " + "; ".join(said))


def _hf_cache() -> str:
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)


def _local(data: DataConfig) -> Path | None:
    """The local dataset folder data.path names (None for a Hub id), or a DataError."""
    local = Path(data.path).expanduser()
    looks_local = local.exists() or data.path.startswith(("/", ".", "~"))
    if looks_local and not local.is_dir():
        raise DataError(
            f"config key 'data.path': local dataset folder '{data.path}' does not exist"
        )
    return local if looks_local else None


def _loading(data: DataConfig, load):
    """`load()` (a datasets call on data.path), its errors as one-line DataErrors."""
    import datasets

    try:
        return load()
    except (ConnectionError, FileNotFoundError) as err:
        if datasets.config.HF_HUB_OFFLINE:
            raise DataError(
                f"config key 'data.path': '{data.path}' is not a local folder and not "
                f"in the Hugging Face cache at {_hf_cache()}, and datasets is offline "
                f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1), so it cannot be downloaded; "
                f"run once online or point data.path at a local folder"
            ) from None
        raise DataError(f"config key 'data.path': could not load '{data.path}': {err}") from None
    except datasets.exceptions.DatasetGenerationError as err:
        raise DataError(
            f"config key 'data.path': could not read the files of '{data.path}': "
            f"{err.__cause__ or err}"
        ) from None
    except ValueError as err:  # e.g. an unknown or a missing config name
        key = "data.name" if data.name or "config name" in str(err) else "data.path"
        raise DataError(
            f"config key '{key}': could not load '{data.path}' (config "
            f"'{data.name}'): {str(err).splitlines()[0]}"
        ) from None


def local_split_names(data: DataConfig) -> list[str]:
    """A local folder's split names from its files (datasets' own rules: file names, or the
    README's configs), without loading it: a job start on a prepared corpus stays cheap."""
    import datasets

    where, name = str(_local(data)), data.name or None
    builder = _loading(data, lambda: datasets.load_dataset_builder(where, name))
    return list(builder.config.data_files or builder.info.splits or {})


def open_dataset(data: DataConfig, plan: Plan | None = None) -> tuple[Plan, dict]:
    """The plan (made from the dataset's splits unless given) and its source splits as
    `datasets.Dataset`s (IterableDatasets when streaming), by canonical name; or a DataError."""
    import datasets

    local = _local(data)
    where = str(local) if local is not None else data.path
    dd = _loading(
        data, lambda: datasets.load_dataset(where, data.name or None, streaming=data.streaming)
    )
    plan = plan or plan_splits(data, list(dd))
    out = {}
    for canon, name in plan.source.items():
        if name not in dd:  # the folder changed since its plan was made
            raise DataError(
                f"dataset '{data.path}' has no split '{name}' (available: {sorted(dd)})"
            )
        ds = dd[name]
        if data.streaming:  # no Arrow copy: the documents come from the source files
            out[canon] = _checked_stream(ds, name, data)
            continue
        if data.text_field not in ds.column_names:
            raise DataError(
                f"config key 'data.text_field': split '{name}' of '{data.path}' has no "
                f"column '{data.text_field}' (available: {ds.column_names})"
            )
        feature = ds.features[data.text_field]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise DataError(
                f"config key 'data.text_field': column '{data.text_field}' of split "
                f"'{name}' holds {feature}, not text"
            )
        if ds.num_rows == 0:
            raise DataError(f"split '{name}' of dataset '{data.path}' is empty (0 rows)")
        out[canon] = ds
    return plan, out


def _checked_stream(ds, name: str, data: DataConfig):
    columns = list(ds.features or {})
    if ds.features is not None and data.text_field not in columns:
        raise DataError(
            f"config key 'data.text_field': split '{name}' of '{data.path}' has no "
            f"column '{data.text_field}' (available: {columns})"
        )
    return ds


def source_fingerprint(data: DataConfig, ds) -> str:
    """What identifies the source: for a local folder its files' names, sizes and times (read
    without loading the dataset, so a job start on a prepared corpus costs the same for any
    size); for a Hub dataset its fingerprint in the datasets cache (a stream: the id)."""
    local = Path(data.path).expanduser()
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files = [p for p in files if not any(x.startswith(".") for x in p.relative_to(local).parts)]
        stats = [(str(p.relative_to(local)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return hashlib.sha256(json.dumps([data.path, data.name, stats]).encode()).hexdigest()
    return getattr(ds, "_fingerprint", None) or f"{data.path}/{data.name}"


def cache_key(data: DataConfig, plan: Plan, splits: dict | None) -> tuple[str, dict]:
    """Everything that changes the prepared ids, hashed. The fingerprints change with the
    dataset's files, the rest with the config (`splits`: None for a local folder). A held-out
    split adds its fractions (only then: the keys of datasets that give their own splits
    stay as they were)."""
    inputs = {
        "format": FORMAT,
        "path": data.path,
        "name": data.name,
        "fingerprints": {
            k: source_fingerprint(data, splits[k] if splits else None) for k in plan.source
        },
        "splits": plan.source,
        "text_field": data.text_field,
        "separator": data.separator,
        "newlines": data.newlines,
        "max_chars": data.max_chars,
        "min_freq": data.min_freq,
        "max_vocab": data.max_vocab,
    }
    if plan.held_out:
        inputs["held_out"] = plan.held_out
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return digest[:20], inputs


def prepared_dir(data: DataConfig, key: str) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(data.path).name)
    return cache_dir(data) / "hf" / f"{slug or 'dataset'}-{key}"


# ---------------------------------------------------------------- text -> ids


def join_batch(texts: list[str], first_index: int, sep: str, newlines: str) -> str:
    """Documents of one batch as they appear in the split's joined text: `sep` precedes every
    document but the split's first, so batches concatenate to sep.join(all documents)."""
    texts = [t or "" for t in texts]  # a missing (null) text is an empty document
    joined = "".join(t if first_index + j == 0 else sep + t for j, t in enumerate(texts))
    if newlines == "space":  # as corpus.preprocess: the chapter's replace('\n', ' ')
        joined = joined.replace("\n", " ").replace("\r", " ")
    return joined


def text_batches(ds, field: str):
    """(index of the first document, texts) for consecutive batches of BATCH documents."""
    lo = 0
    for batch in ds.select_columns([field]).iter(batch_size=BATCH):
        yield lo, batch[field]
        lo += len(batch[field])


def _document_starts(ds, data: DataConfig) -> tuple[int, np.ndarray | None]:
    """How many documents of the split data.max_chars keeps (all, without it; else those that
    start within its first max_chars characters), and (with max_chars) where each starts in
    the split's joined text. A dataset knows its rows; a stream is read once to count them."""
    if not data.streaming and not data.max_chars:
        return ds.num_rows, None
    sep, n, begin, kept = len(data.separator), 0, 0, []
    for _, texts in text_batches(ds, data.text_field):
        if not data.max_chars:
            n += len(texts)
            continue
        lens = np.fromiter((len(t or "") for t in texts), np.int64, len(texts))
        starts = begin + np.concatenate([[0], np.cumsum(lens + sep)[:-1]])
        begin = int(starts[-1] + lens[-1] + sep)
        kept.append(starts[starts < data.max_chars])
        if len(kept[-1]) < len(starts):
            break
    if not data.max_chars:
        return n, None
    starts = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    return len(starts), starts


def carve(data: DataConfig, plan: Plan, train) -> dict[str, tuple[object, int]]:
    """train's documents in order cut into train, then validation, then test: each held-out
    split is the last max(1, round(n * fraction)) of the n documents data.max_chars keeps.
    Returns canonical name -> (documents, character limit: 0 = all). Preparation runs once
    per node from the source files alone, so every rank, run and world size gets the same."""
    n, starts = _document_starts(train, data)
    sizes = {k: max(1, round(n * f)) for k, f in plan.held_out.items()}
    n_train = n - sum(sizes.values())
    if n_train < 1:
        asked = ", ".join(f"data.{_FRACTION[k]}={f:g}" for k, f in plan.held_out.items())
        raise DataError(
            f"split '{plan.source['train']}' of dataset '{data.path}' has {n} documents"
            f"{' within data.max_chars' if data.max_chars else ''}: too few to hold out "
            f"{asked} and keep one to train on"
        )
    out, lo = {}, 0
    for name, size in [("train", n_train), *((k, sizes[k]) for k in _FRACTION if k in sizes)]:
        part = train.skip(lo).take(size) if data.streaming else train.select(range(lo, lo + size))
        # the split's character cut falls in its last part; earlier parts end before it
        out[name] = (part, int(data.max_chars - starts[lo]) if data.max_chars else 0)
        lo += size
    return out


def _shard_pass(job: dict) -> dict:
    """One contiguous shard of a split, in one process. Without `lut`: the code-point counts
    of its joined text (the first `limit` characters when > 0) and how many of the documents'
    own characters it has; with `lut`: its ids written into `path` from id `offset` on.
    Memory: one batch of documents and one count per code point, whatever the shard's size."""
    ds, first, data, lut = job["ds"], job["first"], job["data"], job.get("lut")
    left = job.get("limit") or float("inf")
    counts = np.zeros(CODE_POINTS, dtype=np.int64) if lut is None else None
    doc_chars = n = 0
    f = None
    if lut is not None:
        f = open(job["path"], "r+b")
        f.seek(job["offset"] * np.dtype(job["dtype"]).itemsize)
    try:
        for lo, texts in text_batches(ds, data.text_field):
            doc_chars += sum(len(t or "") for t in texts)
            text = join_batch(texts, first + lo, data.separator, data.newlines)
            text = text[: int(min(left, len(text)))]
            if lut is None:
                counts += code_point_counts(text)
            else:
                cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
                ids = lut[cps]
                if (ids >= job["n_vocab"]).any():  # lookup_table's marker: never counted
                    raise DataError("a character is missing from the vocabulary (no <unk>)")
                f.write(memoryview(np.ascontiguousarray(ids.astype(job["dtype"]))))
            n += len(text)
            left -= len(text)
            if left <= 0:
                break
    finally:
        if f is not None:
            f.close()
    return {"counts": counts, "doc_chars": doc_chars, "chars": n}


class _Workers:
    """data.num_proc forked worker processes (as datasets' own map forks), started once for
    both passes over every split; with one, the jobs run here."""

    def __init__(self, num_proc: int):
        self.pool = None
        if num_proc > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context("fork").Pool(num_proc)

    def run(self, jobs: list[dict]) -> list[dict]:
        if self.pool is None or len(jobs) <= 1:
            return [_shard_pass(job) for job in jobs]
        return self.pool.map(_shard_pass, jobs, chunksize=1)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def _shards(ds, data: DataConfig, limit: int, carved: bool) -> list[tuple[int, object]]:
    """(global index of its first document, shard): num_proc contiguous shards (one with a
    character `limit`, whose cut needs the documents in order). A stream shards by its files
    (one shard when `carved` out of a split: its documents are counted, not its files); only
    whether a shard starts the split matters there (the separator goes before every
    document but the split's first), so its later shards are given index 1."""
    if data.streaming:
        k = 1 if limit or carved else max(1, min(data.num_proc, ds.n_shards))
        return [(min(i, 1), ds.shard(num_shards=k, index=i, contiguous=True)) for i in range(k)]
    k = 1 if limit else max(1, min(data.num_proc, ds.num_rows))
    per = -(-ds.num_rows // k)
    return [
        (lo, ds.select(range(lo, min(lo + per, ds.num_rows)))) for lo in range(0, ds.num_rows, per)
    ]


def build(data: DataConfig, plan: Plan, splits: dict, folder: Path, inputs: dict) -> dict:
    """Count, then write every split into `folder` (atomically: a temporary folder renamed
    into place). Both passes run over data.num_proc contiguous shards in parallel; each
    shard's ids go to their own place of the split's file (offsets from the count). A
    held-out split is carved out of train first (by whole documents)."""
    t0 = time.perf_counter()
    pieces = {k: (ds, data.max_chars) for k, ds in splits.items()}
    if plan.held_out:
        pieces.update(carve(data, plan, splits["train"]))
    carved = {"train", *plan.held_out} if plan.held_out else set()
    parts = {k: (lim, _shards(ds, data, lim, k in carved)) for k, (ds, lim) in pieces.items()}
    workers = _Workers(data.num_proc)
    try:
        return _build(data, plan, parts, folder, inputs, workers, t0)
    finally:
        workers.close()


def _build(data, plan, parts, folder, inputs, workers, t0) -> dict:
    counted = {}
    for name, (limit, shards) in parts.items():
        jobs = [{"ds": d, "first": lo, "data": data, "limit": limit} for lo, d in shards]
        counted[name] = workers.run(jobs)
        if sum(r["doc_chars"] for r in counted[name]) == 0:
            train = plan.source["train"]
            label = plan.source.get(name) or f"{name}' (held out of '{train}"
            raise DataError(
                f"split '{label}' of dataset '{data.path}' is "
                f"empty: its {_rows(shards)} rows have no text in column '{data.text_field}'"
            )
    counts = {name: as_counter(sum(r["counts"] for r in rs)) for name, rs in counted.items()}
    extra = set().union(*(c.keys() for k, c in counts.items() if k != "train"))
    vocab = Vocab.build(counts["train"], data.min_freq, data.max_vocab, extra=extra)
    lut, dtype = vocab.lookup_table(), vocab.dtype()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        meta = {
            "format": FORMAT,
            "inputs": inputs,
            "vocab": vocab.to_list(),
            "dtype": dtype.name,
            "splits": {},
        }
        for name, (limit, shards) in parts.items():
            path, sizes = work / f"{name}.bin", [r["chars"] for r in counted[name]]
            with open(path, "wb") as f:
                f.truncate(sum(sizes) * dtype.itemsize)
            offsets = np.cumsum([0, *sizes[:-1]]).tolist()
            jobs = [
                {"ds": d, "first": lo, "data": data, "limit": limit, "lut": lut,
                 "n_vocab": len(vocab), "dtype": dtype.name, "path": path, "offset": off}
                for (lo, d), off in zip(shards, offsets)
            ]  # fmt: skip
            workers.run(jobs)
            info = {"file": path.name, "length": sum(sizes), "bytes": path.stat().st_size}
            info["sha256"] = sha256_of(path)
            meta["splits"][name] = {**info, "documents": _rows(shards)}
        seconds = time.perf_counter() - t0
        chars = sum(s["length"] for s in meta["splits"].values())
        meta["build"] = {
            "seconds": round(seconds, 3),
            "chars_per_s": round(chars / seconds),
            "num_proc": data.num_proc,
        }
        (work / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        replace_dir(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def _rows(shards) -> int | None:
    """Documents in the shards (None for a stream, which does not know before reading)."""
    rows = [getattr(d, "num_rows", None) for _, d in shards]
    return None if None in rows else sum(rows)


def prepare(data: DataConfig, log=print, full_check: bool = False) -> Path:
    """The cached folder for this config, (re)built when missing or damaged. A job start
    checks the meta record and the files' sizes (instant, whatever the corpus; a local
    folder's splits come from its file names, without loading it); the sha256 of every file
    is computed while building, and checked again with `full_check`
    (`python -m pipeline prepare --verify`). Logs the splits' plan in one line."""
    splits = None
    if Path(data.path).expanduser().is_dir():
        plan = plan_splits(data, local_split_names(data))
    else:
        plan, splits = open_dataset(data)
    key, inputs = cache_key(data, plan, splits)
    folder = prepared_dir(data, key)
    log(plan.line)
    if verify(folder, full=full_check) is not None:
        log(f"prepared data: reusing {folder}" + (" (sha256 verified)" if full_check else ""))
        return folder
    if splits is None:
        _, splits = open_dataset(data, plan)
    if folder.exists():
        log(f"prepared data: {folder} is damaged; rebuilding it")
    meta = build(data, plan, splits, folder, inputs)
    b = meta["build"]
    log(f"prepared data: {folder} in {b['seconds']:.1f} s ({b['chars_per_s']:,} characters/s)")
    return folder


def load_hf_corpus(data: DataConfig, dist_ctx=None, full_check: bool = False) -> Corpus:
    """Collective: local rank 0 prepares, the other ranks wait for it (pipeline.idcache)."""
    return shared(lambda: prepare(data, print, full_check), dist_ctx or dist.DistContext())
