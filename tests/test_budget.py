"""train.time_budget: the run trains for the budget on whatever machine runs it, its cosine ends
at the stop, the plans (and the last horizon) are written to config.yaml and checkpoints, a
resume continues the same curve, and a rerun of config.yaml repeats the run bit for bit. The
time figures are generous, since CI machines are loaded: the budget's own accuracy is
measured in docs/benchmarks.md ("Time budgets")."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import TINY, load_ckpt, run_cli, torchrun

from pipeline.__main__ import main
from pipeline.budget import TimeBudget, occurrences
from pipeline.config import TrainConfig
from pipeline.metrics import read_jsonl
from pipeline.optim import lr_at, schedule_progress

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


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("budget")
    proc = run_cli(["train", *BASE, f"run.dir={run_dir}"], timeout=240)
    return run_dir, proc


@pytest.mark.slow
def test_trains_for_the_budget_and_the_cosine_ends_at_the_stop(budget_run):
    """It ends at its last horizon, or (a hiccup after the last re-plan on a loaded machine)
    where the spent budget stopped it, config.yaml's max_steps saying where."""
    run_dir, proc = budget_run
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    horizon, plans = resolved["schedule_steps"], resolved["schedule_plans"]
    assert f"the LR schedule ends at step {horizon}" in proc.stdout
    assert len(plans) >= 2 and plans[-1][1] == horizon  # planned, then re-planned
    saved = load_ckpt(run_dir)
    spent = f"spent at step {saved['step']}" in proc.stdout
    end = resolved["max_steps"]
    assert saved["step"] == end and saved["config"]["train"]["schedule_plans"] == plans
    assert saved["config"]["train"]["max_steps"] == end and (
        end < horizon if spent else end == horizon
    )
    events = read_jsonl(run_dir / "metrics.jsonl")
    elapsed = max(e["time/elapsed_s"] for e in events if "time/elapsed_s" in e)
    assert elapsed == pytest.approx(BUDGET, rel=0.25)
    last = [e for e in events if "opt/lr" in e][-1]
    assert last["step"] == end
    # the last step's LR is in the last 1% of the cosine (lr 0.01 down to 0.001); a stop by
    # the spent budget comes within the last 3% of the time, after the 97% re-plan
    floor, peak = 0.001, 0.01
    frac = math.acos(2 * (last["opt/lr"] - floor) / (peak - floor) - 1) / math.pi
    assert frac > (0.9 if spent else 0.99), last["opt/lr"]


@pytest.mark.slow
def test_a_rerun_of_the_resolved_config_repeats_the_run(budget_run, tmp_path, capsys):
    """config.yaml holds the plans: nothing is measured, the LR curve is the same."""
    run_dir, _ = budget_run
    again = tmp_path / "again"
    assert main(["train", "--config", str(run_dir / "config.yaml"), f"run.dir={again}"]) == 0
    assert "time budget" not in capsys.readouterr().out
    a, b = load_ckpt(run_dir)["model"], load_ckpt(again)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_resume_continues_the_curve_and_the_budget(tmp_path, capsys):
    """Stopped by train.time_limit halfway, resumed without a limit: the saved plans go on (a
    prefix of the final ones), the budget re-plans with what is left, and the run ends at
    its last horizon within the budget, counted across both processes."""
    run_dir = tmp_path / "run"
    assert main(["train", *BASE, f"run.dir={run_dir}", f"train.time_limit={BUDGET / 2}"]) == 0
    stopped = load_ckpt(run_dir)
    plans = stopped["config"]["train"]["schedule_plans"]
    assert plans and 0 < stopped["step"] < stopped["config"]["train"]["schedule_steps"]
    capsys.readouterr()
    assert main(["train", *BASE, f"run.dir={run_dir}"]) == 0
    assert "resumed from" in capsys.readouterr().out
    final = load_ckpt(run_dir)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    assert resolved["schedule_plans"][: len(plans)] == plans
    # at its last horizon, or earlier where the machine slowed down after the last re-plan
    # and the spent budget stopped it (then config.yaml's max_steps says where)
    assert final["step"] == final["config"]["train"]["max_steps"] == resolved["max_steps"]
    assert final["step"] <= resolved["schedule_steps"]
    assert final["train_time"] == pytest.approx(BUDGET, rel=0.25)


@pytest.mark.slow
def test_two_ranks_agree_on_the_plans(tmp_path):
    """The ranks time their own steps; the slowest rank's figures decide, at steps both
    ranks know, so the collectives meet and both end at the same horizon."""
    run_dir = tmp_path / "run"
    proc = torchrun(2, ["train", *BASE, f"run.dir={run_dir}", "train.time_budget=10"])
    horizon = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["schedule_steps"]
    assert f"the LR schedule ends at step {horizon}" in proc.stdout  # rank 0 reports it
    saved = load_ckpt(run_dir)
    assert saved["step"] == horizon and saved["world_size"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == horizon


class PacedClock:
    """An injected clock: training steps and evaluations advance it by set amounts."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("factor,at", [(3.0, 0.3), (10.0, 0.3), (10.0, 0.8), (0.5, 0.3)], ids=str)
def test_the_budget_holds_when_the_pace_changes(tmp_path, monkeypatch, factor, at):
    """100 s of budget at 0.25 s a step (0.5 s an evaluation) until `at` of it has passed,
    then steps `factor` times as long: re-plans fall when their time is due, a run that
    has spent its budget stops, and the run ends within 5% of its budget with its LR near
    the end of the cosine (as far as the last re-plan could bring it)."""
    from pipeline import budget as budget_mod
    from pipeline import train as train_mod

    budget, clock = 100.0, PacedClock()
    monkeypatch.setattr(budget_mod, "clock", clock)
    step, evaluate = train_mod.train_step, train_mod.evaluate

    def paced_step(*a, **k):
        clock.now += 0.25 * (factor if clock.now >= at * budget else 1.0)
        return step(*a, **k)

    def paced_eval(*a, **k):
        clock.now += 0.5
        return evaluate(*a, **k)

    monkeypatch.setattr(train_mod, "train_step", paced_step)
    monkeypatch.setattr(train_mod, "evaluate", paced_eval)
    run_dir = tmp_path / "run"
    args = [*BASE, f"train.time_budget={budget}", "train.eval_every=50", "train.log_every=50"]
    args += ["model.dropout=0", "train.time_limit=300", "train.threads=1"]
    assert main(["train", *args, f"run.dir={run_dir}"]) == 0
    final = load_ckpt(run_dir)
    assert final["train_time"] == pytest.approx(budget, rel=0.05)
    plans = final["config"]["train"]["schedule_plans"]
    assert len(plans) >= 4  # planned and re-planned on time, whatever the pace
    last = [e for e in read_jsonl(run_dir / "metrics.jsonl") if "opt/lr" in e][-1]
    peak, floor = 0.01, 0.001
    frac = math.acos(2 * (last["opt/lr"] - floor) / (peak - floor) - 1) / math.pi
    assert frac > 0.9, (last, plans)
