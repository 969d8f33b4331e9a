"""What every data source shares: the Corpus it returns, DataError, the cache folder and
file checksums. The data layer points one way: corpus.py (the built-in corpus and the
dispatch) -> the sources (textfile.py: text; hf.py: Hugging Face datasets) -> the one
preparation path (builder.py) -> the id cache (idcache.py) -> this module and vocab.py.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.vocab import Vocab

IGNORE = -100  # the target id of padding (validation rows): no loss, no gradient


class DataError(ValueError):
    """Bad or missing input data (names the file and what is wrong)."""


@dataclass
class Corpus:
    """Token ids per split (1-D numpy arrays, possibly memory-mapped) and the vocabulary."""

    vocab: Vocab
    splits: dict[str, np.ndarray]


def cache_dir(data: DataConfig | None = None) -> Path:
    if data is not None and data.cache_dir:
        return Path(data.cache_dir)
    env = os.environ.get("PIPELINE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "lyrics-rnn"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
