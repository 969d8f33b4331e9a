"""Elastic restarts and resizing with real torchrun jobs on gloo.

Kill and restart: a 2-rank job under `torchrun --max-restarts=1` (one agent, or two agents as
two simulated nodes meeting at a c10d rendezvous on 127.0.0.1) has one worker SIGKILLed after
a periodic checkpoint was written; the agent restarts every worker, they resume from
`checkpoints/last.pt` by themselves, and the job ends with exactly the parameters of an
uninterrupted 2-rank run. Resize: a checkpoint written by 2 ranks resumes on 1, and one written
by 1 rank resumes on 2, ending where the uninterrupted run ends (to float rounding). The model
has dropout and weight drop: the masks are a pure function of (seed, step, global stream), so
neither a restart nor a resize needs saved random state.

The soak that repeated these kill scenarios many times (docs/benchmarks.md, "Distributed")
was a one-off script: `git show 5a22952:bench/elastic_soak.py`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    TINY,
    TORCHRUN,
    assert_same_params_across_world_sizes,
    free_port,
    load_ckpt,
    sub_env,
    torchrun,
)

from pipeline.__main__ import main

pytestmark = pytest.mark.slow  # every test here runs torchrun jobs

K = 160  # steps of every run here; epochs of 37 minibatches (data.max_chars=1200)
KILL_AFTER = 10  # SIGKILL a worker once the periodic checkpoint of this step exists
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


# ---------------------------------------------------------------- helpers (also the soak's)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def workers(agent_pids: list[int]) -> dict[tuple[int, int], int]:
    """{(RANK, TORCHELASTIC_RESTART_COUNT): pid} of the workers under these agents."""
    tree, found, todo = _children(), {}, list(agent_pids)
    while todo:
        pid = todo.pop()
        todo += tree.get(pid, [])
        try:
            env = dict(
                kv.split("=", 1)
                for kv in Path(f"/proc/{pid}/environ")
                .read_bytes()
                .decode(errors="replace")
                .split("\0")
                if "=" in kv
            )
        except OSError:
            continue
        if "RANK" in env and "TORCHELASTIC_RESTART_COUNT" in env and pid not in agent_pids:
            found[(int(env["RANK"]), int(env["TORCHELASTIC_RESTART_COUNT"]))] = pid
    return found


def agent_commands(run_dir: Path, nodes: int) -> list[list[str]]:
    """One torchrun agent for 2 ranks on one node, or two 1-rank agents as two nodes."""
    args = ["-m", "pipeline", "train", *BASE, f"run.dir={run_dir}"]
    if nodes == 1:
        return [[TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", *args]]
    port, rdzv = free_port(), f"soak{os.getpid()}{time.monotonic_ns() % 10**6}"
    return [
        [
            TORCHRUN,
            "--nnodes=2",
            "--nproc_per_node=1",
            "--max-restarts=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={rdzv}",
            *args,
        ]
        for _ in range(2)
    ]


def kill_and_restart(
    run_dir: Path, nodes: int, victim_rank: int, share_store: bool = True, timeout: float = TIMEOUT
) -> dict:
    """Run the job, SIGKILL worker `victim_rank` once step KILL_AFTER's checkpoint exists,
    let the agents restart it. `share_store=False` sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    (a fresh store every rendezvous round). Returns exit codes, logs, the step killed at."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = sub_env() if share_store else sub_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    logs = [run_dir / f"agent{i}.log" for i in range(nodes)]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=open(log, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for cmd, log in zip(agent_commands(run_dir, nodes), logs)
    ]
    marker = run_dir / "checkpoints" / f"step_{KILL_AFTER:08d}.pt"
    deadline, killed_at = time.monotonic() + timeout, None
    try:
        while killed_at is None and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break  # finished (or failed) before the kill: reported below
            if marker.exists():
                pid = workers([p.pid for p in procs]).get((victim_rank, 0))
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed_at = max(int(p.name[5:13]) for p in marker.parent.glob("step_*.pt"))
            time.sleep(0.02)
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        codes = [None] * nodes
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return {
        "codes": codes,
        "killed_at": killed_at,
        "log": "\n".join(f"--- {log.name}\n{log.read_text()}" for log in logs),
    }


def check_restarted(out: dict, run_dir: Path, reference: dict) -> str:
    """'' when the job restarted, resumed and ended with the reference's exact parameters."""
    if out["killed_at"] is None:
        return "the job ended before a worker could be killed"
    if out["codes"] != [0] * len(out["codes"]):
        return f"agents exited with {out['codes']}"
    if "resumed from" not in out["log"]:
        return "the restarted workers did not resume from a checkpoint"
    final = load_ckpt(run_dir)
    if final["step"] != K:
        return f"last.pt is at step {final['step']}, not {K}"
    diff = [k for k in reference if not torch.equal(reference[k], final["model"][k])]
    return f"parameters differ from the uninterrupted run: {diff}" if diff else ""


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
    reference = load_ckpt(runs / "w2")["model"]
    out = kill_and_restart(tmp_path / "run", nodes, victim, share_store=share)
    problem = check_restarted(out, tmp_path / "run", reference)
    assert not problem, f"{problem}\n{out['log'][-6000:]}"


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
    the signal), which launch/slurm.sbatch maps to a requeue. The resumed job ends exactly."""
    run_dir = tmp_path / "run"
    cmd = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pipeline",
        "train",
        *BASE,
        f"run.dir={run_dir}",
        "train.signal_check_every=2",
    ]
    agent = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=sub_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    first = run_dir / "checkpoints" / "step_00000005.pt"
    deadline = time.monotonic() + TIMEOUT
    while not first.exists() and agent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    agent.send_signal(signal.SIGTERM)
    try:
        out, _ = agent.communicate(timeout=TIMEOUT)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    saved = load_ckpt(run_dir)
    assert agent.returncode != 0 and f"preempted: saved step {saved['step']}" in out, out
    assert 5 <= saved["step"] < K
    torchrun(2, ["train", *BASE, f"run.dir={run_dir}"], timeout=TIMEOUT)
    final, straight = load_ckpt(run_dir), load_ckpt(runs / "w2")
    assert final["step"] == K
    assert all(torch.equal(final["model"][n], p) for n, p in straight["model"].items())
