"""Checkpoints as wandb artifacts (`logging.wandb.log_model`), and a wandb summary and config
that stay true while the run lives: real offline runs, read back from their .wandb logs."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from conftest import TINY, load_ckpt, proc_state, run_cli, sub_env, wait_until

from pipeline.__main__ import main
from pipeline.tracking.wandb_history import read_records

RUN = [
    *TINY,
    "data.valid_fraction=0.1",
    "train.max_steps=12",
    "train.eval_every=4",
    "train.checkpoint_every=4",
    "train.keep_checkpoints=1",
    "logging.wandb.mode=offline",
    "train.threads=1",
]


def records(wandb_dir: Path) -> list:
    (path,) = sorted(Path(wandb_dir).rglob("run-*.wandb"))
    return list(read_records(path))


def artifacts(recs) -> list[tuple[str, list[str], str]]:
    """(name, aliases, staged file) of each model artifact the run logged, in order."""
    out = []
    for r in recs:
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model":
            (entry,) = r.artifact.manifest.contents
            out.append((r.artifact.name, sorted(r.artifact.aliases), entry.local_path))
    return out


def summary(recs) -> dict:
    out = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def test_log_model_all_versions_every_checkpoint_with_latest_and_best(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", *RUN, f"run.dir={run_dir}", "logging.wandb.log_model=all"]) == 0
    recs = records(tmp_path / "wandb")
    arts = artifacts(recs)
    run_id = load_ckpt(run_dir)["wandb_run_id"]
    assert {name for name, _, _ in arts} == {f"model-{run_id}"}  # one artifact, its versions
    periodic = [a for a in arts if "best" not in a[1]]
    assert len(periodic) == 3 and all(a[1] == ["latest"] for a in periodic)  # steps 4, 8, 12
    assert any("best" in a[1] for a in arts)  # each best.pt written
    for _, _, staged in arts:  # staged inside the run directory, still there after the prune
        assert Path(staged).is_file() and Path(staged).resolve().is_relative_to(run_dir.resolve())
    assert not (run_dir / "checkpoints" / "step_00000004.pt").exists()  # pruned, yet staged
    last = load_ckpt(run_dir)
    assert (
        Path(periodic[-1][2]).stat().st_size == (run_dir / "checkpoints" / "last.pt").stat().st_size
    )
    assert last["step"] == 12 and "WANDB_DATA_DIR" not in os.environ


def test_log_model_end_logs_last_and_best_once(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", *RUN, f"run.dir={run_dir}", "logging.wandb.log_model=end"]) == 0
    arts = artifacts(records(tmp_path / "wandb"))
    assert [a[1] for a in arts] == [["latest"], ["best", "latest"]]  # wandb moves latest too
    sizes = [Path(a[2]).stat().st_size for a in arts]
    cdir = run_dir / "checkpoints"
    assert sizes == [(cdir / "last.pt").stat().st_size, (cdir / "best.pt").stat().st_size]


def test_log_model_off_logs_no_model(tmp_path):
    assert main(["train", *RUN, f"run.dir={tmp_path / 'run'}"]) == 0
    assert artifacts(records(tmp_path / "wandb")) == []


@pytest.mark.slow
def test_a_killed_run_already_holds_its_best_value(tmp_path):
    """The run stops itself before step 9 (after best.pt of step 8 was written) and is
    killed once its log holds best/val_bpc: the value is there although it never finished."""
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    env = sub_env(
        WANDB_DIR=wandb_dir,
        PIPELINE_FAULTS="sigstop:0:9",
        WANDB__TRANSACTION_LOG_FLUSH_INTERVAL=0.05,
    )
    proc = run_cli(["train", *RUN, f"run.dir={run_dir}"], env=env, popen=True)
    try:
        wait_until(lambda: proc_state(proc.pid) == "T", 120, "the stop", proc)
        on_disk = load_ckpt(run_dir, "best.pt")["best_val_loss"]  # written before the stop

        def logged_best():  # the summary of the best.pt on disk (earlier ones come first)
            files = sorted(Path(wandb_dir).rglob("run-*.wandb"))
            got = summary(read_records(files[0])) if files else {}
            return "best/val_bpc" in got and got.get("best/val_loss") == on_disk

        wait_until(logged_best, 60, "best.pt's best/val_bpc in the log")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -9
    best = load_ckpt(run_dir, "best.pt")
    got = summary(records(wandb_dir))
    assert "final/step" not in got  # it never finished
    assert got["best/val_loss"] == pytest.approx(best["best_val_loss"], rel=1e-12)
    assert got["best/val_bpc"] == pytest.approx(best["best_val_loss"] / 0.6931471805599453)


@pytest.mark.slow
def test_a_re_plan_updates_the_schedule_in_the_wandb_config(tmp_path):
    run_dir = tmp_path / "run"
    args = [*RUN, "train.max_steps=0", "train.epochs=100000", "train.time_budget=3"]
    args += ["train.schedule=cosine", "train.checkpoint_every=0", "train.eval_every=50"]
    assert main(["train", *args, f"run.dir={run_dir}", "train.time_limit=60"]) == 0
    final = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    values = {}
    for r in records(tmp_path / "wandb"):
        if r.WhichOneof("record_type") == "config":
            for item in r.config.update:
                values[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    assert values["train.schedule_steps"] == final["schedule_steps"] > 0
    assert values["train.max_steps"] == final["max_steps"]
    assert values["train.schedule_plans"] == final["schedule_plans"]
