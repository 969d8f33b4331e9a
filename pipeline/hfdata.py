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
from collections import Counter
from pathlib import Path

import numpy as np

from . import dist
from .config import DataConfig
from .data import Corpus, DataError, cache_dir
from .idcache import FORMAT, open_prepared, replace_dir, verify, write_ids
from .vocab import UNK, Vocab

BATCH = 1000  # documents per map/iteration batch: bounds memory while preparing


# ---------------------------------------------------------------- loading the dataset


def split_names(data: DataConfig) -> dict[str, str]:
    """Canonical split name -> the dataset's split name; an empty config value drops it."""
    names = {"train": data.train_split, "validation": data.valid_split, "test": data.test_split}
    return {k: v for k, v in names.items() if v}


def _hf_cache() -> str:
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)


def open_dataset(data: DataConfig) -> dict:
    """The configured splits as `datasets.Dataset`s (canonical names), or a DataError."""
    import datasets

    local = Path(data.path).expanduser()
    looks_local = local.exists() or data.path.startswith(("/", ".", "~"))
    if looks_local and not local.is_dir():
        raise DataError(
            f"config key 'data.path': local dataset folder '{data.path}' does not exist"
        )
    try:
        dd = datasets.load_dataset(str(local) if looks_local else data.path, data.name or None)
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
    out = {}
    for canon, name in split_names(data).items():
        if name not in dd:
            key = {"train": "train_split", "validation": "valid_split", "test": "test_split"}[canon]
            raise DataError(
                f"config key 'data.{key}': dataset '{data.path}' has no split '{name}' "
                f"(available: {sorted(dd)}); set data.{key}='' to go without it"
                if canon != "train"
                else f"config key 'data.train_split': dataset '{data.path}' has no split "
                f"'{name}' (available: {sorted(dd)})"
            )
        ds = dd[name]
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
    return out


def cache_key(data: DataConfig, splits: dict) -> tuple[str, dict]:
    """Everything that changes the prepared ids, hashed. The fingerprints change with the
    dataset's files (and where it is cached), the rest with the config."""
    inputs = {
        "format": FORMAT,
        "path": data.path,
        "name": data.name,
        "fingerprints": {k: ds._fingerprint for k, ds in splits.items()},
        "splits": split_names(data),
        "text_field": data.text_field,
        "separator": data.separator,
        "newlines": data.newlines,
        "max_chars": data.max_chars,
        "min_freq": data.min_freq,
        "max_vocab": data.max_vocab,
    }
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
    for lo, batch in zip(
        range(0, ds.num_rows, BATCH), ds.select_columns([field]).iter(batch_size=BATCH)
    ):
        yield lo, batch[field]


def first_documents(ds, data: DataConfig):
    """With data.max_chars, only the documents that reach the first max_chars characters."""
    if not data.max_chars:
        return ds
    total, sep = 0, len(data.separator)
    for lo, texts in text_batches(ds, data.text_field):
        for j, t in enumerate(texts):
            total += len(t or "") + (sep if lo + j else 0)
            if total >= data.max_chars:
                return ds.select(range(lo + j + 1))
    return ds


def count_chars(ds, data: DataConfig) -> tuple[Counter, int]:
    """Character counts of the split's joined text (its first max_chars characters), and how
    many of the documents' own characters (not separators) the split has at all."""
    counts: Counter = Counter()
    left, doc_chars = data.max_chars or float("inf"), 0
    for lo, texts in text_batches(ds, data.text_field):
        doc_chars += sum(len(t or "") for t in texts)
        text = join_batch(texts, lo, data.separator, data.newlines)
        text = text[: int(min(left, len(text)))]
        counts.update(text)
        left -= len(text)
        if left <= 0:
            break
    return counts, doc_chars


def lookup_table(vocab: Vocab) -> np.ndarray:
    """Code point -> id for every code point (missing ones -> <unk>, or an invalid marker)."""
    fill = vocab.unk if vocab.unk is not None else np.iinfo(np.uint32).max
    lut = np.full(0x110000, fill, dtype=np.uint32)
    for i, c in enumerate(vocab.itos):
        if c != UNK:
            lut[ord(c)] = i
    return lut


def _tokenize_batch(batch, indices, field, sep, newlines, lut, n_vocab, dtype):
    """Arrow batch of documents -> one row holding the ids of their joined text."""
    import pyarrow as pa

    text = join_batch(batch.column(field).to_pylist(), indices[0], sep, newlines)
    ids = lut[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    if (ids >= n_vocab).any():  # the marker of lookup_table: only without <unk>, never counted
        raise DataError("a character is missing from the vocabulary (no <unk>); this is a bug")
    ids = ids.astype(dtype)
    return pa.table(
        {"ids": pa.ListArray.from_arrays(pa.array([0, len(ids)], pa.int32()), pa.array(ids))}
    )


def tokenize(
    ds, data: DataConfig, lut: np.ndarray, n_vocab: int, dtype: np.dtype, work: Path, name: str
):
    """Dataset.map(batched, num_proc): one row of ids per batch, rows in document order."""
    return ds.with_format("arrow").map(
        _tokenize_batch,
        batched=True,
        batch_size=BATCH,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=data.num_proc if data.num_proc > 1 else None,
        fn_kwargs=dict(
            field=data.text_field,
            sep=data.separator,
            newlines=data.newlines,
            lut=lut,
            n_vocab=n_vocab,
            dtype=dtype,
        ),
        cache_file_name=str(work / f"{name}.arrow"),
        load_from_cache_file=False,
        # our own fingerprint: datasets need not hash the lookup table (and keeps it short,
        # as datasets appends per-worker suffixes to it)
        new_fingerprint=hashlib.sha256(f"{work}/{name}".encode()).hexdigest()[:32],
        desc=f"tokenize {name}",
    )


def build(data: DataConfig, splits: dict, folder: Path, inputs: dict) -> dict:
    """Tokenize every split into `folder` (atomically: a temporary folder renamed into place)."""
    t0 = time.perf_counter()
    parts = {k: first_documents(ds, data) for k, ds in splits.items()}
    counts = {}
    for name, ds in parts.items():
        counts[name], doc_chars = count_chars(ds, data)
        if doc_chars == 0:
            raise DataError(
                f"split '{split_names(data)[name]}' of dataset '{data.path}' is "
                f"empty: its {ds.num_rows} rows have no text in column "
                f"'{data.text_field}'"
            )
    extra = set().union(*(c.keys() for k, c in counts.items() if k != "train"))
    vocab = Vocab.build(counts["train"], data.min_freq, data.max_vocab, extra=extra)
    lut, dtype = lookup_table(vocab), vocab.dtype()
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
        for name, ds in parts.items():
            mapped = tokenize(ds, data, lut, len(vocab), dtype, work, name)
            chunks = (c.flatten().to_numpy() for c in mapped.data.table.column("ids").chunks)
            info = write_ids(chunks, work / f"{name}.bin", data.max_chars)
            del mapped
            for p in work.glob(f"{name}*.arrow"):  # map's own output, no longer needed
                p.unlink()
            meta["splits"][name] = {**info, "documents": ds.num_rows}
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


def prepare(data: DataConfig, log=print, full_check: bool = False) -> Path:
    """The cached folder for this config, (re)built when missing or damaged. A job start
    checks the meta record and the files' sizes (instant, whatever the corpus); the sha256
    of every file is computed while building, and checked again with `full_check`
    (`python -m pipeline prepare --verify`)."""
    splits = open_dataset(data)
    key, inputs = cache_key(data, splits)
    folder = prepared_dir(data, key)
    if verify(folder, full=full_check) is not None:
        log(f"prepared data: reusing {folder}" + (" (sha256 verified)" if full_check else ""))
        return folder
    if folder.exists():
        log(f"prepared data: {folder} is damaged; rebuilding it")
    meta = build(data, splits, folder, inputs)
    b = meta["build"]
    log(f"prepared data: {folder} in {b['seconds']:.1f} s ({b['chars_per_s']:,} characters/s)")
    return folder


def load_hf_corpus(data: DataConfig, dist_ctx=None, full_check: bool = False) -> Corpus:
    """Collective: every rank calls it. Local rank 0 prepares; the others wait for its folder
    (errors travel with it, so every rank raises the same DataError instead of hanging)."""
    ctx = dist_ctx or dist.DistContext()
    result: tuple[str | None, str | None] = (None, None)
    if ctx.local_rank == 0:  # one line per node that prepares: "reusing" or "built"
        try:
            result = (str(prepare(data, print, full_check)), None)
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
