"""launch/slurm.sbatch on a real (throwaway) SLURM cluster: two slurmd processes stand in for
two nodes; the job runs one torchrun agent per node, 1 rank each (world size 2).

Needs root and the Debian packages slurmctld, slurmd, slurm-client, munge (.ci/run installs
them); skipped with the reason otherwise. Daemons are stopped by pid, also on failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, TORCHRUN, assert_params_close, load_ckpt, run_cli, sub_env
from slurm_cluster import SlurmCluster, missing

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(bool(missing()), reason=missing() or "SLURM available"),
]

CONFIG = "configs/seed_scratch_consecutive.yaml"
SMALL = [*TINY, "train.epochs=2", "train.max_steps=40", "train.resume=auto"]
VENV_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2) as c:
        yield c


def submit(cluster: SlurmCluster, out_dir: Path, args: list[str]) -> str:
    env = sub_env(
        CONFIG=CONFIG, ARGS=" ".join(args), NPROC_PER_NODE=1, TORCHRUN=TORCHRUN, PATH=VENV_PATH
    )
    return cluster.sbatch(
        ["--nodes=2", f"--output={out_dir}/%x-%j.out", str(ROOT / "launch" / "slurm.sbatch")],
        env=env,
        cwd=ROOT,
    )


def job_output(info: dict) -> str:
    return Path(info["StdOut"]).read_text(errors="replace")


def test_sbatch_two_nodes_completes_and_matches_one_process(cluster, tmp_path):
    job = submit(cluster, tmp_path, [*SMALL, f"run.dir={tmp_path / 'slurm'}"])
    run_cli(["train", "--config", CONFIG, *SMALL, f"run.dir={tmp_path / 'one'}"])
    info = cluster.wait(job, timeout=240)
    out = job_output(info)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out
    assert info["NumNodes"] == "2" and "2 node(s) x 1 rank(s)" in out, out
    a, b = load_ckpt(tmp_path / "one"), load_ckpt(tmp_path / "slurm")
    assert (b["world_size"], b["step"]) == (2, a["step"]) == (2, 40)
    assert_params_close(a["model"], b["model"], rtol=1e-5)


@pytest.mark.slow  # optional: about 40 s (SLURM holds a requeued job back ~15 s)
def test_preempted_job_saves_requeues_and_resumes(cluster, tmp_path):
    """USR1 to the batch script (what --signal=B:USR1@120 sends before the time limit):
    the script forwards SIGTERM, the ranks save and exit 75, the job is requeued and the
    second run resumes from the checkpoint and finishes."""
    run_dir = tmp_path / "run"
    steps = 600  # ~5 s of training here: time to signal it after the first checkpoint
    args = [
        *TINY,
        "model.hidden_size=128",
        "train.epochs=1000",
        f"train.max_steps={steps}",
        "train.checkpoint_every=20",
        "train.signal_check_every=5",
        "train.resume=auto",
    ]
    job = submit(cluster, tmp_path, [*args, f"run.dir={run_dir}"])
    # The same 2-rank run, uninterrupted (alongside: it only slows the job down). Not 1
    # process: over 600 steps at lr 1 float rounding differences grow (losses agree to 1e-7
    # at step 248, to 1e-2 by step 496), and this test is about the resume, not world size.
    launch = ["timeout", "-k", "10", "300", TORCHRUN, "--standalone", "--nproc_per_node=2"]
    train = ["-m", "pipeline", "train", "--config", CONFIG, *args, f"run.dir={tmp_path / 'ref'}"]
    ref_log = tmp_path / "ref.log"
    with open(ref_log, "wb") as log:
        reference = subprocess.Popen([*launch, *train], cwd=ROOT, env=sub_env(), stdout=log,
                                     stderr=subprocess.STDOUT)  # fmt: skip
    first = run_dir / "checkpoints" / "last.pt"  # periodic ones are pruned as it goes
    cluster.wait(
        job,
        timeout=180,
        until=lambda info: first.exists() or info["JobState"] not in ("PENDING", "RUNNING"),
    )
    assert first.exists(), cluster.job(job)
    cluster.run(["scancel", "--batch", "--signal=USR1", job])
    info = cluster.wait(job, timeout=240)  # requeued jobs stay in the queue (pending)
    out = job_output(info)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), out
    assert "requeueing" in out and "restart 1" in out, out
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert resumed, out
    at_step = int(resumed[0].split(" at step ")[1].split()[0])
    assert 20 <= at_step < steps, resumed
    assert reference.wait(timeout=330) == 0, ref_log.read_text()
    a, b = load_ckpt(tmp_path / "ref"), load_ckpt(run_dir)
    assert (a["step"], b["step"]) == (steps, steps)
    # Preempted mid-epoch, resumed with every rank's hidden state: same as never stopped.
    assert_params_close(a["model"], b["model"], rtol=1e-5)
