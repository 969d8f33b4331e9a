"""data.source=hf: ../shared/data/songci through `datasets` (offline), prepared once into
memory-mapped id files, reused, rebuilt when damaged, trained on by 2 torchrun ranks."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA_DIR, ROOT, load_ckpt, metrics, sub_env, torchrun

from pipeline.__main__ import main
from pipeline.config import DataConfig
from pipeline.data import builder, idcache
from pipeline.data import hf as hfdata
from pipeline.data.corpus import load_corpus

SONGCI = DATA_DIR / "songci"


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory):
    """One Hugging Face cache for the session: parquet -> Arrow happens once."""
    import datasets

    home = tmp_path_factory.mktemp("hf_home")
    saved = os.environ.get("HF_HOME"), datasets.config.HF_DATASETS_CACHE
    os.environ["HF_HOME"] = str(home)
    datasets.config.HF_DATASETS_CACHE = home / "datasets"  # read when load_dataset runs
    yield home
    if saved[0] is None:
        os.environ.pop("HF_HOME", None)
    else:
        os.environ["HF_HOME"] = saved[0]
    datasets.config.HF_DATASETS_CACHE = saved[1]


def songci(cache: Path, **kw) -> DataConfig:
    return DataConfig(source="hf", path=str(SONGCI), cache_dir=str(cache), **kw)


def joined_split(split: str) -> str:
    """The split's documents joined by "\\n", read with pyarrow alone (not through datasets)."""
    files = sorted((SONGCI / "data").glob(f"{split}-*.parquet"))
    return "\n".join(t for f in files for t in pq.read_table(f).column("text").to_pylist())


def expected_decode(text: str, vocab) -> str:
    return "".join(c if c in vocab.stoi else "<unk>" for c in text)


@pytest.fixture(scope="module")
def prepared(hf_home, tmp_path_factory):
    """songci with min_freq=2, prepared once for the module (num_proc=1)."""
    cache = tmp_path_factory.mktemp("prepared")
    data = songci(cache, min_freq=2)
    corpus = load_corpus(data)
    (folder,) = (cache / "hf").iterdir()
    return data, folder, corpus


def test_prepared_ids_decode_to_joined_text_with_unk(prepared):
    data, folder, corpus = prepared
    vocab = corpus.vocab
    train_text = joined_split("train")
    assert vocab.itos[0] == "<unk>" and vocab.unk == 0
    counts = Counter(train_text)
    seen_once = {c for c, n in counts.items() if n == 1}
    assert seen_once and not seen_once & set(vocab.itos)  # rare chars have no id of their own
    assert set(vocab.itos[1:]) == {c for c, n in counts.items() if n >= 2}  # training split only
    for split in ("train", "validation", "test"):
        ids = corpus.splits[split]
        assert isinstance(ids, np.memmap) and ids.dtype == np.uint16 and not ids.flags.writeable
        assert vocab.decode(ids) == expected_decode(joined_split(split), vocab), split
    valid_only = set(joined_split("validation")) - set(train_text)
    assert valid_only  # songci's validation split has characters the training split lacks
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    assert meta["vocab"] == vocab.itos and meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["length"] == len(train_text)


def test_max_chars_keeps_the_first_characters(hf_home, tmp_path):
    corpus = load_corpus(songci(tmp_path, max_chars=5000))
    for split in ("train", "validation", "test"):
        ids = corpus.splits[split]
        assert len(ids) == 5000
        assert corpus.vocab.decode(ids) == expected_decode(joined_split(split)[:5000], corpus.vocab)
    assert set(corpus.vocab.itos) - {"<unk>"} == set(joined_split("train")[:5000])


def test_second_prepare_reuses_cache_without_tokenizing(prepared, tmp_path, monkeypatch, capsys):
    """`prepare` through the CLI (num_proc=2), then again with counting and writing
    disabled: the folder is reused byte for byte, files untouched."""
    _, folder, corpus = prepared
    args = [
        "prepare",
        "--config",
        str(ROOT / "configs/songci.yaml"),
        f"data.cache_dir={tmp_path}",
        "data.min_freq=2",
        "data.num_proc=2",
    ]
    assert main(args) == 0
    (built,) = (tmp_path / "hf").iterdir()
    assert built.name == folder.name  # same key: num_proc does not change the ids
    for split, ids in corpus.splits.items():  # two worker processes give the one-process result
        assert np.array_equal(np.fromfile(built / f"{split}.bin", dtype=np.uint16), ids)
    mtimes = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}

    def forbidden(*a, **k):
        raise AssertionError("tokenization ran although the cache was valid")

    monkeypatch.setattr(builder, "_count", forbidden)
    monkeypatch.setattr(builder, "_write", forbidden)
    capsys.readouterr()
    assert main(args) == 0
    assert f"reusing {built}" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == mtimes


def test_a_job_start_reads_no_prepared_file(prepared, monkeypatch, capsys):
    """Start-up checks the meta record and the sizes: no file is hashed or read whole and
    the dataset is not loaded (a local folder's key comes from its files' names, sizes and
    times), so it takes the same time for any corpus size; `prepare --verify` hashes every
    file."""
    data, folder, _ = prepared

    def forbidden(*a, **k):
        raise AssertionError("a prepared file was hashed at a job start")

    monkeypatch.setattr(idcache, "sha256_of", forbidden)
    monkeypatch.setattr(hfdata, "open_dataset", forbidden)  # nor the dataset loaded
    corpus = load_corpus(data)
    assert f"reusing {folder}" in capsys.readouterr().out and len(corpus.splits["train"]) > 0
    with pytest.raises(AssertionError, match="hashed"):
        main(["prepare", "--config", str(ROOT / "configs/songci.yaml"), "--verify",
              f"data.cache_dir={folder.parent.parent}", "data.min_freq=2"])  # fmt: skip


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "bad_meta"])
def test_damaged_cache_is_detected_and_rebuilt(prepared, tmp_path, damage, capsys):
    data, folder, corpus = prepared
    copy = tmp_path / "hf" / folder.name
    shutil.copytree(folder, copy)
    if damage == "flip_byte":  # same size: only the sha256 can tell
        with open(copy / "train.bin", "r+b") as f:
            f.seek(1000)
            b = f.read(1)
            f.seek(1000)
            f.write(bytes([b[0] ^ 0xFF]))
    elif damage == "truncate":
        with open(copy / "validation.bin", "r+b") as f:
            f.truncate(100)
    else:
        (copy / "meta.json").write_text("{", encoding="utf-8")
    # a job start checks sizes and meta; a flipped byte takes the full check (prepare --verify)
    full = damage == "flip_byte"
    if full:
        load_corpus(songci(tmp_path, min_freq=2))
        assert "reusing" in capsys.readouterr().out
    rebuilt = load_corpus(songci(tmp_path, min_freq=2), full_check=full)
    assert "is damaged; rebuilding" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "hf").iterdir()] == [folder.name]  # no leftovers
    assert idcache.verify(copy, full=True) is not None
    assert rebuilt.vocab.itos == corpus.vocab.itos
    for split, ids in corpus.splits.items():
        assert np.array_equal(rebuilt.splits[split], ids)


@pytest.mark.slow
def test_two_ranks_train_on_prepared_songci(hf_home, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = [
        "train",
        "--config",
        "configs/songci_cpu.yaml",
        f"run.dir={run_dir}",
        f"data.cache_dir={cache}",
        "data.max_chars=60000",
        "data.num_proc=1",
        "model.hidden_size=32",
        "model.embedding_size=16",
        "model.num_layers=1",
        "model.tie_weights=false",
        "model.adaptive_cutoffs=[]",
        "train.batch_size=8",
        "train.num_steps=16",
        "train.max_steps=8",
        "train.amp=off",
        "train.lr=0.02",
        "train.warmup_steps=0",
        "train.schedule=constant",
        "train.time_budget=0",
        "train.log_every=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "eval.batch_size=4",
        "generate.prefixes=[]",
        "logging.wandb.mode=disabled",
        "logging.progress=lines",
    ]
    proc = torchrun(2, args, timeout=240, env=sub_env(HF_HOME=hf_home))
    (folder,) = (cache / "hf").iterdir()  # one folder: built once, shared by both ranks
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    # every rank that prepares says so (built or reused): one node, one preparing rank
    assert proc.stdout.count("prepared data:") == 1, proc.stdout
    ckpt = load_ckpt(run_dir)
    assert ckpt["step"] == 8 and ckpt["world_size"] == 2
    assert ckpt["vocab"] == meta["vocab"]
    val = [e["val/perplexity"] for e in metrics(run_dir, "val/perplexity")]
    assert val and math.isfinite(val[-1]) and val[-1] < len(meta["vocab"]) / 2  # it learned
    assert all(e["world_size"] == 2 for e in metrics(run_dir, "train/loss"))


# ---------------------------------------------------------------- clear errors (exit 2)


def prepare_error(capsys, *overrides: str) -> str:
    capsys.readouterr()
    assert (
        main(
            [
                "prepare",
                "--config",
                str(ROOT / "configs/songci.yaml"),
                "data.num_proc=1",
                *overrides,
            ]
        )
        == 2
    )
    return capsys.readouterr().err


def test_missing_text_field_lists_columns(hf_home, capsys):
    err = prepare_error(capsys, "data.text_field=body")
    assert "data.text_field" in err and "'body'" in err
    assert all(c in err for c in ("'text'", "'title'", "'author'", "'collection'"))


def test_missing_split_lists_splits(hf_home, capsys):
    err = prepare_error(capsys, "data.valid_split=dev")
    assert "no split 'dev'" in err and "'validation'" in err and "data.valid_split=none" in err


def tiny_dataset(root: Path, splits: dict) -> Path:
    (root / "data").mkdir(parents=True)
    for split, columns in splits.items():
        pq.write_table(pa.table(columns), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_empty_split_is_an_error(hf_home, tmp_path, capsys):
    tiny = tiny_dataset(
        tmp_path / "tiny",
        {"train": {"text": ["春风又绿", "明月几时有"]}, "validation": {"text": ["", None]}},
    )
    err = prepare_error(
        capsys, f"data.path={tiny}", "data.test_split=''", f"data.cache_dir={tmp_path / 'cache'}"
    )
    assert "split 'validation'" in err and "empty" in err


def test_non_text_column_is_an_error(hf_home, tmp_path, capsys):
    tiny = tiny_dataset(tmp_path / "tiny", {"train": {"text": ["春风"], "n": [1]}})
    err = prepare_error(
        capsys,
        f"data.path={tiny}",
        "data.text_field=n",
        "data.valid_split=''",
        "data.test_split=''",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert "data.text_field" in err and "'n'" in err and "not text" in err


def test_unknown_hub_id_offline_says_so(hf_home, capsys):
    err = prepare_error(capsys, "data.path=nobody-here/no-such-lyrics")
    assert "nobody-here/no-such-lyrics" in err and "offline" in err
    assert str(hf_home) in err  # where the cache is


def test_unset_data_dir_names_the_key(hf_home, monkeypatch, capsys):
    monkeypatch.delenv("PIPELINE_DATA_DIR")
    err = prepare_error(capsys)
    assert "data.path" in err and "PIPELINE_DATA_DIR" in err


def test_split_too_short_for_the_batch_says_the_minimum(hf_home, tmp_path, capsys):
    capsys.readouterr()
    rc = main(
        [
            "train",
            "--config",
            str(ROOT / "configs/songci_cpu.yaml"),
            "data.max_chars=3000",
            f"run.dir={tmp_path / 'run'}",
            "data.num_proc=1",
            "logging.wandb.mode=disabled",
            "train.sampling=random",
            "train.batch_size=64",
            "train.num_steps=64",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "3000 characters" in err and "at least 4097" in err  # random windows: 64 x 64 + 1


def split_into_files(tmp_path: Path, parts: int) -> Path:
    """songci's train split as `parts` parquet files (and its validation split as is): a
    local dataset a stream shards by file."""
    folder = tmp_path / "songci_parts"
    (folder / "data").mkdir(parents=True)
    table = pq.read_table(next((SONGCI / "data").glob("train-*.parquet")))
    per = -(-table.num_rows // parts)
    for k in range(parts):
        pq.write_table(
            table.slice(k * per, per), folder / "data" / f"train-{k:05d}-of-{parts:05d}.parquet"
        )
    shutil.copy(next((SONGCI / "data").glob("validation-*.parquet")), folder / "data")
    return folder


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_stream_prepares_the_same_ids_without_an_arrow_copy(hf_home, tmp_path, num_proc):
    """data.streaming=true reads the parquet files as they are (shards by file, num_proc
    processes): the vocabulary and ids equal the non-streaming preparation of the same
    files, and no Arrow file appears in the Hugging Face cache."""
    import datasets

    source = split_into_files(tmp_path, parts=3)
    cache = datasets.config.HF_DATASETS_CACHE
    before = set(Path(cache).rglob("*.arrow")) if Path(cache).exists() else set()
    common = dict(source="hf", path=str(source), test_split="", min_freq=2)
    streamed = load_corpus(
        DataConfig(**common, streaming=True, num_proc=num_proc, cache_dir=str(tmp_path / "s"))
    )
    after = set(Path(cache).rglob("*.arrow")) if Path(cache).exists() else set()
    assert after == before  # the stream made no Arrow copy
    plain = load_corpus(DataConfig(**common, cache_dir=str(tmp_path / "p")))
    assert streamed.vocab.itos == plain.vocab.itos
    for split, ids in plain.splits.items():
        assert np.array_equal(streamed.splits[split], ids), split


def test_a_stream_with_max_chars_keeps_the_first_characters(hf_home, tmp_path):
    common = dict(source="hf", path=str(SONGCI), max_chars=5000, test_split="")
    streamed = load_corpus(DataConfig(**common, streaming=True, cache_dir=str(tmp_path / "s")))
    plain = load_corpus(DataConfig(**common, cache_dir=str(tmp_path / "p")))
    assert len(streamed.splits["train"]) == 5000
    for split, ids in plain.splits.items():
        assert np.array_equal(streamed.splits[split], ids), split
