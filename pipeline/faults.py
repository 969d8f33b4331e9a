"""Faults on purpose, for tests that provoke the real thing at a known step (no races):

    PIPELINE_FAULTS="nan_loss:1:5-7,sigstop:1:15"   # KIND:RANK:STEP[-LAST], comma-separated

- nan_loss: that rank's loss is multiplied by NaN in those steps (1-based, the step being
  made), so a real non-finite gradient reaches every rank through DDP's all-reduce;
- sigstop: that rank stops itself (SIGSTOP) before that step, as a hung rank does;
- sigterm, sigkill: that rank sends itself SIGTERM (preemption: the stop check then saves
  and exits 75) or SIGKILL (a crash) before that step;
- slow_start: that rank sleeps STEP seconds before it reads its data (a slow preparation
  while the other ranks wait at a collective).

Faults fire only in the first attempt of a job (TORCHELASTIC_RESTART_COUNT unset or 0), so
an elastic restart runs clean. Unset, nothing is installed and the loop pays nothing.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from .config import ConfigError

SIGNALS = {"sigstop": signal.SIGSTOP, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}
KINDS = ("nan_loss", "slow_start", *SIGNALS)


class Faults:
    def __init__(self, rules: list[tuple[str, int, int]]):
        self.rules = rules  # (kind, first step, last step) for this rank
        self.step = 0

    def __bool__(self) -> bool:
        return bool(self.rules)

    def active(self, kind: str, step: int) -> bool:
        return any(k == kind and lo <= step <= hi for k, lo, hi in self.rules)

    def install(self, model: torch.nn.Module) -> None:
        """nan_loss: a forward hook on the (unwrapped) model poisons its output."""

        def hook(module, args, output):
            if module.training and self.active("nan_loss", self.step):
                nll, state = output
                return nll * float("nan"), state
            return output

        model.register_forward_hook(hook)

    def before_step(self, step: int) -> None:
        self.step = step
        for kind, sig in SIGNALS.items():
            if self.active(kind, step):
                os.kill(os.getpid(), sig)


def parse(spec: str, rank: int) -> Faults:
    rules = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            kind, on_rank, steps = item.split(":")
            lo, _, hi = steps.partition("-")
            rule = (kind, int(on_rank), int(lo), int(hi or lo))
        except ValueError:
            raise ConfigError(f"PIPELINE_FAULTS: '{item}' is not KIND:RANK:STEP[-LAST]") from None
        if kind not in KINDS:
            raise ConfigError(f"PIPELINE_FAULTS: unknown fault '{kind}' (known: {KINDS})")
        if rule[1] == rank:
            rules.append((kind, rule[2], rule[3]))
    return Faults(rules)


def _spec() -> str:
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    return os.environ.get("PIPELINE_FAULTS", "") if first_attempt else ""


def slow_start(rank: int) -> None:
    for kind, seconds, _ in parse(_spec(), rank).rules:
        if kind == "slow_start":
            time.sleep(seconds)


def from_env(rank: int, model: torch.nn.Module) -> Faults | None:
    spec = _spec()
    if not spec:
        return None
    faults = parse(spec, rank)
    if not faults:
        return None
    faults.install(model)
    return faults
