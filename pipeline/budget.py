"""train.time_budget: train for a wall time, the LR schedule ending when the time does.

The schedule needs its horizon in steps, and the steps that fit into a time depend on the
machine. So the budget measures: the seconds a step takes from a few steps in until 3% of
the budget has passed or warm-up ends (whichever comes first), then one evaluation
(validation, samples, best.pt) and one checkpoint save. With the slowest rank's figures it
takes the largest horizon H whose steps, evaluations and saves fit into what is left:

    elapsed + (H - step) * step_s + evaluations(H) * eval_s + saves(H) * save_s <= budget

capped by train.max_steps and train.epochs. H becomes train.schedule_steps in
run.dir/config.yaml and in every checkpoint's config: a resume continues the same curve,
and a rerun with train.schedule_steps=H (no budget) repeats the run; bitwise when the
measurement ended inside warm-up, where the LR does not depend on H. The decisions fall at
steps every rank computes alike (a probe after SKIP + PROBE steps agrees on the pace), so
the collectives meet.
"""

from __future__ import annotations

import math

SKIP = 3  # first steps: allocator and caches warm up
PROBE = 10  # steps timed before the pace is agreed on
FRACTION = 0.03  # of the budget spent measuring, at most
SLACK = 0.005  # of the budget left free for what the measurement did not see


def occurrences(every: int, after: int, upto: int) -> int:
    """Multiples of `every` in (after, upto], plus the one at the stop when `upto` is none."""
    if every <= 0:
        return 1
    return upto // every - after // every + (upto % every != 0)


class TimeBudget:
    def __init__(self, seconds: float, step: int, warmup_steps: int):
        self.seconds = seconds
        self.start = step + SKIP
        self.probe_at = self.start + PROBE
        self.fix_at = math.inf if seconds > 0 else -1  # known after the probe
        self.warmup_steps = warmup_steps
        self.spent, self.counted = 0.0, 0  # seconds in training steps since `start`

    def count(self, step: int, seconds: float) -> None:
        """The time of the step that ended at `step` (logging, evaluation, saves left out)."""
        if self.start < step and self.fix_at >= step:
            self.spent, self.counted = self.spent + seconds, self.counted + 1

    def due(self, step: int) -> str:
        """ "probe", "fix" or ""; a pure function of the step and of agreed values."""
        if step == self.probe_at and self.fix_at == math.inf:
            return "probe"
        return "fix" if step == self.fix_at else ""

    def step_seconds(self) -> float:
        return self.spent / max(1, self.counted)

    def plan(self, step_s: float) -> None:
        """From the agreed pace: time until FRACTION of the budget, but not past warm-up."""
        more = math.ceil(FRACTION * self.seconds / max(step_s, 1e-9)) - PROBE
        end = self.probe_at + max(0, more)
        if self.warmup_steps > self.probe_at:
            end = min(end, self.warmup_steps)
        self.fix_at = end

    def horizon(self, step, elapsed, step_s, eval_s, save_s, every_eval, every_save, cap) -> int:
        """The largest H <= cap whose remaining steps, evaluations and saves fit."""
        self.fix_at = -1

        def cost(h: int) -> float:
            return (
                (h - step) * step_s
                + occurrences(every_eval, step, h) * eval_s
                + occurrences(every_save, step, h) * save_s
            )

        left = self.seconds * (1 - SLACK) - elapsed
        lo, hi = step + 1, max(step + 1, cap)
        while lo < hi:  # cost grows with h
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid - 1)
        return lo
