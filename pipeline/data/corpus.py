"""Get the text: built-in corpora (download + sha256 + cache), local files, Hugging Face;
`load_corpus` turns any of them into ids through the one preparation path
(pipeline/data/builder.py), from the source `source_for` names (textfile.py: the built-in zip
and text files; hf.py: Hugging Face datasets).

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
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.common import Corpus, DataError, cache_dir, sha256_of


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


def source_for(data: DataConfig):
    """The source the config names (pipeline/data/builder.py: what a source gives)."""
    if data.source == "hf":
        from pipeline.data.hf import HFSource  # lazily: it imports `datasets`

        return HFSource(data)
    from pipeline.data.textfile import TextSource

    if data.source == "text":
        return TextSource(Path(data.path), None, data)
    return TextSource(locate_builtin(data), BUILTIN[data.corpus].member, data)


def load_corpus(data: DataConfig, dist_ctx=None, full_check: bool = False) -> Corpus:
    """The corpus named by the config, as ids per split (`full_check`: a prepared corpus's
    files are hashed again, not only sized). A text read whole is built in memory by every
    rank; anything else is prepared into the id cache by local rank 0 while the other ranks
    wait (collective), then memory-mapped."""
    from pipeline.data import builder

    source = source_for(data)
    if source.in_memory:
        return builder.build(source, None)
    from pipeline import dist
    from pipeline.data.idcache import shared

    prepare = lambda: builder.prepare(source, print, full_check)  # noqa: E731
    return shared(prepare, dist_ctx or dist.DistContext())
