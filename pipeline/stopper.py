"""When a run stops early: SIGTERM/SIGUSR1 (preemption) and the wall-time limit, agreed on by
all ranks, so that every rank leaves the loop at the same step."""

from __future__ import annotations

import math
import signal
import time

import torch

from . import dist


class Stopper:
    def __init__(self, time_limit: float, check_every: int, world_size: int):
        self.signalled = False
        self.deadline = time.monotonic() + time_limit if time_limit else math.inf
        self.check_every = 1 if world_size == 1 else check_every
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signalled = True

    def poll(self, step: int) -> str:
        """ "preempted", "time_limit" or "" (go on); a collective every `check_every` steps."""
        if step % self.check_every:
            return ""
        late = time.monotonic() > self.deadline
        if torch.distributed.is_initialized():  # alone, nothing to agree on: no tensor per step
            flags = torch.tensor([self.signalled, late], dtype=torch.int32)
            if torch.distributed.get_backend() == "nccl":
                flags = flags.cuda()
            preempt, late = dist.all_reduce_max(flags).tolist()
        else:
            preempt = self.signalled
        return "preempted" if preempt else "time_limit" if late else ""

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
