"""One job per run directory: an exclusive lock on run.dir/run.lock for the job's life.

Global rank 0 holds an `fcntl.flock` on the file and writes who holds it (host, pid, start
time, SLURM job id, torchrun run id) into it. The kernel drops the lock when the process
ends, however it ends, so kill -9 leaves nothing stale and an elastic restart of the same
job takes it back. A second job on the same directory gets RunDirBusy (exit status 2)
naming the holder, before it reads data or writes anything.

On a network filesystem the lock is as good as the filesystem's locks: NFSv4 and Lustre
mounted with `flock` lock across nodes; Lustre with `localflock` (or no flock support)
locks only within one node.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from pipeline import dist
from pipeline.config import ConfigError

LOCK_NAME = "run.lock"
_held: list = []  # open lock files: the lock lives as long as the file stays open


class RunDirBusy(ConfigError):
    """Another job holds the run directory (exit status 2)."""


def holder_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "torchrun_run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""),
    }


def describe(record: dict) -> str:
    parts = [f"host {record.get('host', '?')}", f"pid {record.get('pid', '?')}"]
    parts.append(f"started {record.get('started', '?')}")
    if record.get("slurm_job_id"):
        parts.append(f"SLURM job {record['slurm_job_id']}")
    return ", ".join(parts)


def acquire(run_dir: Path, wait_s: float = 0.0) -> str:
    """Take the lock (retrying for `wait_s`: an elastic restart may start while the previous
    attempt's rank 0 is still being reaped) or raise RunDirBusy naming the holder. Returns
    the random token written into the holder record."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    f = open(path, "a+", encoding="utf-8")  # a+: never truncates another job's record
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.seek(0)
                text = f.read()
                f.close()
                try:
                    who = describe(json.loads(text))
                except ValueError:
                    who = "a job that has not written its record yet"
                raise RunDirBusy(
                    f"run directory '{run_dir}' is in use by another job ({who}); wait for "
                    f"it to end, stop it, or choose another run.dir"
                ) from None
            time.sleep(0.5)
    f.seek(0)
    f.truncate()
    record = holder_record()
    record["token"] = os.urandom(8).hex()  # this job's, for the shared-folder check
    f.write(json.dumps(record) + "\n")
    f.flush()
    _held.append(f)
    return record["token"]


def release() -> None:
    while _held:
        _held.pop().close()


def lock(run_dir: Path) -> None:
    """Collective: rank 0 takes the run directory's lock before anything is read or written
    (a second job touches nothing); every rank learns the outcome (exit status 2)."""
    wait_s = 30.0 if dist.restart_count() else 0.0  # the last attempt's rank 0 may linger
    token = []
    dist.on_main(lambda: token.append(acquire(run_dir, wait_s=wait_s)), RunDirBusy)
    check_shared(run_dir, dist.broadcast_object(token[0] if token else None))


def check_shared(run_dir: Path, token: str) -> None:
    """Collective: every rank must see rank 0's lock record in run.dir, i.e. the run
    directory is ONE folder shared by all nodes; else each node would resume, save and log
    on its own. Raises ConfigError (exit 2) on every rank, naming the ranks that do not."""
    try:
        seen = json.loads((run_dir / LOCK_NAME).read_text(encoding="utf-8")).get("token")
    except (OSError, ValueError):
        seen = None
    views = dist.all_gather_object((seen == token, socket.gethostname()))
    apart = [f"rank {r} on {host}" for r, (same, host) in enumerate(views) if not same]
    if apart:
        raise ConfigError(
            f"run directory '{run_dir}' is not shared: {', '.join(apart)} "
            f"{'does' if len(apart) == 1 else 'do'} not see the folder that rank 0 locked; put "
            f"run.dir on a filesystem every node mounts (the same path on each)"
        )
