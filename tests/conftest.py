"""Shared test set-up: offline everything, data from ../shared/data, helpers to run the CLI
in-process or as real subprocesses (python -m pipeline / torchrun) under a timeout."""

from __future__ import annotations

import os
import random
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
VENV_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

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


def two_agents(args: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Two simulated nodes: launch/multinode.sh twice (NODE_RANK 0 and 1), 1 rank each,
    meeting at a c10d rendezvous on 127.0.0.1."""
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        env = sub_env(
            NNODES=2,
            NODE_RANK=node_rank,
            NPROC_PER_NODE=1,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            RDZV_ID=f"test-{port}",
            TORCHRUN=TORCHRUN,
            PATH=VENV_PATH,
        )
        cmd = ["timeout", "-k", "10", str(int(timeout)), "launch/multinode.sh", *args]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outs = [p.communicate(timeout=timeout + 30)[0] for p in procs]
    return [
        subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(procs, outs)
    ]


def load_ckpt(run_dir: Path, name: str = "last.pt") -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / name, weights_only=True)


def assert_params_close(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def param_diffs(a: dict, b: dict) -> tuple[float, float]:
    """Two state dicts' largest per-tensor ||a - b|| / ||a|| and max |a - b| / max |a|.
    AdamW's first step, g / (|g| + eps), turns the rounding of a gradient element that sits
    near eps into up to ~lr of difference, so across world sizes (other reduction orders)
    the max measure is 1e-5 to 2.5e-4 where the norm measure stays near 1e-6."""
    assert a.keys() == b.keys()
    l2 = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)
    mx = max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)
    return l2, mx


def assert_same_params_across_world_sizes(a: dict, b: dict) -> None:
    """To float rounding, as param_diffs explains: 3e-5 in norm, 1e-2 at most per element
    (one step moves an element by about lr at most)."""
    l2, mx = param_diffs(a, b)
    assert l2 < 3e-5 and mx < 1e-2, f"||a-b||/||a|| = {l2:.2e}, max|a-b|/max|a| = {mx:.2e}"


# ---------------------------------------------------------------- the chapter's model
# (test_model, test_generate, test_train_core)


def one_hot(x, n_class, dtype=torch.float32):
    result = torch.zeros(x.shape[0], n_class, dtype=dtype, device=x.device)
    result.scatter_(1, x.long().view(-1, 1), 1)
    return result


def to_onehot(X, n_class):
    return [one_hot(X[:, i], n_class) for i in range(X.shape[1])]


def rnn(inputs, state, params):
    W_xh, W_hh, b_h, W_hq, b_q = params
    (H,) = state
    outputs = []
    for X in inputs:
        H = torch.tanh(torch.matmul(X, W_xh) + torch.matmul(H, W_hh) + b_h)
        Y = torch.matmul(H, W_hq) + b_q
        outputs.append(Y)
    return outputs, (H,)


# ---------------------------------------------------------------- the chapter's iterators
# (test_streams, test_train_core)
# Copied from d2l-zh (PyTorch), d2lzh_pytorch/utils.py; only `example_indices` can be given
# instead of drawn, so that the reference can be fed our permutation.


def data_iter_random(corpus_indices, batch_size, num_steps, device=None, example_indices=None):
    # 减1是因为输出的索引x是相应输入的索引y加1
    num_examples = (len(corpus_indices) - 1) // num_steps
    epoch_size = num_examples // batch_size
    if example_indices is None:
        example_indices = list(range(num_examples))
        random.shuffle(example_indices)

    # 返回从pos开始的长为num_steps的序列
    def _data(pos):
        return corpus_indices[pos : pos + num_steps]

    for i in range(epoch_size):
        # 每次读取batch_size个随机样本
        i = i * batch_size
        batch_indices = example_indices[i : i + batch_size]
        X = [_data(j * num_steps) for j in batch_indices]
        Y = [_data(j * num_steps + 1) for j in batch_indices]
        yield (
            torch.tensor(X, dtype=torch.float32, device=device),
            torch.tensor(Y, dtype=torch.float32, device=device),
        )


def data_iter_consecutive(corpus_indices, batch_size, num_steps, device=None):
    corpus_indices = torch.tensor(corpus_indices, dtype=torch.float32, device=device)
    data_len = len(corpus_indices)
    batch_len = data_len // batch_size
    indices = corpus_indices[0 : batch_size * batch_len].view(batch_size, batch_len)
    epoch_size = (batch_len - 1) // num_steps
    for i in range(epoch_size):
        i = i * num_steps
        X = indices[:, i : i + num_steps]
        Y = indices[:, i + 1 : i + num_steps + 1]
        yield X, Y
