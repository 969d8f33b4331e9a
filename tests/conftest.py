"""Shared test set-up: offline everything, data from ../shared/data, helpers to run the CLI
in-process or as real subprocesses (python -m pipeline / torchrun) under a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PIPELINE_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
JAYCHOU_ZIP = DATA_DIR / "jaychou_lyrics.txt.zip"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

os.environ["PIPELINE_DATA_DIR"] = str(DATA_DIR)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Small, fast settings shared by many tests (chapter model at a small size).
TINY = [
    "data.max_chars=4000",
    "data.newlines=space",
    "model.hidden_size=32",
    "train.batch_size=4",
    "train.num_steps=8",
    "train.lr=1.0",
    "train.clip=1.0",
    "generate.prefixes=[]",
    "logging.wandb.mode=disabled",
    "logging.progress=lines",
]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    torch.manual_seed(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sub_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(
    args: list[str], timeout: float = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` as a real subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or sub_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def torchrun(
    nproc: int,
    args: list[str],
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m pipeline ARGS`, always under a timeout
    (a missing rendezvous partner would otherwise wait 600 s)."""
    cmd = [
        "timeout",
        "-k",
        "10",
        str(int(timeout)),
        TORCHRUN,
        "--standalone",
        f"--nproc_per_node={nproc}",
        *(extra or []),
        "-m",
        "pipeline",
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout + 30, env=env or sub_env()
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def load_ckpt(run_dir: Path, name: str = "last.pt") -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / name, weights_only=True)


def assert_params_close(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
