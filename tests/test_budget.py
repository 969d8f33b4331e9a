"""train.time_budget: the run trains for the budget, its cosine ends at the stop, the plans
(and the last horizon) are written to config.yaml and checkpoints, a resume continues the
same curve, and a rerun of config.yaml repeats the run bit for bit.

The trainer's runs here are in-process under an injected clock (pipeline.training.budget.clock): a
training step and an evaluation advance it by set amounts (saves by nothing), so every plan,
the stop step and the training time are exact, and `expected` derives them from the
budget's rules (TimeBudget, pipeline/training/budget.py) as Trainer.fit applies them. One real 2-rank
job under torchrun runs on the real clock. The budget's accuracy on real machines is
measured in docs/benchmarks.md ("Time budgets")."""

from __future__ import annotations

import contextlib
import io
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import TINY, load_ckpt, metrics, torchrun

from pipeline import config
from pipeline.__main__ import main
from pipeline.config import TrainConfig
from pipeline.training import budget as budget_mod
from pipeline.training import stopper as stopper_mod
from pipeline.training import trainer as train_mod
from pipeline.training.budget import REPLAN_AT, SLACK, TimeBudget, occurrences
from pipeline.training.optim import lr_at, schedule_progress
from pipeline.training.trainer import PREEMPTED_EXIT

BUDGET = 8.0
BASE = [
    *TINY,
    "data.max_chars=3000",
    "data.valid_fraction=0.1",
    "model.kind=lstm",
    "model.dropout=0.1",
    "train.optimizer=adamw",
    "train.lr=0.01",
    "train.schedule=cosine",
    "train.warmup_steps=20",
    "train.epochs=100000",
    "train.log_every=20",
    "train.eval_every=200",
    "train.checkpoint_every=300",
    f"train.time_budget={BUDGET}",
    "train.time_limit=60",  # a safety net: a broken budget would otherwise run 100000 epochs
]


def test_occurrences_count_the_interval_ends_and_the_stop():
    assert occurrences(10, 0, 35) == 3 + 1  # 10, 20, 30 and the stop at 35
    assert occurrences(10, 5, 30) == 3  # 10, 20, 30 (the stop is one of them)
    assert occurrences(0, 5, 30) == 1  # no interval: the stop alone


def test_a_plan_fills_what_is_left_of_the_budget():
    b = TimeBudget(100.0, step=0, warmup_steps=0)
    # 40 s spent at step 100; 0.05 s a step, 1 s an evaluation every 200, 0.5 s a save
    # every 500: the largest H with (H-100)*0.05 + evals + saves <= 100*0.995 - 40 = 59.5
    h = b.plan(100, 40.0, 0.05, 1.0, 0.5, 200, 500, cap=10**9)
    cost = (h - 100) * 0.05 + occurrences(200, 100, h) + 0.5 * occurrences(500, 100, h)
    cost_next = (h - 99) * 0.05 + occurrences(200, 100, h + 1) + 0.5 * occurrences(500, 100, h + 1)
    assert cost <= 59.5 < cost_next
    # the next re-plan: when half the budget has passed, whatever the step
    assert b.due(300, 50.0) == "plan" and not b.due(300, 49.9) and not b.due(301, None)
    # a re-plan a little before the 50 s mark counts as the mark: the next one aims at 75 s
    b.plan(300, 49.7, 0.05, 1.0, 0.5, 200, 500, cap=10**9)
    assert b.due(806, 75.0) == "plan" and not b.due(306, 74.9)
    assert b.plan(100, 40.0, 0.05, 1.0, 0.5, 200, 500, cap=500) == 500  # max_steps/epochs
    assert b.plan(100, 99.9, 0.05, 1.0, 0.5, 200, 500, cap=10**9) == 101  # at least a step
    assert not b.due(101, 99.95)  # nothing left to re-plan
    assert b.due(101, 100.0) == "spent" and b.due(5000, 250.0) == "spent"  # the stop


def test_the_first_plan_comes_after_the_probe_when_its_time_or_warm_up_ends():
    for warmup in (0, 21, 500):
        b = TimeBudget(4.0, step=0, warmup_steps=warmup)
        assert b.due(19, 3.0) == "" and b.due(20, None) == "probe"
        b.after_probe()
        assert b.due(21, 0.01) == ("plan" if warmup == 21 else "")
        assert b.due(30, 0.04 * 4.0) == "plan"  # FIRST of the budget has passed
    assert TimeBudget(0.0, step=0, warmup_steps=0).due(20, 1e9) == ""  # no budget: nothing


def test_a_re_plan_keeps_the_lr_continuous_and_ends_at_the_new_horizon():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.0, schedule="cosine", warmup_steps=10)
    assert schedule_progress(60, 10, [(0, 110)]) == pytest.approx(0.5)  # the plain cosine
    assert lr_at(cfg, 60, 110) == lr_at(cfg, 60, [(0, 110)])
    plans = [(5, 110), (60, 210)]  # at step 60, half done, the rest re-aimed at step 210
    assert schedule_progress(60, 10, plans) == pytest.approx(0.5)
    assert schedule_progress(135, 10, plans) == pytest.approx(0.75)
    assert schedule_progress(210, 10, plans) == 1.0 and lr_at(cfg, 210, plans) == 0.0
    assert lr_at(cfg, 59, plans) == pytest.approx(lr_at(cfg, 59, [(0, 110)]))
    assert lr_at(cfg, 7, plans) == pytest.approx(0.8)  # warm-up whatever the plans
    assert lr_at(cfg, 30, []) == 1.0  # no plan yet: the peak


# ---------------------------------------------------------------- runs under an injected clock


class PacedClock:
    """An injected clock: training steps and evaluations advance it by set amounts."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pace(monkeypatch, step_s, eval_s: float) -> PacedClock:
    """pipeline.training.budget.clock, and the clock of train.time_limit, become a PacedClock that
    each training step advances by `step_s` (a number, or a function of the clock's time)
    and each evaluation by `eval_s`."""
    clock = PacedClock()
    monkeypatch.setattr(budget_mod, "clock", clock)
    monkeypatch.setattr(stopper_mod, "time", SimpleNamespace(monotonic=clock))
    step, evaluate = train_mod.train_step, train_mod.evaluate

    def paced_step(*a, **k):
        clock.now += step_s(clock.now) if callable(step_s) else step_s
        return step(*a, **k)

    def paced_eval(*a, **k):
        clock.now += eval_s
        return evaluate(*a, **k)

    monkeypatch.setattr(train_mod, "train_step", paced_step)
    monkeypatch.setattr(train_mod, "evaluate", paced_eval)
    return clock


PACED = 100.0  # s of budget; 0.25 s a step, 0.5 s an evaluation every 50 steps (binary exact)
STEP_S, EVAL_S, EVAL_EVERY, SAVE_EVERY, WARMUP = 0.25, 0.5, 50, 300, 20
PACED_ARGS = [
    *BASE,
    f"train.time_budget={PACED}",
    f"train.eval_every={EVAL_EVERY}",
    f"train.checkpoint_every={SAVE_EVERY}",
    f"train.warmup_steps={WARMUP}",
    "train.time_limit=300",  # the safety net (paced seconds)
    "train.threads=1",
]
STOP = 250  # the resume test's stop: between the re-plans at 50% and 75%


def expected(
    step=0, spent=0.0, plans=(), total=None, stop=None, step_s=STEP_S, stop_eval=False,
    preempted=False,
):  # fmt: skip
    """(plans, last step, training time) of a paced one-process run from `step` (a resume:
    `spent` seconds, its saved `plans`, running to `total`) at `step_s` seconds a step (an
    evaluation EVAL_S), by the budget's rules as
    Trainer.fit applies them: after each step the stop check reads the clock; the budget
    probes, plans or re-plans (the first plan of a process, without an evaluation yet,
    evaluates at its step first); an evaluation every EVAL_EVERY steps and at the end. A
    stop at `stop` saves there, evaluating first with `stop_eval` (a time limit), or, when
    `preempted`, only where an evaluation is due."""
    b = TimeBudget(PACED, step, WARMUP)
    plans, clock, evaluated = [list(p) for p in plans], spent, False
    total = total or 10**9
    while True:
        step, clock = step + 1, clock + step_s
        if step == stop:
            evaluates = stop_eval or (preempted and step % EVAL_EVERY == 0)
            return plans, step, clock + (EVAL_S if evaluates else 0.0)
        done = step >= total
        due = "" if done else b.due(step, clock)
        assert due != "spent", "a constant pace never overruns its plan"
        if due == "probe":
            b.after_probe()
        planned_eval = due == "plan" and not evaluated
        if planned_eval:
            clock, evaluated = clock + EVAL_S, True
        if due == "plan":
            total = b.plan(step, clock, step_s, EVAL_S, 0.0, EVAL_EVERY, SAVE_EVERY, 10**9)
            plans.append([step, total])
        if (done or step % EVAL_EVERY == 0) and not planned_eval:
            clock, evaluated = clock + EVAL_S, True
        if done:
            return plans, step, clock


def lr_fraction(lr: float, peak: float = 0.01, floor: float = 0.001) -> float:
    """How far along the cosine (lr 0.01 down to 0.001) an LR is: 0 at the peak, 1 at the end."""
    return math.acos(2 * (lr - floor) / (peak - floor) - 1) / math.pi


def paced_main(args: list[str]) -> tuple[int, str]:
    """`pipeline train ARGS` in this process; its exit status and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", *args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def paced_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("paced") / "run"
    with pytest.MonkeyPatch.context() as mp:
        pace(mp, STEP_S, EVAL_S)
        code, out = paced_main([*PACED_ARGS, f"run.dir={run_dir}"])
    assert code == 0, out
    return run_dir, out


@pytest.mark.slow  # trains for seconds
def test_trains_for_the_budget_and_the_cosine_ends_at_the_stop(paced_run):
    """The first plan comes at the first step after the probe (step SKIP + PROBE = 20), 4% of
    the budget having passed, with an evaluation; re-plans at 25, 50, 75, 90 and 97% of it;
    the run ends at its last horizon with the LR at the end of the cosine, its training time
    filling the budget but its SLACK."""
    run_dir, out = paced_run
    plans, end, train_time = expected()
    first = TimeBudget(PACED, 0, WARMUP).plan(
        21, 21 * STEP_S + EVAL_S, STEP_S, EVAL_S, 0.0, EVAL_EVERY, SAVE_EVERY, 10**9
    )
    assert plans[0] == [21, first] and len(plans) == 1 + len(REPLAN_AT) and end == plans[-1][1]
    assert PACED * (1 - SLACK) - (STEP_S + EVAL_S) < train_time <= PACED * (1 - SLACK)

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    assert resolved["schedule_plans"] == plans
    assert resolved["schedule_steps"] == resolved["max_steps"] == end
    for _, horizon in plans:
        assert f"the LR schedule ends at step {horizon} (train.schedule_steps" in out
    assert "spent at step" not in out
    saved = load_ckpt(run_dir)
    assert saved["step"] == end and saved["train_time"] == train_time
    assert saved["config"]["train"]["schedule_plans"] == plans
    assert (
        saved["config"]["train"]["schedule_steps"] == saved["config"]["train"]["max_steps"] == end
    )

    events = metrics(run_dir, "time/elapsed_s")
    assert events[-1]["step"] == end and events[-1]["time/elapsed_s"] == train_time
    last = metrics(run_dir, "opt/lr")[-1]
    assert last["step"] == end
    # the LR of the last update, step end - 1: the last of the cosine (lr * min_lr_ratio)
    tcfg = config.from_dict(saved["config"]).train
    assert last["opt/lr"] == lr_at(tcfg, end - 1, plans) == pytest.approx(0.001, rel=1e-12)
    assert lr_fraction(last["opt/lr"]) > 0.99


@pytest.mark.slow  # trains for seconds
def test_a_rerun_of_the_resolved_config_repeats_the_run(paced_run, tmp_path):
    """config.yaml holds the plans: nothing is measured (on the real clock), the LR curve is
    the same, the parameters bit-identical."""
    run_dir, _ = paced_run
    again = tmp_path / "again"
    code, out = paced_main(["--config", str(run_dir / "config.yaml"), f"run.dir={again}"])
    assert code == 0 and "time budget" not in out
    a, b = load_ckpt(run_dir), load_ckpt(again)
    assert b["step"] == a["step"]
    assert b["config"]["train"]["schedule_plans"] == a["config"]["train"]["schedule_plans"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow  # trains for seconds
@pytest.mark.parametrize("stop_by", ["time_limit", "sigterm"])
def test_a_resume_continues_the_curve_and_the_budget(paced_run, tmp_path, monkeypatch, stop_by):
    """Stopped at step STOP (by train.time_limit, which evaluates, saves and exits 0; or by a
    real SIGTERM at that step, which saves and exits 75), resumed without a limit on a
    machine half as fast: the saved plans go on (a prefix of the final ones, and the
    uninterrupted run's up to STOP), the budget re-plans with what is left at the new pace
    (the resumed process probes and plans anew: an earlier horizon), and the run ends at
    its last horizon within the budget, counted across both processes."""
    run_dir = tmp_path / "run"
    args = [*PACED_ARGS, f"run.dir={run_dir}"]
    _, _, at_stop = expected(stop=STOP)  # the clock after step STOP (STOP - 1: 0.25 s less)
    pace(monkeypatch, STEP_S, EVAL_S)
    if stop_by == "time_limit":
        code, out = paced_main([*args, f"train.time_limit={at_stop - STEP_S / 2}"])
        assert code == 0 and "preempted" not in out, out
    else:
        monkeypatch.setenv("PIPELINE_FAULTS", f"sigterm:0:{STOP}")
        code, out = paced_main(args)
        monkeypatch.delenv("PIPELINE_FAULTS")
        assert code == PREEMPTED_EXIT and f"preempted: saved step {STOP}" in out, out
    stopped = load_ckpt(run_dir)
    plans, step, spent = expected(
        stop=STOP, stop_eval=stop_by == "time_limit", preempted=stop_by == "sigterm"
    )
    straight = load_ckpt(paced_run[0])["config"]["train"]["schedule_plans"]
    assert stopped["config"]["train"]["schedule_plans"] == plans == straight[: len(plans)]
    assert len(plans) == 3 and stopped["step"] == step == STOP
    assert stopped["train_time"] == spent
    assert metrics(run_dir)[-1]["step"] == STOP
    horizon = stopped["config"]["train"]["schedule_steps"]
    assert stopped["config"]["train"]["max_steps"] == horizon > STOP

    pace(monkeypatch, 2 * STEP_S, EVAL_S)  # a new process: its clock starts anew
    code, out = paced_main(args)
    resumed = f"resumed from '{run_dir / 'checkpoints' / 'last.pt'}' at step {STOP}"
    assert code == 0 and resumed in out, out
    final_plans, end, train_time = expected(STOP, spent, plans, horizon, step_s=2 * STEP_S)
    assert len(final_plans) > len(plans) and end < horizon  # re-planned with what is left
    final = load_ckpt(run_dir)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    assert resolved["schedule_plans"] == final["config"]["train"]["schedule_plans"] == final_plans
    assert resolved["schedule_plans"][: len(plans)] == plans
    assert final["step"] == end == resolved["max_steps"] == resolved["schedule_steps"]
    assert final["train_time"] == train_time <= PACED * (1 - SLACK)


@pytest.mark.slow
def test_two_ranks_agree_on_the_plans(tmp_path):
    """The ranks time their own steps; the slowest rank's figures decide, at steps both
    ranks know, so the collectives meet and both end at the same step: the last horizon,
    or (a machine that slowed down after the last re-plan) where the spent budget stopped
    them, which config.yaml's max_steps then says."""
    run_dir = tmp_path / "run"
    proc = torchrun(2, ["train", *BASE, f"run.dir={run_dir}", "train.time_budget=10"])
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    horizon, end = resolved["schedule_steps"], resolved["max_steps"]
    assert f"the LR schedule ends at step {horizon}" in proc.stdout  # rank 0 reports it
    spent = f"spent at step {end}" in proc.stdout
    assert end == horizon or (spent and end < horizon)
    saved = load_ckpt(run_dir)
    assert saved["step"] == end and saved["world_size"] == 2
    assert saved["config"]["train"]["schedule_plans"] == resolved["schedule_plans"]
    assert max(e["step"] for e in metrics(run_dir)) == end


@pytest.mark.parametrize("factor,at", [(3.0, 0.3), (10.0, 0.3), (10.0, 0.8), (0.5, 0.3)], ids=str)
def test_the_budget_holds_when_the_pace_changes(tmp_path, monkeypatch, factor, at):
    """100 s of budget at 0.25 s a step (0.5 s an evaluation) until `at` of it has passed,
    then steps `factor` times as long: re-plans fall when their time is due, a run that
    has spent its budget stops, and the run ends within 5% of its budget with its LR near
    the end of the cosine (as far as the last re-plan could bring it)."""
    budget = 100.0
    pace(monkeypatch, lambda now: 0.25 * (factor if now >= at * budget else 1.0), 0.5)
    run_dir = tmp_path / "run"
    args = [*BASE, f"train.time_budget={budget}", "train.eval_every=50", "train.log_every=50"]
    args += ["model.dropout=0", "train.time_limit=300", "train.threads=1"]
    assert main(["train", *args, f"run.dir={run_dir}"]) == 0
    final = load_ckpt(run_dir)
    assert final["train_time"] == pytest.approx(budget, rel=0.05)
    plans = final["config"]["train"]["schedule_plans"]
    assert len(plans) >= 4  # planned and re-planned on time, whatever the pace
    last = metrics(run_dir, "opt/lr")[-1]
    assert lr_fraction(last["opt/lr"]) > 0.9, (last, plans)
