"""Elastic restarts and resizing with real torchrun jobs on gloo.

Kill and restart: a 2-rank job under `torchrun --max-restarts=1` (one agent, or two agents as
two simulated nodes meeting at a c10d rendezvous on 127.0.0.1) has one worker SIGKILLed right
after a periodic checkpoint was written (it kills itself at a known step: PIPELINE_FAULTS,
pipeline/faults.py); the agent restarts every worker, they resume from `checkpoints/last.pt`
by themselves, and the job ends with exactly the parameters of an uninterrupted 2-rank run. Resize: a checkpoint written by 2 ranks resumes on 1, and one written
by 1 rank resumes on 2, ending where the uninterrupted run ends (to float rounding). The model
has dropout and weight drop: the masks are a pure function of (seed, step, global stream), so
neither a restart nor a resize needs saved random state.

The soak that repeated these kill scenarios many times (docs/benchmarks.md, "Distributed")
was a one-off script: `git show 5a22952:bench/elastic_soak.py`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY,
    assert_same_params_across_world_sizes,
    continue_when_pending,
    descendants,
    free_port,
    kill_tree,
    load_ckpt,
    stopped_worker,
    sub_env,
    torchrun,
    wait_until,
)

from pipeline.__main__ import main

pytestmark = pytest.mark.slow  # every test here runs torchrun jobs

K = 160  # steps of every run here; epochs of 37 minibatches (data.max_chars=1200)
KILL_AT = 11  # a worker SIGKILLs itself before this step, right after step 10's checkpoint
BASE = [
    *TINY,
    "data.max_chars=1200",
    "train.sampling=consecutive",
    "train.epochs=10",
    f"train.max_steps={K}",
    "train.log_every=40",
    "train.checkpoint_every=5",
    "train.keep_checkpoints=100",
    "model.kind=lstm",
    "model.num_layers=2",
    "model.dropout=0.3",
    "model.weight_drop=0.2",
    "train.optimizer=adamw",
    "train.lr=0.01",
]
TIMEOUT = 240  # per torchrun job; an idle machine needs about 10 s


# ---------------------------------------------------------------- helpers


def kill_and_restart(run_dir: Path, nodes: int, victim_rank: int, share_store: bool = True):
    """Run the job with worker `victim_rank` SIGKILLing itself before step KILL_AT (in the
    first attempt only), the agents restarting it. `share_store=False` sets
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store every rendezvous round). Every agent
    gets the fault: the rank keeps its node across the restart (c10d orders the nodes by a
    descriptor fixed for the agent's life), where its agent counts a restart, so the fault
    fires once. Returns each agent's exit status and its output."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = sub_env(PIPELINE_FAULTS=f"sigkill:{victim_rank}:{KILL_AT}")
    if not share_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    args = ["train", *BASE, f"run.dir={run_dir}"]
    rdzv = (nodes, free_port(), f"elastic{os.getpid()}{time.monotonic_ns() % 10**6}")
    logs = [run_dir / f"agent{i}.log" for i in range(nodes)]
    with contextlib.ExitStack() as files:
        procs = [
            torchrun(
                2 // nodes,
                args,
                timeout=TIMEOUT,
                env=env,
                extra=["--max-restarts=1"],
                rdzv=rdzv if nodes > 1 else None,
                popen=True,
                stdout=files.enter_context(open(log, "w")),
            )
            for log in logs
        ]
        try:
            codes = [p.wait(timeout=TIMEOUT + 30) for p in procs]
        finally:
            for p in procs:
                kill_tree(p)
    return codes, "\n".join(f"--- {log.name}\n{log.read_text()}" for log in logs)


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Uninterrupted runs: 2 ranks under torchrun, and 1 process; periodic checkpoints of
    both are kept for the resize tests."""
    root = tmp_path_factory.mktemp("elastic")
    torchrun(2, ["train", *BASE, f"run.dir={root / 'w2'}"], timeout=TIMEOUT)
    assert main(["train", *BASE, f"run.dir={root / 'w1'}"]) == 0
    return root


# One node with torchrun's defaults (the agent shares its store: the trainer's per-restart
# namespace, dist._restart_store, makes the restart connect); two nodes with the recommended
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (restart counts may differ between nodes).
@pytest.mark.parametrize(
    "nodes,victim,share", [(1, 1, True), (2, 0, False)], ids=["one_node", "two_nodes"]
)
def test_killed_worker_restarts_and_ends_exactly(runs, tmp_path, nodes, victim, share):
    run_dir = tmp_path / "run"
    codes, log = kill_and_restart(run_dir, nodes, victim, share_store=share)
    assert codes == [0] * nodes, f"agents exited with {codes}\n{log[-6000:]}"
    assert "exitcode: -9" in log, log[-6000:]  # the victim's SIGKILL, in torchrun's report
    # the restarted workers resumed from the checkpoint of the step before the kill
    resumed = f"resumed from '{run_dir / 'checkpoints' / 'last.pt'}' at step {KILL_AT - 1} "
    assert log.count(resumed) == 1 and log.count("resumed from") == 1, log[-6000:]
    final, reference = load_ckpt(run_dir), load_ckpt(runs / "w2")
    assert final["step"] == K
    diff = [
        k for k in reference["model"] if not torch.equal(reference["model"][k], final["model"][k])
    ]
    assert not diff, f"parameters differ from the uninterrupted run: {diff}"


def _resume_copy(src: Path, step: int, dest: Path) -> str:
    """A fresh run dir resuming from `src`'s periodic checkpoint of `step` (a mid-epoch one)."""
    dest.mkdir(parents=True)
    shutil.copy(src / "checkpoints" / f"step_{step:08d}.pt", dest / "start.pt")
    return f"train.resume={dest / 'start.pt'}"


def test_resize_two_ranks_to_one(runs, tmp_path):
    saved = load_ckpt(runs / "w2", "step_00000050.pt")
    assert saved["world_size"] == 2 and saved["batch_in_epoch"] == 50 - 37
    assert [tuple(h.shape) for h in saved["hidden"]] == [(2, 4, 32)] * 2  # GLOBAL batch of 4
    resume = _resume_copy(runs / "w2", 50, tmp_path / "r")
    assert main(["train", *BASE, f"run.dir={tmp_path / 'r'}", resume]) == 0
    final, straight = load_ckpt(tmp_path / "r"), load_ckpt(runs / "w1")
    assert final["step"] == K
    assert_same_params_across_world_sizes(straight["model"], final["model"])


def test_resize_one_rank_to_two(runs, tmp_path):
    resume = _resume_copy(runs / "w1", 50, tmp_path / "r")
    proc = torchrun(2, ["train", *BASE, f"run.dir={tmp_path / 'r'}", resume], timeout=TIMEOUT)
    assert "saved with 1 ranks" in proc.stdout + proc.stderr
    final, straight = load_ckpt(tmp_path / "r"), load_ckpt(runs / "w2")
    assert final["step"] == K and final["world_size"] == 2
    assert_same_params_across_world_sizes(straight["model"], final["model"])


def test_sigterm_to_torchrun_saves_and_resumes_exactly(runs, tmp_path):
    """SIGTERM to the agent (as `scancel` or the sbatch trap): it forwards SIGTERM to the
    workers, which agree on it, save and exit 75; the agent itself exits 1 (torchrun reports
    the signal), which launch/slurm.sbatch maps to a requeue. The resumed job ends exactly.

    At a known step: rank 1 stops itself (SIGSTOP) before step STOP; once it is stopped the
    agent gets SIGTERM; once the forwarded SIGTERM waits in the stopped rank it is continued:
    both ranks have the signal at their stop check after step STOP (train.signal_check_every
    divides it), so that step is saved."""
    run_dir, stop = tmp_path / "run", 12
    args = ["train", *BASE, f"run.dir={run_dir}", "train.signal_check_every=2"]
    env = sub_env(PIPELINE_FAULTS=f"sigstop:1:{stop}")
    launcher = torchrun(2, args, timeout=TIMEOUT, env=env, popen=True)  # `timeout` AGENT
    try:
        agent = wait_until(lambda: descendants(launcher.pid)[:1], 30, "torchrun", launcher)[0]
        rank1 = stopped_worker(f"run.dir={run_dir}", 1, TIMEOUT, launcher)
        assert load_ckpt(run_dir)["step"] == 10  # the periodic checkpoint before the stop
        os.kill(agent, signal.SIGTERM)  # the agent forwards it to both ranks
        continue_when_pending(rank1, signal.SIGTERM)
        out, _ = launcher.communicate(timeout=TIMEOUT)
    finally:
        kill_tree(launcher)
    saved = load_ckpt(run_dir)
    assert launcher.returncode == 1, out
    assert saved["step"] == stop and f"preempted: saved step {stop} to " in out, out
    torchrun(2, ["train", *BASE, f"run.dir={run_dir}"], timeout=TIMEOUT)
    final, straight = load_ckpt(run_dir), load_ckpt(runs / "w2")
    assert final["step"] == K
    assert all(torch.equal(final["model"][n], p) for n, p in straight["model"].items())
