"""train.time_budget: train for a wall time, the LR schedule ending when the time does.

The schedule needs its horizon in steps, and the steps that fit into a time depend on the
machine, and on a shared machine even on the minute. So the budget measures and plans, then
re-plans as it goes:

- measure: the seconds a step takes from step SKIP until FIRST of the budget has passed or
  warm-up ends (whichever comes first), and one evaluation (validation, samples, best.pt);
- plan: with the slowest rank's figures, the largest horizon H whose steps, evaluations and
  saves fit into what is left,

      elapsed + (H - step) * step_s + evaluations(H) * eval_s + saves(H) * save_s <= budget,

  capped by train.max_steps and train.epochs;
- re-plan when REPLAN_AT of the budget has passed, with the pace since the last plan: the
  rest of the LR decay, from where the LR stands, is re-aimed at the new horizon
  (pipeline.training.optim.schedule_progress), so the LR stays continuous and ends with the budget;
- stop when the budget is spent (a slowdown after the last re-plan), saving last.pt as at a
  time limit.

Plans and the stop fall when their time is due, read from the elapsed time the ranks agree
on at the stop check (pipeline.training.stopper), not at steps computed from an older pace: a
machine that slows down 10x still re-plans on time.

Every plan [step, horizon] is appended to train.schedule_plans, and the last horizon is
train.schedule_steps and train.max_steps, in run.dir/config.yaml and in every checkpoint's
config: a resume continues the same curve (and keeps re-planning with what is left of the
budget), and a rerun of config.yaml (plans given: nothing measured) repeats the run. The
decisions fall at steps every rank computes from agreed values, so the collectives meet.
`clock` is the time source of the trainer and the budget (tests put an injected clock here).
"""

from __future__ import annotations

import math
import statistics
import time

SKIP = 10  # first steps: allocator, kernels and caches warm up
PROBE = 10  # steps timed before the pace is agreed on
FIRST = 0.04  # of the budget spent measuring before the first plan, at most
REPLAN_AT = (0.25, 0.5, 0.75, 0.9, 0.97)  # fractions of the budget where it re-plans
SLACK = 0.005  # of the budget left free for what the measurements did not see
NEAR = 0.01  # of the budget: a re-plan this close before its mark counts as at the mark

clock = time.monotonic


def saved_plans(saved_train: dict) -> dict:
    """The train.* keys a budget run goes on with from its checkpoint: its LR plans so far
    and their last horizon (it then plans again with what is left); {} when it has none."""
    if not saved_train.get("schedule_plans"):
        return {}
    return {k: saved_train[k] for k in ("schedule_plans", "schedule_steps", "max_steps")}


def occurrences(every: int, after: int, upto: int) -> int:
    """Multiples of `every` in (after, upto], plus the one at the stop when `upto` is none."""
    if every <= 0:
        return 1
    return upto // every - after // every + (upto % every != 0)


class TimeBudget:
    def __init__(self, seconds: float, step: int, warmup_steps: int):
        self.seconds = seconds
        self.warmup_steps = warmup_steps
        self.start = step + SKIP  # the timing window opens after this step
        self.probe_at = self.start + PROBE if seconds > 0 else -1
        self.plan_from = math.inf  # agreed elapsed seconds from which the next plan is due
        self.plan_at = -1  # or the step at which it is due (warm-up's end)
        self.spent, self.counted = 0.0, 0  # seconds in training steps of the window
        self.evals: list[float] = []  # seconds of each evaluation (samples, best.pt included)
        self.saves: list[float] = []  # seconds of each periodic or final save

    def count(self, step: int, seconds: float) -> None:
        """The time of the step that ended at `step` (logging, evaluation, saves left out)."""
        if self.seconds > 0 and step > self.start:
            self.spent, self.counted = self.spent + seconds, self.counted + 1

    def due(self, step: int, elapsed: float | None) -> str:
        """ "probe", "plan", "spent" (stop: the budget is used up) or "": a pure function of
        the step and of the elapsed time the ranks agreed on at the stop check (None between
        checks), so every rank decides alike, and a plan falls when its time is due however
        the pace changed since the last one."""
        if self.seconds <= 0:
            return ""
        if step == self.probe_at:
            return "probe"
        if elapsed is not None and elapsed >= self.seconds:
            return "spent"
        if step == self.plan_at or (elapsed is not None and elapsed >= self.plan_from):
            return "plan"
        return ""

    def step_seconds(self) -> float:
        return self.spent / max(1, self.counted)

    def costs(self) -> tuple[float, float]:
        """Mean seconds of an evaluation and of a save so far (0 when none was seen)."""
        mean = statistics.fmean
        return (mean(self.evals) if self.evals else 0.0, mean(self.saves) if self.saves else 0.0)

    def after_probe(self) -> None:
        """The first plan: when FIRST of the budget has passed, or warm-up ends."""
        self.plan_from = FIRST * self.seconds
        if self.warmup_steps > self.probe_at:
            self.plan_at = self.warmup_steps

    def plan(self, step, elapsed, step_s, eval_s, save_s, every_eval, every_save, cap) -> int:
        """The largest horizon <= cap whose remaining steps, evaluations and saves fit; sets
        the time of the next re-plan and restarts the timing window."""

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
        later = [f * self.seconds for f in REPLAN_AT if (f - NEAR) * self.seconds > elapsed]
        self.plan_from, self.plan_at = (later[0] if later else math.inf), -1
        self.start, self.spent, self.counted = step, 0.0, 0
        return lo
