"""What an earlier attempt of a run left in wandb, so a resume re-sends only what is missing.

wandb writes each run attempt's records to `<sync dir>/run-<id>.wandb`: a LevelDB-style log
(a 7-byte ":W&B" header, then 32 KiB blocks of chunks with a 7-byte header: crc32, length,
type) of `wandb.proto.wandb_internal_pb2.Record` messages. wandb-core flushes that file every
15 s and at the end, so a killed attempt may have lost its last events; `offline_last_step`
tells how far its history really got. Online, the server says so (`run.starting_step`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator:
    """Records of a .wandb file; stops quietly at a torn tail (a killed writer)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"'{path}' is not a wandb transaction log")
    pos, chunks = HEADER, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer too short for a chunk header
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):
            return
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            try:
                record.ParseFromString(chunks)
            except Exception:
                return
            chunks = b""
            yield record


def history_steps(path: Path) -> list[int]:
    """`_step` of every history row in one attempt's .wandb file, in order."""
    steps = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                if (item.key or "/".join(item.nested_key)) == "_step":
                    steps.append(int(json.loads(item.value_json)))
    return steps


def attempts(wandb_dir: Path, run_id: str) -> list[Path]:
    """The .wandb files of every attempt of `run_id` under a `wandb/` folder, oldest first
    (directory names start with the start time)."""

    def started(path: Path) -> str:
        found = re.search(r"\d{8}_\d{6}", path.parent.name)
        return found.group(0) if found else ""

    return sorted(Path(wandb_dir).glob(f"*-{run_id}/run-{run_id}.wandb"), key=started)


def offline_last_step(wandb_dir: Path, run_id: str, exclude: Path | None = None) -> int:
    """The last history step any earlier attempt of `run_id` wrote (0 if none)."""
    last = 0
    for path in attempts(wandb_dir, run_id):
        if exclude is not None and path.parent.resolve() == Path(exclude).resolve():
            continue
        try:
            last = max([last, *history_steps(path)])
        except (OSError, ValueError):
            continue
    return last
