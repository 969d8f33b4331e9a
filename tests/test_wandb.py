"""Real offline wandb runs: config and summary, one run per job, resume after a kill,
disabled/auto modes, no secrets in files; progress lines."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    TINY,
    kill_tree,
    load_ckpt,
    metrics,
    proc_state,
    run_cli,
    sub_env,
    torchrun,
    wait_until,
)

from pipeline.tracking.progress import Progress
from pipeline.tracking.wandb_history import attempts, history_steps, read_records
from pipeline.tracking.wandb_sink import wandb_mode
from pipeline.training.autoamp import candidates

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"
SMALL = [
    *TINY,
    "data.valid_fraction=0.1",
    "train.max_steps=12",
    "train.log_every=4",
    "train.eval_every=6",
]


def wandb_env(wandb_dir: Path, **extra) -> dict:
    env = sub_env(WANDB_DIR=wandb_dir, **extra)
    env.pop("WANDB_MODE", None)  # the config's logging.wandb.mode decides
    return env


def read_run(path: Path) -> dict:
    """Run id, config, final summary and history steps of one attempt's .wandb file."""
    out = {"config": {}, "summary": {}}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
            out["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            out["tags"] = list(record.run.tags)
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    out["steps"] = history_steps(path)
    return out


def wandb_files(wandb_dir: Path) -> list[Path]:
    return sorted(Path(wandb_dir).rglob("run-*.wandb"))


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """One real offline run with an API key in the environment (mode offline)."""
    tmp = tmp_path_factory.mktemp("offline")
    run_dir, wandb_dir = tmp / "run", tmp / "wandb"
    proc = run_cli(
        [
            "train",
            f"run.dir={run_dir}",
            *SMALL,
            "train.checkpoint_every=6",
            "train.amp=auto",
            "logging.wandb.mode=offline",
            "generate.prefixes=[分开]",
            "generate.length=5",
        ],
        env=wandb_env(wandb_dir, WANDB_API_KEY=FAKE_KEY),
        timeout=180,
    )
    return run_dir, wandb_dir, proc


@pytest.mark.slow
def test_offline_run_holds_config_and_final_summary(offline_run):
    run_dir, wandb_dir, _ = offline_run
    files = wandb_files(wandb_dir)
    assert len(files) == 1 and files[0].parent.name.startswith("offline-run-")
    assert not (run_dir / "wandb").exists()  # WANDB_DIR wins over the run directory
    run = read_run(files[0])
    assert run["id"] == load_ckpt(run_dir)["wandb_run_id"]
    assert run["config"]["model.hidden_size"] == 32  # flattened dotted keys
    assert run["config"]["train.max_steps"] == 12
    assert run["config"]["world_size"] == 1 and "torch_version" in run["config"]
    # train.amp=auto resolved: fp32 where this CPU has no native bf16 (the one candidate),
    # else measured (pipeline.training.autoamp); the choice and how it was made in the wandb config
    used = load_ckpt(run_dir)["precision"]
    assert used in candidates(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert run["config"]["train.amp"] == "auto" and run["config"]["amp_used"] == used
    assert f"amp-{used}" in run["tags"] and "amp-auto" not in run["tags"]
    source = run["config"]["amp_auto/source"]
    assert source in ("measured", "only candidate") and (source == "measured") == (
        f"amp_auto/tokens_per_s/{'fp32' if used == 'off' else used}" in run["config"]
    )
    head = (run_dir / "config.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert head == f"# precision used: {used} (train.amp=auto)"

    train, val = metrics(run_dir, "train/perplexity"), metrics(run_dir, "val/perplexity")
    assert [e["step"] for e in train] == [4, 8, 12] and [e["step"] for e in val] == [6, 12]
    summary = run["summary"]
    assert summary["train/perplexity"] == pytest.approx(train[-1]["train/perplexity"], rel=1e-12)
    assert summary["val/perplexity"] == pytest.approx(val[-1]["val/perplexity"], rel=1e-12)
    best = min(e["val/perplexity"] for e in val)
    assert summary["best/val_perplexity"] == pytest.approx(best, rel=1e-9)
    assert run["steps"] == [4, 6, 8, 12]  # one history row per logged step
    assert any(k.startswith("samples") for k in summary)  # the wandb.Table of samples


@pytest.mark.slow
def test_api_key_never_written(offline_run):
    run_dir, wandb_dir, proc = offline_run
    assert FAKE_KEY not in proc.stdout + proc.stderr
    written = [p for d in (run_dir, wandb_dir) for p in d.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in written) and any(p.suffix == ".wandb" for p in written)
    for p in written:
        assert FAKE_KEY.encode() not in p.read_bytes(), p


@pytest.mark.slow
def test_progress_prints_a_line_per_log_interval(offline_run):
    _, _, proc = offline_run
    lines = [ln for ln in proc.stdout.splitlines() if "train perplexity" in ln]
    assert [ln.split()[1] for ln in lines] == ["4", "8", "12"]
    assert all("tokens/s" in ln for ln in lines)


def test_progress_auto_is_lines_off_a_tty_and_a_bar_on_one(monkeypatch, capsys):
    metrics = {
        "train/perplexity": 12.5,
        "train/loss": 2.5,
        "opt/grad_norm": 0.1,
        "perf/tokens_per_s": 1000.0,
    }
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    p = Progress("auto", total=10, initial=0)
    p.update(5, metrics)
    assert p.mode == "lines" and "step 5" in sys.stdout.getvalue()

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    bar = Progress("auto", total=10, initial=0)
    bar.update(5, metrics)
    bar.close()
    assert bar.mode == "bar" and "ppl=12.50" in capsys.readouterr().err
    assert sys.stdout.getvalue() == ""  # no plain lines next to the bar


@pytest.mark.slow
def test_disabled_writes_nothing_to_wandb_dir(tmp_path):
    wandb_dir = tmp_path / "wandb"
    run_cli(
        [
            "train",
            f"run.dir={tmp_path / 'run'}",
            *TINY,
            "train.max_steps=4",
            "logging.wandb.mode=disabled",
        ],
        env=sub_env(WANDB_DIR=wandb_dir, WANDB_MODE="offline"),
        timeout=120,
    )
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert not wandb_dir.exists() or not any(wandb_dir.iterdir())
    assert not (tmp_path / "run" / "wandb").exists()


def test_auto_mode_is_offline_without_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password x\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"


@pytest.mark.slow
def test_two_ranks_auto_without_credentials_make_one_offline_run(tmp_path):
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    env = wandb_env(wandb_dir, HOME=tmp_path, NETRC=tmp_path / "no-netrc")
    env.pop("WANDB_API_KEY", None)
    torchrun(
        2,
        [
            "train",
            f"run.dir={run_dir}",
            *TINY,
            "train.max_steps=4",
            "train.log_every=2",
            "logging.wandb.mode=auto",
        ],
        env=env,
        timeout=150,
    )
    files = wandb_files(wandb_dir)
    assert len(files) == 1 and files[0].parent.name.startswith("offline-run-")
    run = read_run(files[0])
    assert run["id"] == load_ckpt(run_dir)["wandb_run_id"]
    assert run["config"]["world_size"] == 2 and run["steps"] == [2, 4]


def kill_args(run_dir: Path, *extra: str) -> list[str]:
    """The CLI arguments of the kill-and-resume tests: 12 steps, a checkpoint every 5."""
    return [
        "train",
        f"run.dir={run_dir}",
        *TINY,
        "train.max_steps=12",
        "train.log_every=1",
        "train.checkpoint_every=5",
        *extra,
        "logging.wandb.mode=offline",
    ]


def killed_after_step_8(args: list[str], wandb_dir: Path, flush: str) -> None:
    """The run SIGKILLed right after step 8 was logged (before step 9: PIPELINE_FAULTS).
    `lost`: it kills itself, wandb's file not flushed (the default 15 s interval). `flushed`:
    it stops itself there (sigstop), wandb flushing every 0.05 s; the kill comes once wandb's
    file holds the checkpoint's step 5."""
    if flush == "lost":
        env = wandb_env(wandb_dir, PIPELINE_FAULTS="sigkill:0:9")
        proc = run_cli(args, env=env, timeout=180, check=False)
        assert proc.returncode == -9, proc.stdout + proc.stderr
        return
    env = wandb_env(wandb_dir, PIPELINE_FAULTS="sigstop:0:9")
    env["WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"] = "0.05"
    proc = run_cli(args, env=env, popen=True)
    try:
        wait_until(lambda: proc_state(proc.pid) == "T", 180, "the stop before step 9", proc)

        def synced_5() -> bool:
            files = wandb_files(wandb_dir)
            return bool(files) and 5 in history_steps(files[0])

        wait_until(synced_5, 60, "wandb's file to hold step 5")  # it was sent at step 5
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -9
    finally:
        kill_tree(proc)


@pytest.mark.slow
@pytest.mark.parametrize("flush", ["lost", "flushed"])
def test_resume_after_kill_continues_one_run_without_gaps(tmp_path, flush):
    """Checkpoint at 5, killed after logging 8. `lost`: wandb's file had not been flushed
    (the default 15 s interval), so the resume re-sends 1..5. `flushed`: it holds exactly
    1..5 (events after the checkpoint were held back), so nothing is sent twice."""
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    args = kill_args(run_dir, "train.resume=auto")
    killed_after_step_8(args, wandb_dir, flush)
    assert load_ckpt(run_dir)["step"] == 5
    assert max(e["step"] for e in metrics(run_dir)) == 8  # past it
    (before,) = wandb_files(wandb_dir)
    assert history_steps(before) == ([] if flush == "lost" else [1, 2, 3, 4, 5])

    env = wandb_env(wandb_dir)
    run_cli(args, env=env, timeout=180)
    run_id = load_ckpt(run_dir)["wandb_run_id"]
    files = attempts(wandb_dir / "wandb", run_id)
    assert len(files) == 2 and files[0] == before
    assert wandb_files(wandb_dir) == files  # no other run: one id for both attempts
    assert read_run(files[1])["id"] == run_id
    steps = [s for f in files for s in history_steps(f)]
    assert steps == list(range(1, 13))  # strictly increasing, no gap, no duplicate
    train = metrics(run_dir, "train/loss")
    assert [e["step"] for e in train] == list(range(1, 13))
    times = [e["time/elapsed_s"] for e in train]
    assert times == sorted(times)  # wall time continues across the resume


def test_history_reader_rejects_foreign_files(tmp_path):
    (tmp_path / "x.wandb").write_bytes(b"not a wandb file")
    with pytest.raises(ValueError):
        list(read_records(tmp_path / "x.wandb"))
    assert os.path.getsize(tmp_path / "x.wandb") > 0


# Kills itself while the periodic checkpoint of step KILL_IN_SAVE is being written, once
# wandb (flushing every 0.05 s) wrote whatever it was sent: first a marker (a config update)
# goes after it, then the kill waits until wandb's file holds the marker (records are
# written in the order sent). Exit 3 if it never does.
KILLED_IN_SAVE = """
import os, signal, sys, time
import wandb
import pipeline.run.checkpoint as ckpt, pipeline.__main__ as cli
from pipeline.tracking.wandb_history import read_records

def marked(path):
    return any(
        r.WhichOneof("record_type") == "config"
        and any(i.key == "killed_in_save" for i in r.config.update)
        for r in read_records(path)
    )

orig = ckpt.save_atomic
def save_atomic(state, path):
    if path.name == f"step_{int(os.environ['KILL_IN_SAVE']):08d}.pt":
        wandb.run.config.update({"killed_in_save": True}, allow_val_change=True)
        deadline = time.monotonic() + 60
        while not marked(wandb.run.settings.sync_file):
            if time.monotonic() > deadline:
                os._exit(3)
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGKILL)
    orig(state, path)
ckpt.save_atomic = save_atomic
sys.exit(cli.main())
"""


@pytest.mark.slow
def test_kill_during_a_save_sends_no_step_that_the_resume_redoes(tmp_path):
    """Events wait until their checkpoint is on disk: killed while saving step 10, wandb holds
    1..5 (the last checkpoint), not 6..10, which the resume from step 5 logs again; the
    attempts together hold every step once."""
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    args = kill_args(run_dir)
    env = wandb_env(wandb_dir, KILL_IN_SAVE=10, WANDB__TRANSACTION_LOG_FLUSH_INTERVAL=0.05)
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_IN_SAVE, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert load_ckpt(run_dir)["step"] == 5
    (before,) = wandb_files(wandb_dir)
    assert history_steps(before) == [1, 2, 3, 4, 5]
    run_cli(args, env=wandb_env(wandb_dir), timeout=180)
    files = attempts(wandb_dir / "wandb", load_ckpt(run_dir)["wandb_run_id"])
    assert [s for f in files for s in history_steps(f)] == list(range(1, 13))


@pytest.mark.slow
def test_elastic_restart_without_checkpoint_keeps_history_and_run(tmp_path):
    """Under torchrun --max-restarts=1 the first attempt's worker is SIGKILLed right after
    logging step 8 (before step 9: PIPELINE_FAULTS, first attempt only), with no checkpoint
    to resume from (train.checkpoint_every=0): the restarted worker trains again from step 0
    (the same steps, exactly), keeps metrics.jsonl and the wandb run, and logs no step
    twice."""
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    args = [
        "train",
        f"run.dir={run_dir}",
        *TINY,
        "train.max_steps=12",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "logging.wandb.mode=offline",
    ]
    env = wandb_env(wandb_dir, PIPELINE_FAULTS="sigkill:0:9")
    proc = torchrun(1, args, timeout=240, env=env, extra=["--max-restarts=1"])
    assert "exitcode: -9" in proc.stdout + proc.stderr  # the first attempt, killed
    assert "resumed from" not in proc.stdout
    run_id = load_ckpt(run_dir)["wandb_run_id"]
    assert json.loads((run_dir / "run.json").read_text())["wandb_run_id"] == run_id
    files = attempts(wandb_dir / "wandb", run_id)
    assert len(files) == 2 and wandb_files(wandb_dir) == files  # one run, two attempts
    assert [s for f in files for s in history_steps(f)] == list(range(1, 13))
    assert [e["step"] for e in metrics(run_dir, "train/loss")] == list(range(1, 13))


@pytest.mark.slow
def test_sweep_trial_runs_the_command_the_agent_builds(tmp_path):
    """configs/sweep_songci_cpu.yaml: the command `wandb agent` would run for one trial, built
    with wandb's own sweep-command helpers and its macro expansion, runs (offline, shortened
    by overrides appended after the trial's values): its own run directory named by the
    agent's run id, the trial's values in its config, one wandb run with that id whose
    summary holds the sweep's metric."""
    import secrets

    import yaml
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    sweep = yaml.safe_load((ROOT / "configs/sweep_songci_cpu.yaml").read_text(encoding="utf-8"))

    def first(spec: dict):  # one trial: the first of each choice, the low end of each range
        return spec["value"] if "value" in spec else spec.get("values", [spec.get("min")])[0]

    run_id = f"test{secrets.token_hex(4)}"
    trial = {
        "run_id": run_id,
        "program": sweep["program"],
        "args": {k: {"value": first(v)} for k, v in sweep["parameters"].items()},
    }
    macros = create_sweep_command_args(trial)
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[trial["program"]])
    command = []  # the agent's expansion: a chunk "${name}" becomes the macro's list
    for chunk in create_sweep_command(list(sweep["command"])):
        whole = chunk.startswith("${") and chunk.endswith("}") and chunk[2:-1] in macros
        command += macros[chunk[2:-1]] if whole else [chunk]
    assert "train.lr=0.005" in command and "model.dropout_kind=standard" in command
    short = ["train.time_budget=4", "data.max_chars=30000", "model.hidden_size=32"]
    short += ["model.num_layers=1", "eval.batch_size=4", "generate.prefixes=[]"]
    run_dir = ROOT / "runs" / "sweep_songci_cpu" / run_id
    env = wandb_env(tmp_path / "wandb", WANDB_RUN_ID=run_id, WANDB_MODE="offline")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # "python": the venv's
    env["PIPELINE_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        proc = subprocess.run(
            command + short, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        saved = load_ckpt(run_dir)
        assert saved["wandb_run_id"] == run_id
        assert saved["config"]["train"]["lr"] == 0.005
        assert saved["config"]["train"]["batch_size"] == 32
        assert saved["config"]["model"]["hidden_size"] == 32  # the appended override wins
        assert saved["config"]["train"]["schedule_steps"] > 0  # the budget fixed the horizon
        (wandb_file,) = wandb_files(tmp_path / "wandb")
        run = read_run(wandb_file)
        assert run["id"] == run_id and "best/val_bpc" in run["summary"]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
