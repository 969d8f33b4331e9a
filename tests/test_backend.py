"""dist.backend: auto is nccl on CUDA and gloo on the CPU; gloo lets ranks share one GPU;
NCCL asked to put two ranks on one device, or to run on the CPU, is an exit-2 error that
says what to do. (Two ranks on one GPU over gloo: tests/test_gpu.py.)"""

from __future__ import annotations

import pytest
from conftest import TINY

from pipeline import config
from pipeline.__main__ import main
from pipeline.config import ConfigError
from pipeline.dist import choose_backend


@pytest.mark.parametrize(
    "requested,device,ranks,gpus,expected",
    [
        ("auto", "cuda", 8, 8, "nccl"),
        ("auto", "cpu", 2, 0, "gloo"),
        ("gloo", "cuda", 2, 1, "gloo"),  # two ranks share the one GPU
        ("gloo", "cuda", 16, 8, "gloo"),
        ("nccl", "cuda", 4, 8, "nccl"),  # fewer ranks than GPUs is fine
        ("gloo", "cpu", 2, 0, "gloo"),
    ],
)
def test_the_backend_for_device_and_counts(requested, device, ranks, gpus, expected):
    assert choose_backend(requested, device, ranks, gpus) == expected


@pytest.mark.parametrize("requested", ["auto", "nccl"])
def test_more_ranks_than_gpus_on_nccl_names_the_counts_and_the_ways_out(requested):
    with pytest.raises(ConfigError) as err:
        choose_backend(requested, "cuda", 2, 1)
    msg = str(err.value)
    assert msg.startswith("config key 'dist.backend'") and "2 ranks" in msg and "1 GPU" in msg
    assert "--nproc_per_node=1" in msg and "dist.backend=gloo" in msg


def test_nccl_on_the_cpu_is_an_error():
    with pytest.raises(ConfigError, match="nccl needs CUDA"):
        choose_backend("nccl", "cpu", 1, 0)


def test_the_key_takes_only_known_backends():
    assert config.load(None, []).dist.backend == "auto"
    assert config.load(None, ["dist.backend=gloo"]).dist.backend == "gloo"
    with pytest.raises(ConfigError, match="dist.backend"):
        config.load(None, ["dist.backend=mpi"])


def test_nccl_on_the_cpu_exits_2_before_training(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", *TINY, "train.device=cpu", "dist.backend=nccl", f"run.dir={run_dir}"])
    assert code == 2 and "config key 'dist.backend'" in capsys.readouterr().err
    assert not run_dir.exists()
