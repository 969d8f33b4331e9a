"""Distributed training with real torchrun processes on gloo (2 ranks on this 2-core machine).

World size is a speed knob, not a hyperparameter: with dropout 0 and fp32, 2 ranks and 1
process with the same global batch and seed end with the same parameters and report the same
global losses. Each rank carries its own streams' hidden state from one minibatch to the next
and resets it at each epoch. Bad launches fail fast with a clear message.

Runs are shared between tests (conftest.trained: one per configuration and launcher, made on
first use).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, assert_params_close, load_ckpt, metrics, sub_env, torchrun

from pipeline import config
from pipeline.data.corpus import load_corpus
from pipeline.data.streams import ConsecutiveStreams
from pipeline.model.rnn import build_model

# 540 training characters at batch 4 x 8 steps: 16 minibatches an epoch for both samplings,
# so 2 epochs = 32 steps cross an epoch boundary (state reset, new permutation).
# Validation: the last 60 characters, split across ranks and reduced.
STEPS_PER_EPOCH, EPOCHS = 16, 2
COMMON = [
    *TINY,
    "data.max_chars=600",
    "data.valid_fraction=0.1",
    "train.epochs=2",
    "train.max_steps=0",
    "train.log_every=4",
    "model.dropout=0.0",
    "train.amp=off",
    "train.device=cpu",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=40",
    "train.resume=never",
]
# The LSTM's world-size invariance (with dropout, both samplings) is test_invariance's.
CASES = [("rnn_scratch", sampling) for sampling in ("consecutive", "random")]


def overrides(kind: str, sampling: str) -> list[str]:
    return [*COMMON, f"model.kind={kind}", f"train.sampling={sampling}"]


def by_step(run_dir: Path, key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in metrics(run_dir, key)}


# ---------------------------------------------------------------- world-size invariance


@pytest.mark.slow
@pytest.mark.parametrize("kind,sampling", CASES)
def test_two_ranks_match_one_process(trained, kind, sampling):
    args = overrides(kind, sampling)
    one, two = trained(args, "one"), trained(args, "torchrun2")
    a, b = load_ckpt(one), load_ckpt(two)
    assert a["step"] == b["step"] == STEPS_PER_EPOCH * EPOCHS
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert_params_close(a["model"], b["model"], rtol=1e-5)
    # The parameters moved: a frozen model would match trivially.
    torch.manual_seed(0)
    init = build_model(config.load(None, overrides(kind, sampling)).model, len(a["vocab"]))
    moved = max(float((a["model"][k] - v).abs().max()) for k, v in init.state_dict().items())
    assert moved > 1e-2

    # Metrics are global (loss x tokens and tokens summed over ranks), not rank 0's share.
    for key in ("train/loss", "val/loss"):
        sa, sb = by_step(one, key), by_step(two, key)
        assert sa and sa.keys() == sb.keys(), key
        for step in sa:
            assert sb[step] == pytest.approx(sa[step], rel=1e-5), (key, step)


@pytest.mark.slow
def test_two_nodes_match_one_process(trained):
    one = trained(overrides("rnn_scratch", "consecutive"), "one")
    nodes = trained(overrides("rnn_scratch", "consecutive"), "two_nodes")
    a, b = load_ckpt(one), load_ckpt(nodes)
    assert b["world_size"] == 2 and b["step"] == a["step"]
    assert_params_close(a["model"], b["model"], rtol=1e-5)


# ---------------------------------------------------------------- hidden-state continuity


def _forward_state(model, params: dict, x_BT, state):
    model.load_state_dict(params)
    with torch.no_grad():
        return model(x_BT, state)[1]


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_carries_its_own_state_and_resets_per_epoch(trained, rank):
    """The 2-rank run saved a checkpoint after every step: parameters after step t and the
    GLOBAL hidden state (rank r's rows at [r*b, (r+1)*b)) left by step t. Replaying rank r
    alone on its own rows (a single process, no other rank) from those parameters must give
    the state the trainer saved one step later: it carries state s_t into step t+1, and
    starts from zero at the first minibatch of each epoch."""
    run_dir = trained(overrides("lstm", "consecutive"), "torchrun2")
    cfg = config.load(None, [*overrides("lstm", "consecutive"), f"run.dir={run_dir}"])
    corpus = load_corpus(cfg.data)
    ids = corpus.splits["train"]
    world, b = 2, cfg.train.batch_size // 2
    mine = ConsecutiveStreams(
        ids, cfg.train.batch_size, cfg.train.num_steps, rank, world, torch.device("cpu")
    )
    whole = ConsecutiveStreams(
        ids, cfg.train.batch_size, cfg.train.num_steps, 0, 1, torch.device("cpu")
    )
    assert mine.epoch_size == STEPS_PER_EPOCH
    rows = slice(rank * b, (rank + 1) * b)
    model = build_model(cfg.model, len(corpus.vocab))
    saved = {
        s: torch.load(run_dir / "checkpoints" / f"step_{s:08d}.pt", weights_only=True)
        for s in range(1, STEPS_PER_EPOCH * EPOCHS)
    }

    def my_state(step):  # rank r's share of the state left by `step` steps
        return tuple(h[:, rows] for h in saved[step]["hidden"])

    def close(a, b):
        return len(a) == len(b) > 0 and all(
            torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b)
        )

    checked_carry = 0
    for t in range(1, STEPS_PER_EPOCH * EPOCHS - 1):
        epoch, i = divmod(t, STEPS_PER_EPOCH)
        if i == STEPS_PER_EPOCH - 1:
            continue  # the state left at an epoch's end is not saved: checked at i == 0
        x_BT, _ = mine.batch(epoch, i)
        assert torch.equal(x_BT, whole.batch(epoch, i)[0][rows])  # rank r's rows of the batch
        params = saved[t]["model"]
        zero = model.init_state(b, torch.device("cpu"))
        if i == 0:
            # Epoch boundary: the end-of-epoch state is not saved (a new epoch starts from
            # zero); rebuild it from step t-1 to show the trainer did NOT carry it over.
            end_of_epoch = _forward_state(
                model,
                saved[t - 1]["model"],
                mine.batch(epoch - 1, STEPS_PER_EPOCH - 1)[0],
                my_state(t - 1),
            )
            assert saved[t]["hidden"] == []
            assert close(_forward_state(model, params, x_BT, zero), my_state(t + 1))
            assert not close(_forward_state(model, params, x_BT, end_of_epoch), my_state(t + 1))
            continue
        carried = _forward_state(model, params, x_BT, my_state(t))
        assert close(carried, my_state(t + 1)), f"step {t + 1}: state not carried over"
        # The alternatives are distinguishable: a reset, or the other rank's state.
        assert not close(_forward_state(model, params, x_BT, zero), my_state(t + 1))
        other = tuple(h[:, slice((1 - rank) * b, (2 - rank) * b)] for h in saved[t]["hidden"])
        assert not close(_forward_state(model, params, x_BT, other), my_state(t + 1))
        checked_carry += 1
    assert checked_carry == STEPS_PER_EPOCH * EPOCHS - 4  # all but t=0, 15, 16, 31


# ---------------------------------------------------------------- bad launches


def _assert_fails_fast(proc, started: float, needle: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 124, 137), f"exit {proc.returncode}\n{out}"
    assert needle in out, out
    assert time.monotonic() - started < 150, "took too long to fail"  # generous: loaded CI


@pytest.mark.parametrize(
    "batch,needle",
    [
        (3, "train.batch_size=3 is not divisible by the world size 2"),
        (1, "world size 2 is larger than train.batch_size=1"),
    ],
)
@pytest.mark.slow
def test_bad_world_size_is_a_clear_error(tmp_path, batch, needle):
    started = time.monotonic()
    proc = torchrun(
        2,
        [
            "train",
            *overrides("rnn_scratch", "consecutive"),
            f"train.batch_size={batch}",
            f"run.dir={tmp_path / 'run'}",
        ],
        timeout=180,
        check=False,
    )
    _assert_fails_fast(proc, started, needle)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


CRASH_AT_START = """\
import os, sys
from pipeline import dist
from pipeline.__main__ import main
if os.environ["RANK"] == "1":
    dist.init("cpu")  # joins the group, then dies before the first collective
    raise SystemExit("rank 1: simulated crash at start-up")
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_rank_dying_at_startup_stops_the_job(tmp_path):
    """Rank 0 blocks in its first collective; torchrun sees rank 1 fail, stops rank 0 and
    exits non-zero well before any collective timeout."""
    script = tmp_path / "crash_at_start.py"
    script.write_text(CRASH_AT_START)
    args = ["train", *overrides("rnn_scratch", "consecutive"), f"run.dir={tmp_path / 'run'}"]
    started = time.monotonic()
    proc = torchrun(2, args, timeout=180, env=sub_env(PYTHONPATH=ROOT), check=False, script=script)
    _assert_fails_fast(proc, started, "simulated crash at start-up")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


LEAVE = """\
import atexit, sys
from pipeline import dist

class Finalized:
    def __del__(self):
        print("interpreter teardown ran", flush=True)

KEEP = Finalized()  # a module global: freed only by the interpreter's teardown
atexit.register(lambda: print("exit handler ran"))
dist._group_started = sys.argv[1] == "group"
print("buffered line")  # a pipe: block-buffered, lost unless flushed
dist.leave(75)
"""


@pytest.mark.slow
@pytest.mark.parametrize("group", [True, False])
def test_leave_after_a_group_skips_the_teardown(tmp_path, group):
    """After a process group the trainer ends without the interpreter's teardown (where gloo
    can abort a finished rank), yet keeps its exit code, exit handlers and buffered output.
    Without a group it is an ordinary exit."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    arg = "group" if group else "plain"
    proc = subprocess.run(
        [sys.executable, str(script), arg],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=sub_env(PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 75, proc.stderr
    assert "buffered line" in proc.stdout and "exit handler ran" in proc.stdout
    assert ("interpreter teardown ran" in proc.stdout) is not group, proc.stdout


TEARDOWN_PROBE = """\
import os

class _Probe:  # freed only by the interpreter's teardown; speaks in torchrun's workers only
    def __del__(self):
        if "LOCAL_RANK" in os.environ:
            print(f"teardown ran in rank {os.environ['RANK']}", flush=True)

_probe = _Probe()
if "LOCAL_RANK" in os.environ:
    print(f"probe loaded in rank {os.environ['RANK']}", flush=True)
"""


@pytest.mark.slow
def test_torchrun_ranks_leave_without_the_teardown(tmp_path):
    """`torchrun -m pipeline train` ends its ranks through dist.leave: exit status 0, the
    final log line out, and no rank runs the interpreter's teardown."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(TEARDOWN_PROBE)
    args = ["train", *overrides("rnn_scratch", "consecutive"), f"run.dir={tmp_path / 'run'}"]
    proc = torchrun(2, args, env=sub_env(PYTHONPATH=str(site)))
    out = proc.stdout + proc.stderr
    assert f"step {STEPS_PER_EPOCH * EPOCHS} epoch {EPOCHS}:" in out, out
    assert "probe loaded in rank 0" in out and "probe loaded in rank 1" in out, out
    assert "teardown ran" not in out, out
