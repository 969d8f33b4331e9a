"""The vocabulary: deterministic across processes, <unk> only when needed, chapter size."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections import Counter

import numpy as np
import pytest
from conftest import JAYCHOU_ZIP, ROOT, sub_env

from pipeline import config
from pipeline.data.corpus import load_corpus
from pipeline.data.vocab import UNK, Vocab, VocabError

# Builds the vocabulary of the whole jaychou corpus in a fresh interpreter and prints it,
# together with the chapter's `list(set(...))` order for contrast.
SCRIPT = """
import json
from pipeline import config
from pipeline.data.corpus import load_corpus
from pipeline.data.textfile import preprocess, read_text
from pathlib import Path
cfg = config.load(None, [])
corpus = load_corpus(cfg.data)
text = read_text(Path({zip!r}), "jaychou_lyrics.txt")
print(json.dumps({{"ours": corpus.vocab.to_list(), "chapter": list(set(text)),
                   "ids": corpus.splits["train"][:2000].tolist()}}))
"""


def build_in_subprocess(hash_seed: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(zip=str(JAYCHOU_ZIP))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=sub_env(PYTHONHASHSEED=hash_seed),
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_vocab_identical_across_hash_seeds():
    a, b = build_in_subprocess("1"), build_in_subprocess("2")
    # The chapter's order really does change with the hash seed (what this guards against) ...
    assert a["chapter"] != b["chapter"]
    assert sorted(a["chapter"]) == sorted(b["chapter"])
    # ... ours does not, nor do the ids.
    assert a["ours"] == b["ours"]
    assert a["ids"] == b["ids"]
    assert len(a["ours"]) == 2614 and UNK not in a["ours"]  # docs/data.md: 2,614 distinct chars


def test_order_is_frequency_then_code_point():
    v = Vocab.from_text("bbbaacc d")
    assert v.itos == ["b", "a", "c", " ", "d"]  # ties broken by code point
    assert v.stoi == {c: i for i, c in enumerate(v.itos)}


def test_unk_only_when_needed():
    text = "aaaabbbccd"
    full = Vocab.from_text(text)
    assert UNK not in full.itos and full.unk is None
    with pytest.raises(VocabError, match=r"'z' is not in the vocabulary"):
        full.encode("az")
    # min_freq drops d (1) and c (2): <unk> is id 0 and takes their place
    v = Vocab.from_text(text, min_freq=3)
    assert v.itos == [UNK, "a", "b"] and v.unk == 0
    assert v.encode("abcdz").tolist() == [1, 2, 0, 0, 0]
    # max_vocab counts <unk>: the 2 most frequent + <unk>
    v = Vocab.from_text(text, max_vocab=3)
    assert v.itos == [UNK, "a", "b"]
    # max_vocab at least the number of characters: nothing left out, no <unk>
    assert Vocab.from_text(text, max_vocab=4).itos == ["a", "b", "c", "d"]
    # a character only in another split (e.g. validation) also needs <unk>
    assert Vocab.build(Counter(text), extra="q").itos[0] == UNK
    assert UNK not in Vocab.build(Counter(text), extra="ab").itos


def test_encode_decode_round_trip():
    text = JAYCHOU_TEXT[:3000]
    v = Vocab.from_text(text)
    ids = v.encode(text)
    assert ids.dtype == np.uint16 and len(ids) == len(text)
    assert v.decode(ids) == text
    assert v.decode(ids.tolist()) == text
    assert Vocab(v.to_list()).encode(text).tolist() == ids.tolist()  # serialised and back


def test_missing_lists_unknown_characters_in_order():
    v = Vocab.from_text("分开不")
    assert v.missing("分开了吗了") == ["了", "吗"]
    assert v.missing("不分开") == []


def test_duplicate_entries_rejected():
    with pytest.raises(VocabError, match="duplicate"):
        Vocab(["a", "b", "a"])


def test_chapter_config_gives_vocab_1038():
    cfg = config.load(str(ROOT / "configs" / "seed_scratch_random.yaml"), [])
    corpus = load_corpus(cfg.data)
    assert len(corpus.vocab) == 1038
    assert len(corpus.splits["train"]) == 10000
    assert list(corpus.splits) == ["train"]
    # the chapter's own vocabulary: set of the first 10,000 characters, newlines to spaces
    chapter = JAYCHOU_TEXT.replace("\n", " ").replace("\r", " ")[0:10000]
    assert sorted(corpus.vocab.itos) == sorted(set(chapter))


with zipfile.ZipFile(JAYCHOU_ZIP) as _zf:
    JAYCHOU_TEXT = _zf.read("jaychou_lyrics.txt").decode("utf-8")


def test_max_vocab_counts_unk_as_an_entry():
    """<unk> forced in by a character of another split (or by min_freq) takes one of the
    data.max_vocab places: 3 means 3 entries, never 4."""
    counts = Counter("aaaabbbcc")
    assert Vocab.build(counts, max_vocab=3).itos == ["a", "b", "c"]  # all fit, no <unk>
    assert Vocab.build(counts, max_vocab=3, extra="z").itos == [UNK, "a", "b"]
    assert Vocab.build(counts, min_freq=3, max_vocab=2).itos == [UNK, "a"]
    assert len(Vocab.build(Counter("abcdefg"), max_vocab=3)) == 3
    with pytest.raises(VocabError, match="data.max_vocab"):
        Vocab.build(counts, max_vocab=1, extra="z")


def test_encode_is_the_lookup_of_every_character():
    rng = np.random.default_rng(0)
    alphabet = list("分开不的我你abc \n") + ["\U0001f600"]  # a character beyond the BMP too
    text = "".join(rng.choice(alphabet, size=3000))
    vocab = Vocab.build(Counter(text[:2000]), max_vocab=8)
    want = [vocab.stoi.get(c, vocab.unk) for c in text]
    got = vocab.encode(text)
    assert got.dtype == np.uint16 and got.tolist() == want
    full = Vocab.from_text(text[:10])
    missing = next(c for c in text if c not in full.stoi)
    with pytest.raises(VocabError, match=f"character {missing!r} is not in the vocabulary"):
        full.encode(text)
    assert full.encode("").shape == (0,)


def test_encode_takes_the_ids_and_a_few_pieces_of_memory():
    """Encoding goes through the lookup table a million characters at a time: the peak is
    the ids (2 bytes a character here) plus pieces of fixed size (the lookup table's 4.4 MB
    among them), not a Python list of ids (8 bytes and more a character)."""
    import tracemalloc

    text = "分开不的我你abc \n" * 400_000  # 4.4M characters
    vocab = Vocab.from_text(text)
    tracemalloc.start()
    ids = vocab.encode(text)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(ids) == len(text) and ids.dtype == np.uint16
    assert peak < 2 * len(text) + 24 * 2**20, f"{peak / len(text):.1f} bytes a character"
