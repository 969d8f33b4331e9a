"""`python -m pipeline eval` and best.pt: the whole-split evaluation equals the loss by hand,
an unknown split is a clear error, and best.pt holds the lowest validation loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, load_ckpt, metrics, run_cli

from pipeline import config
from pipeline.data.corpus import load_corpus
from pipeline.model.rnn import build_model

pytestmark = pytest.mark.slow  # every test here trains (once) and runs the CLI

LSTM = [
    "model.kind=lstm",
    "model.num_layers=2",
    "model.hidden_size=24",
    "train.optimizer=adam",
    "train.lr=0.01",
    "data.valid_fraction=0.2",
    "data.newlines=keep",
]
RUN = ["--config", "configs/seed_concise.yaml", *TINY, *LSTM, "train.max_steps=60"]
RUN += ["train.eval_every=10", "train.log_every=10"]


@pytest.fixture(scope="module")
def lstm_run(trained):
    return trained(RUN, "one")


def run_eval(run_dir, *args: str, check: bool = True):
    last = str(run_dir / "checkpoints" / "last.pt")
    return run_cli(["eval", "--checkpoint", last, "--device", "cpu", *args], check=check)


def hand_loss(model, ids) -> float:
    """One stream through the whole split, state carried: sum of -log p(next) / count."""
    x = torch.as_tensor(ids[:-1].astype("int64"))[None]
    y = torch.as_tensor(ids[1:].astype("int64"))
    with torch.no_grad():
        logits_TBV, _ = model(x, model.init_state(1, torch.device("cpu")))
    return F.cross_entropy(logits_TBV[:, 0], y, reduction="mean").item()


def test_eval_command_equals_loss_by_hand(lstm_run):
    state = load_ckpt(lstm_run)
    cfg = config.from_dict(state["config"])
    model = build_model(cfg.model, len(state["vocab"]))
    model.load_state_dict(state["model"])
    model.eval()
    valid = load_corpus(cfg.data).splits["validation"]
    out = run_eval(lstm_run, "--split", "validation", "--batch-size", "1")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tokens"] == len(valid) - 1  # every character after the first, once
    assert got["loss"] == pytest.approx(hand_loss(model, valid), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-9)
    assert got["bpc"] == pytest.approx(got["loss"] / math.log(2), rel=1e-9)


def test_eval_unknown_split_is_a_clear_error(lstm_run):
    out = run_eval(lstm_run, "--split", "test", check=False)
    assert out.returncode == 2
    assert "split 'test'" in out.stderr


def test_best_checkpoint_has_lowest_validation_loss(lstm_run):
    val = [(e["step"], e["val/loss"]) for e in metrics(lstm_run, "val/loss")]
    assert len(val) >= 5
    best_step, best_loss = min(val, key=lambda sv: sv[1])
    best = load_ckpt(lstm_run, "best.pt")
    assert best["step"] == best_step
    assert best["best_val_loss"] == pytest.approx(best_loss, rel=1e-12)
    assert load_ckpt(lstm_run)["best_val_loss"] == pytest.approx(best_loss, rel=1e-12)
