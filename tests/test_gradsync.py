"""dist.grad_sync: the shared-memory average of CPU ranks on one node (pipeline.training.gradsync)
against DDP, in real processes.

Two ranks: a + b is b + a in floating point and halving is exact, so shm and DDP (gloo's sum,
then the division) give the same bits; a run of the main job's LSTM with dropout ends with
bitwise the same parameters either way. Three ranks (spawned processes, gloo): every rank holds
the same bits, the exact rank-order sum of the gradients divided by the world size, step after step (the two
alternating buffers), with a parameter no rank gave a gradient counted as zero.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import ROOT, free_port, load_ckpt, sub_env, torchrun

from pipeline.config import ConfigError
from pipeline.dist import DistContext
from pipeline.training import gradsync

SHM = Path(gradsync.shm_dir())


def _leftovers() -> set[str]:
    return {p.name for p in SHM.glob("pipeline-grads-*")} if SHM.is_dir() else set()


def test_auto_is_shm_for_cpu_ranks_on_one_node_else_ddp():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert gradsync.choose("auto", DistContext(0, 1, 0, 1, cpu)) == "none"
    assert gradsync.choose("auto", DistContext(0, 2, 0, 2, cpu)) == "shm"
    assert gradsync.choose("auto", DistContext(0, 4, 0, 2, cpu)) == "ddp"  # two nodes
    assert gradsync.choose("auto", DistContext(0, 2, 0, 2, cuda)) == "ddp"
    assert gradsync.choose("ddp", DistContext(0, 2, 0, 2, cpu)) == "ddp"
    with pytest.raises(ConfigError, match="dist.grad_sync.*one node.*4 ranks, 2 on this node"):
        gradsync.choose("shm", DistContext(0, 4, 0, 2, cpu))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    params = [torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)]
    unused = torch.zeros(2, requires_grad=True)
    avg = gradsync.SharedAverage([*params, unused], rank, world)
    seen = []
    for step in range(3):
        gen = torch.Generator().manual_seed(100 * step + rank)  # rank's own gradients
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 10 ** (rank - 1)
        unused.grad = None
        avg()
        seen.append([p.grad.clone() for p in (*params, unused)])
        for p in (*params, unused):
            p.grad = None
    torch.save(seen, f"{out}.{rank}")
    tdist.barrier()
    tdist.destroy_process_group()


def test_three_ranks_hold_the_same_exact_average_step_after_step(tmp_path):
    before = _leftovers()
    world, port = 3, free_port()
    mp.spawn(_worker, args=(world, port, str(tmp_path / "g")), nprocs=world, join=True)
    seen = [torch.load(tmp_path / f"g.{r}") for r in range(world)]
    for step in range(3):
        grads = []
        for rank in range(world):
            gen = torch.Generator().manual_seed(100 * step + rank)
            grads.append([torch.randn(s, generator=gen) * 10 ** (rank - 1) for s in ((3, 4), (5,))])
        for i in range(2):
            want = grads[0][i] / world + grads[1][i] / world + grads[2][i] / world  # rank order
            for rank in range(world):
                assert torch.equal(seen[rank][step][i], want), (step, i, rank)
        for rank in range(world):
            assert torch.equal(seen[rank][step][2], torch.zeros(2))
    assert _leftovers() <= before  # the shared file's name went once every rank mapped it


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (root only; CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root: the full-/dev/shm tests did not run")
    mnt = tmp_path / "shm"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_shm_is_a_config_error_naming_the_key_and_leaves_nothing(tiny_tmpfs, monkeypatch):
    monkeypatch.setenv("PIPELINE_SHM_DIR", str(tiny_tmpfs))
    with pytest.raises(ConfigError) as err:
        gradsync.SharedAverage([torch.zeros(1 << 20, requires_grad=True)], 0, 1)
    assert "'dist.grad_sync'" in str(err.value) and str(tiny_tmpfs) in str(err.value)
    assert "8 MiB" in str(err.value) and "dist.grad_sync=ddp" in str(err.value)
    assert list(tiny_tmpfs.iterdir()) == []


MAIN_JOB = [
    "train",
    "--config",
    str(ROOT / "configs/jaychou.yaml"),
    "train.max_steps=12",
    "train.amp=off",
    "train.device=cpu",
    "train.resume=never",
    "train.threads=1",
    "eval.max_chars=2000",
    "generate.prefixes=[]",
    "logging.wandb.mode=disabled",
    "logging.progress=off",
]


@pytest.mark.slow
def test_shm_and_ddp_end_with_the_same_bits(tmp_path):
    before = _leftovers()
    params = {}
    for mode in ("shm", "ddp"):
        run_dir = tmp_path / mode
        torchrun(2, [*MAIN_JOB, f"run.dir={run_dir}", f"dist.grad_sync={mode}"])
        params[mode] = load_ckpt(run_dir)["model"]
    assert params["shm"].keys() == params["ddp"].keys()
    for k in params["shm"]:
        assert torch.equal(params["shm"][k], params["ddp"][k]), k
    assert _leftovers() <= before


@pytest.mark.slow
def test_a_full_shm_falls_back_to_ddp_for_auto_and_stops_shm(tmp_path, tiny_tmpfs):
    """The main job's 26 MiB buffer cannot fit a 1 MiB tmpfs: `auto` says so and trains
    with DDP; `shm` named is exit 2 before any step; the tmpfs is left empty."""
    env = sub_env(PIPELINE_SHM_DIR=str(tiny_tmpfs))
    short = [*MAIN_JOB, "train.max_steps=2"]
    out = torchrun(2, [*short, f"run.dir={tmp_path / 'auto'}"], env=env)
    assert "dist.grad_sync=auto uses ddp" in out.stdout + out.stderr
    assert load_ckpt(tmp_path / "auto")["step"] == 2
    out = torchrun(
        2, [*short, f"run.dir={tmp_path / 'named'}", "dist.grad_sync=shm"], env=env, check=False
    )
    assert out.returncode != 0
    assert "error: config key 'dist.grad_sync': shm needs 26 MiB" in out.stdout + out.stderr
    assert not (tmp_path / "named" / "checkpoints" / "last.pt").exists()
    assert list(tiny_tmpfs.iterdir()) == []
