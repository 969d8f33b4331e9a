"""Shared test set-up: offline everything, data from ../shared/data, helpers to run the CLI
in-process or as real subprocesses (python -m pipeline / torchrun) under a timeout, to read
a run's metrics.jsonl, to share trained runs within a module, and to watch processes that a
fault (PIPELINE_FAULTS, pipeline/faults.py) stopped at a known step.

The chapter's reference code (one-hot, rnn, clipping, iterators, its training step) is
bench/seed_reference.py: tests import it as `bench.seed_reference` (pyproject puts the
repository root on the test path)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: without it they skip, saying why (launch/gpu_check.sh
    runs them on a lent GPU machine with `pytest -m gpu`)."""
    if torch.cuda.is_available():
        return
    reason = f"needs a CUDA device: torch {torch.__version__} sees none"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def _missing_package(text: str) -> str | None:
    """The top-level package a ModuleNotFoundError names, unless it is the project's own."""
    import re

    found = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", text)
    name = found.group(1).split(".")[0] if found else None
    return None if name in (None, "pipeline", "bench", "conftest", "tests") else name


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A test module that imports a package this machine lacks (an optional extra, a dev
    tool) is skipped, naming the package, instead of failing the collection."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and (name := _missing_package(str(report.longrepr))):
        report.outcome = "skipped"
        report.longrepr = (str(collector.path), 0, f"Skipped: needs the package '{name}'")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The same for a test that imports such a package as it runs."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(ModuleNotFoundError):
        name = _missing_package(f"ModuleNotFoundError: {call.excinfo.value}")
        if name:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), 0, f"Skipped: needs the package '{name}'")


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


# ---------------------------------------------------------------- processes


def _launch(cmd: list[str], timeout: float, env: dict | None, check: bool, popen: bool, stdout):
    """Run `cmd` in ROOT: to its end (a CompletedProcess, output captured; with `check` a
    non-zero exit fails the test), or (popen) started in a session of its own, stdout and
    stderr together into `stdout` (a file) or a text pipe, for the caller to signal, wait for
    (under its own timeout) and end with `kill_tree`."""
    env = env or sub_env()
    if popen:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, text=True, start_new_session=True,
            stdout=stdout or subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def run_cli(
    args: list[str],
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
    popen: bool = False,
):
    """`python -m pipeline ARGS` as a real subprocess (popen: running, see `_launch`)."""
    cmd = [sys.executable, "-m", "pipeline", *args]
    return _launch(cmd, timeout, env, check, popen, None)


def torchrun(
    nproc: int,
    args: list[str],
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
    extra: list[str] | None = None,
    script: str | Path | None = None,
    rdzv: tuple[int, int, str] | None = None,
    popen: bool = False,
    stdout=None,
):
    """`torchrun --standalone --nproc_per_node=N [EXTRA] -m pipeline ARGS`, always under
    `timeout -k 10` (a missing rendezvous partner would otherwise wait 600 s). `script`: a
    Python file instead of `-m pipeline`; `rdzv=(nodes, port, id)`: one agent of a job of
    `nodes` agents meeting at a c10d rendezvous on 127.0.0.1:port instead of --standalone;
    `popen`: the agent running (under `timeout`, whose child it is), see `_launch`."""
    if rdzv is None:
        where = ["--standalone"]
    else:
        nodes, port, rdzv_id = rdzv
        where = [f"--nnodes={nodes}", "--rdzv-backend=c10d"]
        where += [f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}"]
    what = [str(script)] if script else ["-m", "pipeline"]
    cmd = ["timeout", "-k", "10", str(int(timeout)), TORCHRUN, *where]
    cmd += [f"--nproc_per_node={nproc}", *(extra or []), *what, *args]
    return _launch(cmd, timeout + 30, env, check, popen, stdout)


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


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first), from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            tree.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], list(tree.get(pid, []))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo += tree.get(child, [])
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with popen=True and everything below it (torchrun starts
    its workers in sessions of their own), then reap it."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def proc_state(pid: int) -> str:
    """The state letter of /proc/PID/stat: R, S, D, T (stopped), Z; "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def workers(marker: str) -> dict[tuple[int, int], int]:
    """{(RANK, TORCHELASTIC_RESTART_COUNT): pid} of the torchrun workers on this machine whose
    command line holds `marker` (e.g. the run's `run.dir=...`)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if not entry.name.isdigit() or marker not in cmdline:
                continue
            environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in environ if "=" in kv)
        if "LOCAL_RANK" in env and "TORCHELASTIC_RESTART_COUNT" in env:
            found[(int(env["RANK"]), int(env["TORCHELASTIC_RESTART_COUNT"]))] = int(entry.name)
    return found


def stopped_rank(marker: str, rank: int) -> int | None:
    """The pid of rank `rank` (first attempt) of the job marked `marker` if it is stopped (a
    `sigstop` fault: it stops itself before a known step), else None."""
    pid = workers(marker).get((rank, 0))
    return pid if pid and proc_state(pid) == "T" else None


def stopped_worker(marker: str, rank: int, timeout: float, alive=None) -> int:
    """`stopped_rank`, waited for."""
    return wait_until(lambda: stopped_rank(marker, rank), timeout, f"rank {rank} stopped", alive)


def continue_when_pending(pid: int, sig: int, timeout: float = 60) -> None:
    """Once `sig` (sent by someone else) waits in the stopped process `pid`, SIGCONT it: it
    handles the signal before it goes on, at the step it stopped at."""

    def pending() -> bool:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        mask = next(int(ln.split()[1], 16) for ln in lines if ln.startswith("ShdPnd:"))
        return bool(mask >> (sig - 1) & 1)

    wait_until(pending, timeout, f"signal {sig} to reach the stopped process")
    os.kill(pid, signal.SIGCONT)


def wait_until(condition: Callable[[], object], timeout: float, what: str, alive=None):
    """Poll `condition` until it returns something true (returned); fail after `timeout`
    seconds, or as soon as the process `alive` (a Popen) ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if alive is not None and alive.poll() is not None:
            out = alive.stdout.read() if alive.stdout else ""
            raise AssertionError(
                f"the process ended (exit {alive.returncode}) before {what}\n{out}"
            )
        time.sleep(0.02)
    raise AssertionError(f"waited {timeout:g} s for {what}")


# ---------------------------------------------------------------- runs


def metrics(run_dir: Path, key: str | None = None) -> list[dict]:
    """The events of a run's metrics.jsonl (`run_dir` may also be the file itself), in
    order; with `key`, only those holding it. Every line must be one whole JSON object."""
    path = Path(run_dir)
    path = path if path.suffix == ".jsonl" else path / "metrics.jsonl"
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [e for e in events if key is None or key in e]


LAUNCHERS = ("one", "torchrun2", "two_nodes")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """trained(args, launcher, sitecustomize="") -> the run directory of `train ARGS`, made on
    first use and shared by the module's tests. launcher: 'one' (python -m pipeline),
    'torchrun2' (--standalone, 2 ranks) or 'two_nodes' (2 agents x 1 rank); sitecustomize:
    Python code every process of the run executes first."""
    made: dict[tuple, Path] = {}

    def get(args: list[str], launcher: str, sitecustomize: str = "") -> Path:
        assert launcher in LAUNCHERS, launcher
        key = (tuple(args), launcher, sitecustomize)
        if key not in made:
            run_dir = tmp_path_factory.mktemp(launcher)
            full = ["train", *args, f"run.dir={run_dir}"]
            env = None
            if sitecustomize:
                assert launcher != "two_nodes", "launch/multinode.sh takes no PYTHONPATH here"
                site = tmp_path_factory.mktemp("site")
                (site / "sitecustomize.py").write_text(sitecustomize)
                env = sub_env(PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
            if launcher == "one":
                run_cli(full, env=env)
            elif launcher == "torchrun2":
                torchrun(2, full, env=env)
            else:
                for proc in two_agents(full[1:]):
                    assert proc.returncode == 0, proc.stdout
            made[key] = run_dir
        return made[key]

    return get


def load_ckpt(run_dir: Path, name: str = "last.pt") -> dict:
    """On the CPU whatever device trained it: tests compare with CPU references."""
    path = Path(run_dir) / "checkpoints" / name
    return torch.load(path, weights_only=True, map_location="cpu")


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


def kernels_run(kind: str, amp: str, device: str = "cpu") -> bool:
    """Whether this machine's kernels run a `kind` model under `amp` (oneDNN has no bf16 or
    fp16 LSTM on a CPU without native bf16: there the trainer refuses, exit 2)."""
    from pipeline.config import ConfigError
    from pipeline.model.rnn import ScratchRNN, TorchRNN
    from pipeline.training.precision import Amp
    from pipeline.training.step import check_precision_runs

    if device == "cuda" and not torch.cuda.is_available():
        return False
    if device == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        return False
    model = ScratchRNN(10, 8) if kind == "rnn_scratch" else TorchRNN(kind, 10, 8)
    model.to(device)
    try:
        check_precision_runs(model, Amp(amp, torch.device(device)), torch.device(device), 10)
    except ConfigError:
        return False
    return True
