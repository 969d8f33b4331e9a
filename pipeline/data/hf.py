"""Hugging Face datasets as a source of the preparation path (`data.source: hf`).

    python -m pipeline prepare --config configs/songci.yaml        # once, ahead of a job
    torchrun --standalone --nproc_per_node=2 -m pipeline train --config configs/songci.yaml

`data.path` is a Hub id or a local dataset folder, loaded with `datasets.load_dataset`
(streamed with data.streaming). This module owns what is particular to datasets: which split
comes from where (`plan_splits`: a dataset's own, or held out of train by whole documents,
`carve`), the cache key (the datasets' fingerprints with every option that changes the ids,
so a later run reuses the folder without reading the text; a local folder's key and plan
come from its files, without loading it), and the documents joined by `data.separator` in
data.num_proc contiguous shards of each split (`HFSource`, `Documents`). pipeline/data/builder.py
counts them, builds the vocabulary (from the training split alone, `<unk>` for the rest) and
writes one flat file of ids per split into the prepared-id cache (pipeline/data/idcache.py):

    <cache>/hf/<dataset>-<key>/meta.json    vocab, dtype, per split: file, length, bytes, sha256
    <cache>/hf/<dataset>-<key>/train.bin    (validation.bin, test.bin)

Local rank 0 checks it (sizes at a job start; sha256 with `prepare --verify`) or builds it
while the other ranks of its node wait; then every rank opens the files read-only with
numpy.memmap, and streams.py slices only its own rows from them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.common import DataError, cache_dir
from pipeline.data.idcache import FORMAT

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


@dataclass
class Documents:
    """A piece (pipeline/data/builder.py): contiguous documents of one split, joined as in the
    split's text (`first`: the index of the first one in the split), the first `limit`
    characters when > 0. Memory: one batch of documents."""

    split: str
    ds: object
    first: int
    data: DataConfig
    limit: int

    def chunks(self):
        data, left = self.data, self.limit or float("inf")
        for lo, texts in text_batches(self.ds, data.text_field):
            own = sum(len(t or "") for t in texts)
            text = join_batch(texts, self.first + lo, data.separator, data.newlines)
            text = text[: int(min(left, len(text)))]
            yield self.split, text, own
            left -= len(text)
            if left <= 0:
                break


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


class HFSource:
    """A Hugging Face dataset as a source: its splits planned, its cache folder keyed
    without loading it (a local folder), its documents in data.num_proc contiguous shards
    of each split (a held-out split carved out of train first, by whole documents)."""

    label = "prepared data"
    in_memory = False  # always prepared into the id cache

    def __init__(self, data: DataConfig):
        self.data, self.splits, self.shards = data, None, {}

    def locate(self) -> tuple[Path, str]:
        data = self.data
        if Path(data.path).expanduser().is_dir():
            self.plan = plan_splits(data, local_split_names(data))
        else:
            self.plan, self.splits = open_dataset(data)
        key, self.inputs = cache_key(data, self.plan, self.splits)
        return prepared_dir(data, key), self.plan.line

    def open(self) -> None:
        if self.splits is None:
            _, self.splits = open_dataset(self.data, self.plan)

    def pieces(self) -> tuple[list[str], list[Documents]]:
        data, plan = self.data, self.plan
        parts = {k: (ds, data.max_chars) for k, ds in self.splits.items()}
        if plan.held_out:
            parts.update(carve(data, plan, self.splits["train"]))
        carved = {"train", *plan.held_out} if plan.held_out else set()
        for name, (ds, limit) in parts.items():
            self.shards[name] = _shards(ds, data, limit, name in carved)
        pieces = [
            Documents(name, d, lo, data, parts[name][1])
            for name, shards in self.shards.items()
            for lo, d in shards
        ]
        return list(parts), pieces

    def check(self, split: str, own: int) -> None:
        if own == 0:
            data, train = self.data, self.plan.source["train"]
            label = self.plan.source.get(split) or f"{split}' (held out of '{train}"
            raise DataError(
                f"split '{label}' of dataset '{data.path}' is empty: its "
                f"{_rows(self.shards[split])} rows have no text in column '{data.text_field}'"
            )

    def meta(self, splits: list[str]) -> tuple[dict, dict[str, dict]]:
        return {"inputs": self.inputs}, {k: {"documents": _rows(self.shards[k])} for k in splits}


def _rows(shards) -> int | None:
    """Documents in the shards (None for a stream, which does not know before reading)."""
    rows = [getattr(d, "num_rows", None) for _, d in shards]
    return None if None in rows else sum(rows)
