"""When a run stops early: SIGTERM/SIGUSR1 (preemption), the wall-time limit and a tripped
non-finite guard (divergence), agreed on by all ranks, so every rank leaves the loop at the
same step."""

from __future__ import annotations

import math
import signal
import time

import torch

from pipeline import dist


class Stopper:
    def __init__(self, time_limit: float, check_every: int, world_size: int):
        self.signalled = False
        self.deadline = time.monotonic() + time_limit if time_limit else math.inf
        self.check_every = check_every
        self.alone = world_size == 1
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signalled = True

    def poll(self, step: int, guard=None, final: bool = False, elapsed: float = 0.0):
        """(reason, agreed elapsed seconds): reason "diverged", "preempted", "time_limit" or
        "" (go on); the elapsed time every rank agrees on (the slowest's), or None between
        checks. With several ranks one collective every `check_every` steps carries it all;
        alone, signals and the clock are looked at every step (no device value), the guard
        every `check_every` steps. `final` (the last step) is alike on every rank."""
        due = final or step % self.check_every == 0
        if self.alone:
            diverged = due and guard is not None and bool(guard.flag().item())
            preempt, late, agreed = self.signalled, time.monotonic() > self.deadline, elapsed
        elif not due:
            return "", None
        else:
            late = time.monotonic() > self.deadline
            flags = torch.tensor([self.signalled, late, 0, round(elapsed * 1000)])
            if guard is not None:
                flags = flags.to(guard.streak.device)
                flags[2:3] = guard.flag()
            elif torch.distributed.get_backend() == "nccl":
                flags = flags.cuda()
            preempt, late, diverged, elapsed_ms = dist.all_reduce_max(flags).tolist()
            agreed = elapsed_ms / 1000
        if diverged:  # before preemption: a diverged run must not save
            return "diverged", agreed
        return ("preempted" if preempt else "time_limit" if late else ""), agreed

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
