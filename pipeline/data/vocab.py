"""Deterministic character vocabulary.

The chapter builds `list(set(chars))`, whose order depends on PYTHONHASHSEED, so two processes
would disagree on ids. Here the order is a pure function of the counts: most frequent first,
ties by code point. `<unk>` (id 0) exists only when some character is left out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np

UNK = "<unk>"
CODE_POINTS = 0x110000  # every Unicode code point: the size of a count or a lookup table


def code_point_counts(text: str) -> np.ndarray:
    """How often each code point occurs in `text` (an array of CODE_POINTS counts): counts of
    pieces of a large text add up, in a fixed ~9 MB."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.bincount(cps, minlength=CODE_POINTS)


def as_counter(counts: np.ndarray) -> Counter:
    """The characters of a code-point count array, as Vocab.build takes them."""
    return Counter({chr(cp): int(counts[cp]) for cp in np.flatnonzero(counts)})


class VocabError(ValueError):
    pass


class Vocab:
    def __init__(self, itos: list[str]):
        if len(set(itos)) != len(itos):
            raise VocabError("vocabulary has duplicate entries")
        self.itos = list(itos)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.unk = self.stoi.get(UNK)
        self._lut: np.ndarray | None = None  # lookup_table(), made on first use

    @classmethod
    def build(
        cls, counts: Counter, min_freq: int = 1, max_vocab: int = 0, extra: Iterable[str] = ()
    ) -> Vocab:
        """Keep chars with count >= min_freq (the max_vocab most frequent); `<unk>` if any
        counted char, or any char of `extra` (e.g. other splits), is left out."""
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        kept = [c for c, n in ranked if n >= min_freq]
        kept_set = set(kept)
        needs_unk = len(kept) < len(ranked) or any(c not in kept_set for c in extra)
        if max_vocab and len(kept) + needs_unk > max_vocab:  # <unk> counts as an entry
            if max_vocab < 2:
                raise VocabError(
                    f"config key 'data.max_vocab': {max_vocab} leaves no room for a character "
                    f"besides <unk>; use 2 or more (0 = no limit)"
                )
            kept, needs_unk = kept[: max_vocab - 1], True
        return cls(([UNK] if needs_unk else []) + kept)

    @classmethod
    def from_text(cls, text: str, **kw) -> Vocab:
        return cls.build(Counter(text), **kw)

    def lookup_table(self) -> np.ndarray:
        """Code point -> id for every code point: <unk> for characters left out, or (no
        <unk>) an id >= len(self) that marks a character the vocabulary cannot take."""
        fill = self.unk if self.unk is not None else np.iinfo(np.uint32).max
        lut = np.full(CODE_POINTS, fill, dtype=np.uint32)
        for i, c in enumerate(self.itos):
            if c != UNK:
                lut[ord(c)] = i
        return lut

    def __len__(self) -> int:
        return len(self.itos)

    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if len(self) <= np.iinfo(np.uint16).max + 1 else np.uint32)

    def encode(self, text: str) -> np.ndarray:
        """Ids of `text` through the code-point lookup table, in pieces of a million
        characters: about 6 bytes a character at the peak besides the result (a Python list
        of ids took 8 and more)."""
        if self._lut is None:
            self._lut = self.lookup_table()
        lut, out = self._lut, np.empty(len(text), dtype=self.dtype())
        for lo in range(0, len(text), 1 << 20):
            piece = text[lo : lo + (1 << 20)]
            ids = lut[np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)]
            if self.unk is None and len(ids) and ids.max() >= len(self):
                c = piece[int(np.argmax(ids >= len(self)))]
                raise VocabError(f"character {c!r} is not in the vocabulary")
            out[lo : lo + len(piece)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def missing(self, text: str) -> list[str]:
        """Characters of `text` that have no id of their own (in order of appearance)."""
        seen: dict[str, None] = {}
        for c in text:
            if c not in self.stoi or c == UNK:
                seen[c] = None
        return list(seen)

    def to_list(self) -> list[str]:
        return list(self.itos)
