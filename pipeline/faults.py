"""Faults on purpose, for tests that provoke the real thing at a known step (no races):

    PIPELINE_FAULTS="nan_loss:1:5-7,sigstop:1:15,sigkill:0:12@2"   # comma-separated rules
    KIND:RANK:STEP[-LAST][@ATTEMPT]

- nan_loss: that rank's loss is multiplied by NaN in those steps (1-based, the step being
  made), so a real non-finite gradient reaches every rank through DDP's all-reduce;
- sigstop: that rank stops itself (SIGSTOP) before that step, as a hung rank does;
- sigterm, sigusr1, sigkill: that rank sends itself SIGTERM or SIGUSR1 (preemption: the stop
  check then saves and exits 75) or SIGKILL (a crash) before that step;
- enospc, eio: the write of the checkpoint of that step (step_N.pt or last.pt, the file
  last.pt will name; not best.pt) fails halfway with a real OSError (ENOSPC "No space left
  on device", EIO "Input/output error"), through the writer's own error path (exit 74);
  only rank 0 writes checkpoints, so RANK must be 0;
- torn: rank 0 dies (SIGKILL) halfway through writing the checkpoint of that step, its
  bytes so far flushed to the temporary file (RANK must be 0);
- resume_kill: that rank SIGKILLs itself during start-up, right after it read the checkpoint
  it resumes from (before the first step; STEP is not used, write 0);
- slow_start: that rank sleeps STEP seconds before it reads its data (a slow preparation
  while the other ranks wait at a collective).

ATTEMPT is the job's attempt the rule fires in: TORCHELASTIC_RESTART_COUNT (0 for the first,
and without torchrun), `*` for every attempt; without `@` a rule fires in the first attempt
only, so an elastic restart runs clean. A transient fault (a full disk that was cleared)
is a rule of one attempt. Unset, nothing is installed and the loop pays nothing.
"""

from __future__ import annotations

import errno
import os
import signal
import time

import torch

from pipeline.config import ConfigError
from pipeline.run import checkpoint as ckpt

SIGNALS = {
    "sigstop": signal.SIGSTOP,
    "sigterm": signal.SIGTERM,
    "sigusr1": signal.SIGUSR1,
    "sigkill": signal.SIGKILL,
}
WRITE_ERRORS = {"enospc": errno.ENOSPC, "eio": errno.EIO}
WRITER_ONLY = (*WRITE_ERRORS, "torn")  # faults of the checkpoint writer (rank 0)
KINDS = ("nan_loss", "slow_start", "resume_kill", *SIGNALS, *WRITER_ONLY)
FORM = "KIND:RANK:STEP[-LAST][@ATTEMPT]"


class Faults:
    def __init__(self, rules: list[tuple[str, int, int]]):
        self.rules = rules  # (kind, first step, last step) for this rank and attempt
        self.step = 0  # the step being made; after it, the step whose checkpoint is written

    def __bool__(self) -> bool:
        return bool(self.rules)

    def active(self, kind: str, step: int) -> bool:
        return any(k == kind and lo <= step <= hi for k, lo, hi in self.rules)

    def has(self, *kinds: str) -> bool:
        return any(k in kinds for k, _, _ in self.rules)

    def install(self, model: torch.nn.Module) -> None:
        """nan_loss: a forward hook on the (unwrapped) model poisons its output; write faults:
        the checkpoint writer's hook (pipeline.run.checkpoint.write_fault)."""

        def hook(module, args, output):
            if module.training and self.active("nan_loss", self.step):
                nll, state = output
                return nll * float("nan"), state
            return output

        if self.has("nan_loss"):
            model.register_forward_hook(hook)
        if self.has(*WRITER_ONLY):
            ckpt.write_fault = self.on_write

    def before_step(self, step: int) -> None:
        self.step = step
        for kind, sig in SIGNALS.items():
            if self.active(kind, step):
                os.kill(os.getpid(), sig)

    def after_resume(self) -> None:
        """Start-up, the checkpoint read: resume_kill ends this process here."""
        if self.has("resume_kill"):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_write(self, writer) -> None:
        """Called by the checkpoint writer before each chunk: halfway through the file that
        last.pt names (not best.pt) at this step, fail or die."""
        if writer.path.name == "best.pt" or writer.written * 2 < writer.expected:
            return
        for kind, code in WRITE_ERRORS.items():
            if self.active(kind, self.step):
                raise OSError(code, os.strerror(code))
        if self.active("torn", self.step):
            writer.flush()  # what was written so far reaches the temporary file
            os.kill(os.getpid(), signal.SIGKILL)


def parse(spec: str, rank: int, attempt: int = 0) -> Faults:
    rules = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        body, at, when = item.partition("@")
        try:
            kind, on_rank, steps = body.split(":")
            lo, _, hi = steps.partition("-")
            rule = (kind, int(on_rank), int(lo), int(hi or lo))
            fires_in = None if when.strip() == "*" else int(when) if at else 0
        except ValueError:
            raise ConfigError(f"PIPELINE_FAULTS: '{item}' is not {FORM}") from None
        if kind not in KINDS:
            raise ConfigError(f"PIPELINE_FAULTS: unknown fault '{kind}' (known: {KINDS})")
        if kind in WRITER_ONLY and rule[1] != 0:
            raise ConfigError(
                f"PIPELINE_FAULTS: '{item}': {kind} is a fault of the checkpoint writer, rank 0"
            )
        if rule[1] == rank and fires_in in (None, attempt):
            rules.append((kind, rule[2], rule[3]))
    return Faults(rules)


def _attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def slow_start(rank: int) -> None:
    for kind, seconds, _ in parse(os.environ.get("PIPELINE_FAULTS", ""), rank, _attempt()).rules:
        if kind == "slow_start":
            time.sleep(seconds)


def from_env(rank: int, model: torch.nn.Module) -> Faults | None:
    ckpt.write_fault = None  # an earlier run in this process may have set it
    spec = os.environ.get("PIPELINE_FAULTS", "")
    if not spec:
        return None
    faults = parse(spec, rank, _attempt())
    if not faults:
        return None
    faults.install(model)
    return faults
