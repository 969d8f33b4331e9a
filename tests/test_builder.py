"""The one preparation path (pipeline/data/builder.py) for any source: pieces of text, in
processes or not, into the id cache or into memory, give the ids of the splits' texts
joined; an intact folder is reused without reading the text; a source's check stops it."""

from __future__ import annotations

import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import JAYCHOU_ZIP

from pipeline.config import DataConfig
from pipeline.data import builder
from pipeline.data.common import DataError
from pipeline.data.idcache import open_prepared, verify
from pipeline.data.vocab import Vocab


@dataclass
class Given:
    """A piece: its (split, text) chunks as given (picklable: workers get it by fork)."""

    items: list

    def chunks(self):
        for split, text in self.items:
            yield split, text, len(text)


class Toy:
    label = "prepared toy"
    in_memory = False

    def __init__(self, data: DataConfig, folder: Path, pieces: list[Given]):
        self.data, self.folder, self._pieces, self.opened = data, folder, pieces, 0

    def locate(self):
        return self.folder, "toy: two splits"

    def open(self):
        self.opened += 1

    def pieces(self):
        return ["train", "validation"], self._pieces

    def check(self, split, own):
        if own == 0:
            raise DataError(f"toy split '{split}' is empty")

    def meta(self, splits):
        return {"source": "toy"}, {k: {"pieces": len(self._pieces)} for k in splits}


@pytest.fixture(scope="module")
def lyrics() -> str:
    with zipfile.ZipFile(JAYCHOU_ZIP) as zf:
        return zf.read("jaychou_lyrics.txt").decode("utf-8")


def pieces_of(text: str, cut: int) -> list[Given]:
    """Train pieces, one piece that crosses into validation (as a text file's), then two
    validation pieces; chunks of uneven sizes."""
    a, b, c, d = cut // 3, 2 * cut // 3, cut + 1000, cut + 2000
    return [
        Given([("train", text[:a])]),
        Given([("train", text[a : a + 7]), ("train", text[a + 7 : b])]),
        Given([("train", text[b:cut]), ("validation", text[cut:c])]),
        Given([("validation", text[c:d])]),
        Given([("validation", text[d:])]),
    ]


@pytest.mark.parametrize("num_proc", [1, 3])
def test_pieces_in_processes_give_the_ids_of_the_joined_text(lyrics, tmp_path, num_proc, capsys):
    cut = 50_000
    train, valid = lyrics[:cut], lyrics[cut:]
    want = Vocab.build(Counter(train), min_freq=2, extra=set(valid))
    data = DataConfig(min_freq=2, num_proc=num_proc)
    source = Toy(data, tmp_path / "toy", pieces_of(lyrics, cut))
    folder = builder.prepare(source, print)
    out = capsys.readouterr().out
    assert out.startswith("toy: two splits\nprepared toy: ") and "characters/s)" in out
    meta = verify(folder, full=True)
    assert meta["source"] == "toy" and meta["splits"]["validation"]["pieces"] == 5
    assert meta["build"]["num_proc"] == num_proc
    corpus = open_prepared(folder, meta)
    assert corpus.vocab.itos == want.itos and want.unk == 0  # min_freq=2 leaves some out
    assert np.array_equal(corpus.splits["train"], want.encode(train))
    assert np.array_equal(corpus.splits["validation"], want.encode(valid))
    memory = builder.build(Toy(data, tmp_path / "unused", pieces_of(lyrics, cut)), None)
    assert memory.vocab.itos == want.itos and not (tmp_path / "unused").exists()
    for split, ids in corpus.splits.items():
        assert not isinstance(memory.splits[split], np.memmap)
        assert np.array_equal(memory.splits[split], ids)
    again = builder.prepare(source, print)  # reused: the source's text is not asked for
    assert again == folder and source.opened == 1 and "reusing" in capsys.readouterr().out


def test_a_sources_check_stops_the_build_and_leaves_no_folder(lyrics, tmp_path):
    source = Toy(DataConfig(num_proc=2), tmp_path / "toy", [Given([("train", lyrics)])] * 2)
    with pytest.raises(DataError, match="toy split 'validation' is empty"):
        builder.prepare(source, print)
    assert list(tmp_path.iterdir()) == []
