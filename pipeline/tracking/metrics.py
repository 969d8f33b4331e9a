"""Metrics: sums accumulated on the device, reduced over ranks at a log interval, and the
run directory's metrics.jsonl (its sink, and reading it back)."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path

import torch

from pipeline import dist
from pipeline.model.loss import LN2, perplexity


class TrainAccumulator:
    """Sums kept on the device between log intervals (no host sync or host-to-device copy
    per step); token and step counts are known on the host and alike on every rank (each
    trains batch_size / world_size streams of num_steps)."""

    def __init__(self, device: torch.device):
        # loss*tokens and tokens of the steps taken (a skipped, non-finite step's loss would
        # poison the interval's mean), grad-norm sum (finite steps), clipped steps, skipped
        # (non-finite) steps
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.tokens = 0
        self.steps = 0
        self.t0 = time.perf_counter()
        self.faults0 = minor_faults()

    def add(self, loss: torch.Tensor, tokens: int, norm: torch.Tensor, clip: float) -> None:
        finite = torch.isfinite(norm)
        clipped = (norm > clip) if clip > 0 else torch.zeros_like(finite)
        self.sums += torch.stack(
            [
                torch.where(finite, loss.double() * tokens, 0),
                finite.double() * tokens,
                torch.where(finite, norm, 0).double(),
                clipped.double(),
                (~finite).double(),
            ]
        )
        self.tokens += tokens
        self.steps += 1

    def reduce(self, world_size: int) -> dict:
        """Collective: every rank calls it at the same step. The norm and the skip are the
        same on every rank (clipping sees the all-reduced gradients), so their sums are
        divided by the world size."""
        faults = torch.tensor([minor_faults() - self.faults0], dtype=torch.float64)
        sums = torch.cat([self.sums, faults.to(self.sums.device)])
        loss_tok, kept, norm, clipped, skipped, faults = dist.all_reduce_sum(sums).tolist()
        tokens, steps = self.tokens * world_size, self.steps
        norm, clipped, skipped = norm / world_size, clipped / world_size, skipped / world_size
        elapsed = time.perf_counter() - self.t0
        loss = loss_tok / kept if kept else math.nan  # over the steps taken
        out = {
            "train/loss": loss,
            "train/perplexity": perplexity(loss),
            "train/bpc": loss / LN2,
            "opt/grad_norm": norm / max(steps - skipped, 1),
            "opt/clipped": clipped / max(steps, 1),
            "opt/nonfinite_steps": skipped,
            "perf/tokens_per_s": tokens / max(elapsed, 1e-9),
            "perf/page_faults_per_step": faults / world_size / max(steps, 1),
            "_tokens": tokens,
        }
        self.tokens = self.steps = 0
        self.sums.zero_()
        self.t0 = time.perf_counter()
        self.faults0 = minor_faults()
        return out


def minor_faults() -> int:
    """This process' page faults served without disk so far (each a zeroed page handed out:
    host memory taken back from the kernel; pipeline.training.hostmem)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class JsonlSink:
    """metrics.jsonl: one JSON object per event, with `step`, appended whole or not at all.

    A resumed run restarts at its checkpoint's step and logs the steps after it again, so the
    file is first cut back to that step. An elastic restart that found no checkpoint
    (`keep_history`) redoes the job from step 0 exactly as before: the file is kept and
    `logged_through` says which steps it already holds (they are not logged twice)."""

    def __init__(self, path: Path, resume_step: int, keep_history: bool):
        self.path = path
        self.logged_through = 0
        if keep_history and path.exists():
            truncate_jsonl(path, math.inf)  # drops only a torn last line
            self.logged_through = max((e["step"] for e in read_jsonl(path)), default=0)
        else:
            truncate_jsonl(path, resume_step)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, event: dict) -> None:
        """One whole line or none: a write cut short (a full disk) is taken back, so
        metrics.jsonl stays valid JSON lines."""
        line = (json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8")
        size = os.fstat(self.fd).st_size
        try:
            done = 0
            while done < len(line):
                done += os.write(self.fd, line[done:])
        except OSError as err:
            os.ftruncate(self.fd, size)
            from pipeline.run.checkpoint import DiskFull

            raise DiskFull(
                f"disk full: appending to '{self.path}' failed ({err.strerror or err}); "
                f"the file keeps every whole line written before"
            ) from None

    def close(self) -> None:
        os.close(self.fd)


def truncate_jsonl(path: Path, resume_step: int) -> None:
    """On resume, drop events after the checkpoint's step: they are logged again, and the
    history stays strictly increasing without duplicates."""
    if not path.exists():
        return
    if resume_step <= 0:
        path.unlink()
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= resume_step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a killed writer
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
    return out
