"""Text as a source of the preparation path (pipeline/data/builder.py): the built-in zip, or a
UTF-8 text file of any size (`data.source=text`, or a file as `data.path`).

A zip, or a plain file below STREAM_BYTES, is read whole (read_text) and its ids are
built in memory: no cache folder, as before. A plain file of STREAM_BYTES or more is read in
chunks, never whole, into the prepared-id cache (pipeline/data/idcache.py), then memory-mapped:

    <cache>/text/<file name>-<key>/meta.json, train.bin, validation.bin

Such a file passes three times, each pass holding one chunk: here, its length (after
data.newlines and data.max_chars) to place the validation cut; then the builder's count and
write passes. Either way the text gives the same vocabulary and ids: its first
round(n * (1 - data.valid_fraction)) characters train, the rest validate.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.common import DataError, cache_dir
from pipeline.data.idcache import FORMAT

# files at least this large are streamed (the variable: for tests of real jobs)
STREAM_BYTES = int(os.environ.get("PIPELINE_TEXT_STREAM_BYTES", 256 << 20))
CHUNK = 1 << 24  # characters a read
PIECE = 1 << 20  # characters a chunk of a text read whole


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


def key(path: Path, data: DataConfig) -> str:
    st = path.stat()
    inputs = [FORMAT, str(path.resolve()), st.st_size, st.st_mtime_ns, data.newlines]
    inputs += [data.max_chars, data.valid_fraction, data.min_freq, data.max_vocab]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:20]


def read_text(path: Path, member: str | None = None) -> str:
    """A UTF-8 text file, or the text member of a zip archive."""
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
                name = member if member in names else (names[0] if len(names) == 1 else None)
                if name is None:
                    raise DataError(f"zip '{path}' holds {names}; expected one text file")
                raw = zf.read(name)
        else:
            raw = path.read_bytes()
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"data file '{path}' is not UTF-8 text: byte {err.start} "
            f"({raw[err.start : err.start + 1]!r}) is invalid"
        ) from None
    except zipfile.BadZipFile as err:
        raise DataError(f"data file '{path}' is a damaged zip: {err}") from None


def preprocess(text: str, data: DataConfig) -> str:
    if data.newlines == "space":  # the chapter: replace('\n', ' ').replace('\r', ' ')
        text = text.replace("\n", " ").replace("\r", " ")
    if data.max_chars:
        text = text[: data.max_chars]
    return text


def split_text(text: str, valid_fraction: float) -> dict[str, str]:
    """The last `valid_fraction` of the text is held out for validation."""
    if valid_fraction <= 0:
        return {"train": text}
    cut = int(round(len(text) * (1 - valid_fraction)))
    return {"train": text[:cut], "validation": text[cut:]}


@dataclass
class WholeText:
    """A piece: the splits of a text read whole, PIECE characters a chunk."""

    parts: dict[str, str]

    def chunks(self) -> Iterator[tuple[str, str, int]]:
        for split, text in self.parts.items():
            for lo in range(0, len(text), PIECE):
                piece = text[lo : lo + PIECE]
                yield split, piece, len(piece)


@dataclass
class FileText:
    """A piece: a file read in chunks, its first `cut` characters train, the rest validate."""

    path: Path
    data: DataConfig
    cut: int

    def chunks(self) -> Iterator[tuple[str, str, int]]:
        at = 0
        for text in chunks(self.path, self.data):
            head = max(0, min(len(text), self.cut - at))
            if head:
                yield "train", text[:head], head
            if head < len(text):
                yield "validation", text[head:], len(text) - head
            at += len(text)


class TextSource:
    label = "prepared text"

    def __init__(self, path: Path, member: str | None, data: DataConfig):
        self.path, self.member, self.data = path, member, data
        plain = path.is_file() and not zipfile.is_zipfile(path)
        self.in_memory = not (plain and path.stat().st_size >= STREAM_BYTES)

    def locate(self) -> tuple[Path, str | None]:
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.path.name)
        return cache_dir(self.data) / "text" / f"{slug}-{key(self.path, self.data)}", None

    def open(self) -> None:
        pass  # the pieces open the file

    def pieces(self) -> tuple[list[str], list]:

        data = self.data
        names = ["train"] + (["validation"] if data.valid_fraction > 0 else [])
        if self.in_memory:
            text = preprocess(read_text(self.path, self.member), data)
            return names, [WholeText(split_text(text, data.valid_fraction))]
        total = sum(len(t) for t in chunks(self.path, data))
        cut = total if data.valid_fraction <= 0 else int(round(total * (1 - data.valid_fraction)))
        return names, [FileText(self.path, data, cut)]

    def check(self, split: str, own: int) -> None:
        if split == "train" and own == 0:
            raise DataError(f"data file '{self.path}' gives an empty training text")

    def meta(self, splits: list[str]) -> tuple[dict, dict[str, dict]]:
        return {"source": str(self.path)}, {}
