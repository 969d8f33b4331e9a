"""Hugging Face corpora as they come (data.source=hf): local folders of JSON lines, CSV and
parquet with train only, train + validation, and all three splits, read through `datasets`
(offline) and streamed. A split the dataset lacks is held out of train's last documents by
data.valid_fraction / data.test_fraction (the same ids on every rank, run and world size),
looked up under its common names otherwise, an error when the config names it; an empty
value means "none"; the held-out split is part of the prepared-id cache key; data.max_chars
keeps the first N characters of each source text before anything is held out of it."""

from __future__ import annotations

import csv
import json
import math
import random
import shlex
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    ROOT,
    assert_same_params_across_world_sizes,
    load_ckpt,
    metrics,
    run_cli,
    sub_env,
    torchrun,
)

from pipeline.__main__ import main
from pipeline.config import DataConfig
from pipeline.data import hf as hfdata
from pipeline.data.corpus import load_corpus

ALPHABET = "春花秋月何时了往事知多少小楼昨夜又东风故国不堪回首明中雕栏玉砌应犹在只是朱颜改问君能有几愁恰似一江水向流"


def lyrics(n: int, seed: int) -> list[str]:
    """n songs of 5 to 60 characters (a line break in some), reproducible."""
    rng = random.Random(seed)
    songs = []
    for _ in range(n):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(5, 60)))
        cut = rng.randint(0, len(text))
        songs.append(text[:cut] + "\n" + text[cut:] if rng.random() < 0.3 else text)
    return songs


SPLITS = {"train": lyrics(120, 1), "validation": lyrics(15, 2), "test": lyrics(12, 3)}
LAYOUTS = {  # layout -> the splits its folder has
    "train_only": ("train",),
    "train_validation": ("train", "validation"),
    "all_three": ("train", "validation", "test"),
}
# the file name of each split: datasets maps dev/valid to 'validation' by file name
FILE_NAME = {"train": "train", "validation": "dev", "test": "test"}


def write_split(folder: Path, fmt: str, stem: str, docs: list[str]) -> None:
    rows = [{"lyrics": d, "artist": f"a{i % 7}"} for i, d in enumerate(docs)]
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        with open(folder / f"{stem}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif fmt == "csv":
        with open(folder / f"{stem}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["lyrics", "artist"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{stem}.parquet")


def dataset(tmp_path: Path, fmt: str, layout: str) -> Path:
    folder = tmp_path / f"{layout}_{fmt}"
    for split in LAYOUTS[layout]:
        write_split(folder, fmt, FILE_NAME[split], SPLITS[split])
    return folder


def hf(folder: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(
        source="hf", path=str(folder), text_field="lyrics", cache_dir=str(cache), **kw
    )


def expected_decode(text: str, vocab) -> str:
    return "".join(c if c in vocab.stoi else "<unk>" for c in text)


def held_out(docs: list[str], *fractions: float) -> list[list[str]]:
    """docs cut as the pipeline cuts them: train first, then a part per fraction, each the
    last max(1, round(n * f)) documents in that order."""
    sizes = [max(1, round(len(docs) * f)) for f in fractions]
    cuts = np.cumsum([len(docs) - sum(sizes), *sizes]).tolist()
    return [docs[lo:hi] for lo, hi in zip([0, *cuts[:-1]], cuts)]


def hf_args(tmp_path: Path, folder: Path) -> list[str]:
    """`--config` (a file that names no split) and overrides for `folder`."""
    config = tmp_path / "hf.yaml"
    config.write_text("data: {source: hf, text_field: lyrics}\n", encoding="utf-8")
    return ["--config", str(config), f"data.path={folder}"]


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_home" / "datasets")
    return tmp_path / "hf_home"


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_prepares_as_it_comes(hf_home, tmp_path, fmt, layout, capsys):
    """With the defaults (valid_split/test_split auto) and data.valid_fraction=0.1: a
    dataset's own validation and test splits are used as they are; a train-only one gets the
    last 10% of its documents held out for validation; no test split is one log line."""
    folder = dataset(tmp_path, fmt, layout)
    corpus = load_corpus(hf(folder, tmp_path / "cache", valid_fraction=0.1))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data splits:"))
    has = LAYOUTS[layout]
    if "validation" in has:
        expected = {"train": SPLITS["train"], "validation": SPLITS["validation"]}
        assert "data.valid_fraction=0.1 unused" in line
    else:
        train, valid = held_out(SPLITS["train"], 0.1)
        assert len(valid) == 12 and len(train) == 108
        expected = {"train": train, "validation": valid}
        assert "validation held out: the last 10% of train's documents" in line
    if "test" in has:
        expected["test"] = SPLITS["test"]
    else:
        assert "no test split (the dataset has none; data.test_fraction=0.1 holds" in line
    assert sorted(corpus.splits) == sorted(expected)
    for split, docs in expected.items():
        text = "\n".join(docs)
        assert corpus.vocab.decode(corpus.splits[split]) == expected_decode(text, corpus.vocab)
    assert set(corpus.vocab.itos) - {"<unk>"} == set("\n".join(expected["train"]))


def test_test_fraction_holds_out_test_after_validation(hf_home, tmp_path, capsys):
    folder = dataset(tmp_path, "json", "train_only")
    data = hf(folder, tmp_path / "cache", valid_fraction=0.1, test_fraction=0.05)
    corpus = load_corpus(data)
    train, valid, test = held_out(SPLITS["train"], 0.1, 0.05)
    assert (len(train), len(valid), len(test)) == (102, 12, 6)
    for split, docs in {"train": train, "validation": valid, "test": test}.items():
        assert corpus.vocab.decode(corpus.splits[split]) == "\n".join(docs), split
    assert "test held out: the last 5% of train's documents" in capsys.readouterr().out


def test_common_validation_names_and_explicit_splits(hf_home, tmp_path, capsys):
    """A split called 'dev' (named in the README's configs, so datasets keeps the name) is
    the validation split under auto; naming it works too; naming a split the dataset lacks
    is exit 2, and the override the message suggests works when typed into a shell."""
    folder = tmp_path / "named"
    write_split(folder / "data", "json", "a", SPLITS["train"])
    write_split(folder / "data", "json", "b", SPLITS["validation"])
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/a.jsonl\n  - split: dev\n    path: data/b.jsonl\n---\n",
        encoding="utf-8",
    )
    valid = "\n".join(SPLITS["validation"])
    for split_key in ("auto", "dev"):
        corpus = load_corpus(hf(folder, tmp_path / "c", valid_split=split_key))
        assert corpus.vocab.decode(corpus.splits["validation"]) == valid
    base = ["prepare", *hf_args(tmp_path, folder), f"data.cache_dir={tmp_path / 'c'}"]
    capsys.readouterr()
    assert main([*base, "data.valid_split=validation"]) == 2
    err = capsys.readouterr().err
    assert "config key 'data.valid_split'" in err and "no split 'validation'" in err
    assert "['dev', 'train']" in err
    (suggested,) = [w for w in err.split() if w.startswith("data.valid_split=") and "none" in w]
    assert main([*base, *shlex.split(suggested)]) == 0  # as a shell hands it over
    assert "no validation split (data.valid_split=none" in capsys.readouterr().out
    assert main([*base, "data.train_split=training"]) == 2
    assert "config key 'data.train_split'" in capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["data.test_split=", "data.test_split=''", "data.test_split=none", "data.test_split=null"])  # fmt: skip
def test_an_empty_split_key_means_none(hf_home, tmp_path, spelling, capsys):
    """Every spelling of "none" as a shell hands it over (`''` arrives as nothing)."""
    folder = dataset(tmp_path, "parquet", "all_three")
    args = ["prepare", *hf_args(tmp_path, folder), f"data.cache_dir={tmp_path / 'cache'}"]
    args += shlex.split(spelling)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no test split (data.test_split=none" in out
    assert "test" not in out.split("characters per split:")[1]


def test_too_few_documents_to_hold_out_is_exit_2(hf_home, tmp_path, capsys):
    folder = tmp_path / "two"
    write_split(folder, "json", "train", ["春花秋月", "何时了"])
    args = ["prepare", *hf_args(tmp_path, folder), "data.valid_fraction=0.3"]
    args += ["data.test_fraction=0.3", f"data.cache_dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "has 2 documents" in err and "data.valid_fraction=0.3" in err


# ---------------------------------------------------------------- the cache key


def test_the_held_out_split_is_in_the_cache_key(hf_home, tmp_path, capsys):
    """Rerunning reuses the prepared folder; another valid_fraction is another folder."""
    folder = dataset(tmp_path, "json", "train_only")
    cache = tmp_path / "cache"
    load_corpus(hf(folder, cache, valid_fraction=0.1))
    load_corpus(hf(folder, cache, valid_fraction=0.1))
    assert "prepared data: reusing" in capsys.readouterr().out
    other = load_corpus(hf(folder, cache, valid_fraction=0.2))
    assert "reusing" not in capsys.readouterr().out
    assert len(list((cache / "hf").iterdir())) == 2
    assert other.vocab.decode(other.splits["validation"]) == "\n".join(
        held_out(SPLITS["train"], 0.2)[1]
    )


def test_datasets_with_their_own_splits_keep_their_cache_keys():
    """The shipped corpora (songci, poetry: train, validation, test) keep the key of the
    formula from before held-out splits existed (written out here), so the folders they
    prepared then are reused, not rebuilt; ids: test_hfdata's tests, unchanged."""
    import hashlib

    from pipeline import config
    from pipeline.data.idcache import FORMAT

    def key_before(d: DataConfig) -> str:  # hfdata.cache_key at commit 9d16cd5
        names = {"train": "train", "validation": "validation"}  # the old defaults' names
        if d.test_split:  # the old data.test_split='' dropped the test split
            names["test"] = "test"
        fp = hfdata.source_fingerprint(d, None)
        inputs = {"format": FORMAT, "path": d.path, "name": d.name,
                  "fingerprints": {k: fp for k in names}, "splits": names,
                  "text_field": d.text_field, "separator": d.separator, "newlines": d.newlines,
                  "max_chars": d.max_chars, "min_freq": d.min_freq, "max_vocab": d.max_vocab}  # fmt: skip
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]

    for name in ("songci", "poetry"):
        for overrides in ([], ["data.min_freq=2"], ["data.max_chars=5000"], ["data.test_split=''"]):
            d = config.load(str(ROOT / f"configs/{name}.yaml"), overrides).data
            plan = hfdata.plan_splits(d, hfdata.local_split_names(d))
            assert hfdata.cache_key(d, plan, None)[0] == key_before(d), (name, overrides)


# ---------------------------------------------------------------- streams and max_chars


@pytest.mark.parametrize("max_chars", [0, 2000])
def test_a_stream_holds_out_the_same_documents(hf_home, tmp_path, max_chars):
    """data.streaming=true on a train-only JSON-lines folder: the same ids as the dataset
    read whole, with and without data.max_chars."""
    folder = dataset(tmp_path, "json", "train_only")
    kw = dict(valid_fraction=0.1, test_fraction=0.05, max_chars=max_chars)
    streamed = load_corpus(hf(folder, tmp_path / "s", streaming=True, **kw))
    plain = load_corpus(hf(folder, tmp_path / "p", **kw))
    assert streamed.vocab.itos == plain.vocab.itos
    assert sorted(plain.splits) == ["test", "train", "validation"]
    for split, ids in plain.splits.items():
        assert np.array_equal(streamed.splits[split], ids), split


def test_max_chars_cuts_each_source_text_before_holding_out(hf_home, tmp_path):
    """One rule for every source: data.max_chars keeps the first N characters of each text
    the source gives (a text file's text; each split of a dataset), and a held-out split
    comes out of what is kept. A text file holds out its tail by characters, a dataset its
    last documents: either way train and validation together are the first N characters."""
    n = 2000
    joined = "\n".join(SPLITS["train"])
    assert joined[n - 1] != "\n"  # the cut falls inside a document
    text_file = tmp_path / "lyrics.txt"
    text_file.write_text(joined, encoding="utf-8")
    text = load_corpus(
        DataConfig(source="text", path=str(text_file), max_chars=n, valid_fraction=0.1)
    )
    decoded = {k: text.vocab.decode(v) for k, v in text.splits.items()}
    assert decoded["train"] + decoded["validation"] == joined[:n]
    folder = dataset(tmp_path, "json", "train_only")
    corpus = load_corpus(hf(folder, tmp_path / "c", max_chars=n, valid_fraction=0.1))
    train, valid = (corpus.vocab.decode(corpus.splits[k]) for k in ("train", "validation"))
    assert train + "\n" + valid == joined[:n]
    kept = sum(1 for _ in _starts(SPLITS["train"], n))  # documents that start within N
    train_docs, valid_docs = held_out(SPLITS["train"][:kept], 0.1)
    assert train == "\n".join(train_docs) and "\n".join(valid_docs).startswith(valid)
    # a dataset's own splits are each cut at N
    both = dataset(tmp_path, "json", "train_validation")
    own = load_corpus(hf(both, tmp_path / "o", max_chars=300))
    assert own.vocab.decode(own.splits["validation"]) == "\n".join(SPLITS["validation"])[:300]
    assert len(own.splits["train"]) == 300


def _starts(docs: list[str], n: int):
    """Where each document that starts within the first n characters of the joined text
    starts."""
    at = 0
    for d in docs:
        if at >= n:
            return
        yield at
        at += len(d) + 1


# ---------------------------------------------------------------- training on a held-out split


TRAIN = [
    "train",
    "--config",
    str(ROOT / "configs/jaychou.yaml"),
    "data.source=hf",
    "data.text_field=lyrics",
    "data.valid_fraction=0.1",
    "model.hidden_size=32",
    "model.embedding_size=0",
    "model.num_layers=1",
    "train.batch_size=4",
    "train.num_steps=16",
    "train.max_steps=12",
    "train.eval_every=4",
    "train.log_every=4",
    "train.amp=off",
    "train.device=cpu",
    "train.warmup_steps=0",
    "eval.batch_size=4",
    "generate.prefixes=[]",
    "logging.wandb.mode=disabled",
    "logging.progress=off",
]


@pytest.mark.slow
def test_a_train_only_dataset_validates_and_is_world_size_invariant(tmp_path):
    """A train-only JSON-lines folder on the main job's config: validation perplexity and
    best.pt from the held-out documents; 2 torchrun ranks (preparing into their own cache)
    hold out the same ids and end with the parameters of 1 process."""
    folder = dataset(tmp_path, "json", "train_only")
    runs = {}
    for world in (1, 2):
        run_dir, cache = tmp_path / f"run{world}", tmp_path / f"cache{world}"
        args = [*TRAIN, f"data.path={folder}", f"run.dir={run_dir}", f"data.cache_dir={cache}"]
        env = sub_env(HF_HOME=tmp_path / f"hf{world}")
        proc = run_cli(args, env=env) if world == 1 else torchrun(2, args, env=env)
        assert proc.stdout.count("data splits:") == 1  # one line, from the preparing rank
        assert "validation held out: the last 10% of train's documents" in proc.stdout
        assert "no test split (the dataset has none" in proc.stdout
        (prepared,) = (cache / "hf").iterdir()
        runs[world] = run_dir, prepared
    (dir1, prep1), (dir2, prep2) = runs[1], runs[2]
    assert prep1.name == prep2.name
    for split in ("train", "validation"):
        assert (prep1 / f"{split}.bin").read_bytes() == (prep2 / f"{split}.bin").read_bytes()
    valid_ids = np.fromfile(prep1 / "validation.bin", dtype=np.uint16)
    vocab = json.loads((prep1 / "meta.json").read_text(encoding="utf-8"))["vocab"]
    assert "".join(vocab[i] for i in valid_ids) == "\n".join(held_out(SPLITS["train"], 0.1)[1])
    for run_dir in (dir1, dir2):
        val = [e["val/perplexity"] for e in metrics(run_dir, "val/perplexity")]
        assert len(val) == 3 and all(math.isfinite(v) for v in val)
        best = load_ckpt(run_dir, "best.pt")
        assert best["step"] in (4, 8, 12)
    a, b = load_ckpt(dir1)["model"], load_ckpt(dir2)["model"]
    assert_same_params_across_world_sizes(a, b)
