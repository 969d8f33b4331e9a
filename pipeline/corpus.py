"""Get the text: built-in corpora (download + sha256 + cache), local files, Hugging Face;
`load_corpus` turns any of them into ids through the one preparation path
(pipeline/builder.py), from the source `source_for` names (textcache.py: the built-in zip
and text files; hfdata.py: Hugging Face datasets).

Look-up order for a built-in corpus: explicit `data.path`, then `$PIPELINE_DATA_DIR/<file>`,
then the cache (`$PIPELINE_CACHE_DIR` or ~/.cache/lyrics-rnn), then the download. A download
is written to a temporary file and renamed into the cache only after its checksum matched, so
a bad or truncated download never leaves a file behind.
"""

from __future__ import annotations

import os
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig
from .data import Corpus, DataError, cache_dir, sha256_of


@dataclass(frozen=True)
class BuiltinCorpus:
    filename: str
    url: str
    sha256: str
    member: str  # file inside the zip


D2L_COMMIT = "89403b9792861d86a0f1735cdd4a3d60c423f5a2"
BUILTIN = {
    "jaychou": BuiltinCorpus(
        filename="jaychou_lyrics.txt.zip",
        url=f"https://raw.githubusercontent.com/d2l-ai/d2l-zh/{D2L_COMMIT}/data/jaychou_lyrics.txt.zip",
        sha256="182180582bd7811aa93f4eb954f9a8d7990177044c374b16bd9304132d2dc39c",
        member="jaychou_lyrics.txt",
    ),
}


def download(url: str, dest: Path, sha256: str, progress: bool = True) -> Path:
    """Fetch `url` to `dest` atomically; raise DataError (leaving nothing) unless it matches."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"download {dest.name}",
                disable=not progress,
                file=sys.stderr,
            )
            got = 0
            while chunk := resp.read(1 << 16):
                out.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
            bar.close()
        if total is not None and got != total:
            raise DataError(f"download of {url} is truncated: got {got} of {total} bytes")
        digest = sha256_of(Path(tmp))
        if digest != sha256:
            raise DataError(f"download of {url} has sha256 {digest}, expected {sha256}")
        os.replace(tmp, dest)
        return dest
    except DataError:
        raise
    except Exception as err:  # network errors, incomplete reads
        raise DataError(f"could not download {url}: {err}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def locate_builtin(data: DataConfig) -> Path:
    spec = BUILTIN.get(data.corpus)
    if spec is None:
        raise DataError(
            f"config key 'data.corpus': unknown corpus '{data.corpus}' "
            f"(built-in: {sorted(BUILTIN)})"
        )
    if data.path:
        return Path(data.path)
    env = os.environ.get("PIPELINE_DATA_DIR")
    if env and (Path(env) / spec.filename).is_file():
        return Path(env) / spec.filename
    cached = cache_dir(data) / spec.filename
    if cached.is_file() and sha256_of(cached) == spec.sha256:
        return cached
    return download(data.url or spec.url, cached, spec.sha256)


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


def source_for(data: DataConfig):
    """The source the config names (pipeline/builder.py: what a source gives)."""
    if data.source == "hf":
        from .hfdata import HFSource  # lazily: it imports `datasets`

        return HFSource(data)
    from .textcache import TextSource

    if data.source == "text":
        return TextSource(Path(data.path), None, data)
    return TextSource(locate_builtin(data), BUILTIN[data.corpus].member, data)


def load_corpus(data: DataConfig, dist_ctx=None, full_check: bool = False) -> Corpus:
    """The corpus named by the config, as ids per split (`full_check`: a prepared corpus's
    files are hashed again, not only sized). A text read whole is built in memory by every
    rank; anything else is prepared into the id cache by local rank 0 while the other ranks
    wait (collective), then memory-mapped."""
    from . import builder

    source = source_for(data)
    if source.in_memory:
        return builder.build(source, None)
    from . import dist
    from .idcache import shared

    prepare = lambda: builder.prepare(source, print, full_check)  # noqa: E731
    return shared(prepare, dist_ctx or dist.DistContext())
