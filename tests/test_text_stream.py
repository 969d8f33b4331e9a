"""A text file larger than memory is read in chunks into the prepared-id cache: the same
vocabulary and ids as reading it whole, any chunk size, memory for a chunk."""

from __future__ import annotations

import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from conftest import JAYCHOU_ZIP, TINY, load_ckpt, sub_env, torchrun

from pipeline.config import DataConfig
from pipeline.data import textfile as textcache
from pipeline.data.corpus import load_corpus


@pytest.fixture(scope="module")
def lyrics(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "jaychou.txt"
    with zipfile.ZipFile(JAYCHOU_ZIP) as zf:
        path.write_bytes(zf.read("jaychou_lyrics.txt"))
    return path


@pytest.mark.parametrize(
    "options",
    [
        dict(valid_fraction=0.1),
        dict(valid_fraction=0.1, newlines="space", max_chars=30001),
        dict(valid_fraction=0.0, min_freq=3),
        dict(valid_fraction=0.2, max_vocab=500),
    ],
    ids=["plain", "space_max_chars", "no_validation", "max_vocab"],
)
@pytest.mark.parametrize("chunk", [997, 1 << 24])
def test_streamed_text_equals_the_text_read_whole(lyrics, tmp_path, monkeypatch, options, chunk):
    data = DataConfig(source="text", path=str(lyrics), cache_dir=str(tmp_path), **options)
    whole = load_corpus(data)
    monkeypatch.setattr(textcache, "STREAM_BYTES", 1)
    monkeypatch.setattr(textcache, "CHUNK", chunk)
    streamed = load_corpus(data)
    assert streamed.vocab.itos == whole.vocab.itos
    assert sorted(streamed.splits) == sorted(whole.splits)
    for split, ids in whole.splits.items():
        assert isinstance(streamed.splits[split], np.memmap)
        assert np.array_equal(streamed.splits[split], ids), split
    (folder,) = (tmp_path / "text").iterdir()
    again = load_corpus(data)  # reused: nothing rebuilt
    assert len(list((tmp_path / "text").iterdir())) == 1 and folder.exists()
    assert np.array_equal(again.splits["train"], whole.splits["train"])


def test_memory_does_not_grow_with_the_file(tmp_path, monkeypatch):
    """Files of 4 and 16 MB, chunks of 256k characters: the same peak of allocated memory
    (one chunk, one count per code point, the lookup table), whatever the file's size."""
    monkeypatch.setattr(textcache, "STREAM_BYTES", 1 << 20)
    monkeypatch.setattr(textcache, "CHUNK", 1 << 18)
    line = "我想就这样牵着你的手不放开\n" * 40
    peaks, sizes = [], []
    for megabytes in (4, 16):
        path = tmp_path / f"big{megabytes}.txt"
        reps = megabytes * 2**20 // len(line.encode())
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(reps):
                f.write(line)
        data = DataConfig(
            source="text", path=str(path), cache_dir=str(tmp_path), valid_fraction=0.01
        )
        tracemalloc.start()
        try:
            corpus = load_corpus(data)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        n = sum(len(ids) for ids in corpus.splits.values())
        assert n == reps * len(line)
        sizes.append(path.stat().st_size)
    assert sizes[1] > 3.9 * sizes[0] and peaks[1] < peaks[0] * 1.05, (sizes, peaks)


@pytest.mark.slow
def test_two_ranks_train_on_a_streamed_file_as_on_the_file_read_whole(lyrics, tmp_path):
    """torchrun, 2 ranks: local rank 0 prepares the streamed file while rank 1 waits; the
    run ends with the parameters of a run on the file read whole."""
    args = ["train", *TINY, "data.source=text", f"data.path={lyrics}", "data.valid_fraction=0.1"]
    args += ["train.max_steps=6", "model.kind=gru"]
    torchrun(2, [*args, f"run.dir={tmp_path / 'whole'}"])
    env = sub_env(PIPELINE_TEXT_STREAM_BYTES=1, PIPELINE_CACHE_DIR=tmp_path / "cache")
    proc = torchrun(2, [*args, f"run.dir={tmp_path / 'streamed'}"], env=env)
    assert proc.stdout.count("prepared text:") == 1  # one node, one preparation
    a, b = load_ckpt(tmp_path / "whole")["model"], load_ckpt(tmp_path / "streamed")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_streamed_file_that_is_not_utf8_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from pipeline.__main__ import main

    path = tmp_path / "bad.txt"
    path.write_bytes("分开".encode() * 1000 + b"\xff" + "不分开".encode() * 1000)
    monkeypatch.setattr(textcache, "STREAM_BYTES", 1)
    monkeypatch.setattr(textcache, "CHUNK", 500)
    run_dir = tmp_path / "run"
    code = main(["train", *TINY, "data.source=text", f"data.path={path}", f"run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(path) in err and "not UTF-8" in err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.bin"))
    assert not (run_dir / "checkpoints").exists()
