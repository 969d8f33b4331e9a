"""Issue 8's options: whole-split evaluation, best.pt, weight tying, dropout."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY, load_ckpt, run_cli, sub_env

from pipeline import config
from pipeline.config import ConfigError
from pipeline.corpus import load_corpus
from pipeline.model import build_model, num_params

LSTM = [
    "model.kind=lstm",
    "model.num_layers=2",
    "model.hidden_size=24",
    "train.optimizer=adam",
    "train.lr=0.01",
    "data.valid_fraction=0.2",
    "data.newlines=keep",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    run_cli(
        [
            "train",
            "--config",
            "configs/seed_concise.yaml",
            f"run.dir={run_dir}",
            *TINY,
            *LSTM,
            "train.max_steps=60",
            "train.eval_every=10",
            "train.log_every=10",
        ]
    )
    return run_dir


def hand_loss(model, ids) -> float:
    """One stream through the whole split, state carried: sum of -log p(next) / count."""
    x = torch.as_tensor(ids[:-1].astype("int64"))[None]
    y = torch.as_tensor(ids[1:].astype("int64"))
    with torch.no_grad():
        logits_TBV, _ = model(x, model.init_state(1, torch.device("cpu")))
    return F.cross_entropy(logits_TBV[:, 0], y, reduction="mean").item()


@pytest.mark.slow
def test_eval_command_equals_loss_by_hand(trained):
    state = load_ckpt(trained)
    cfg = config.from_dict(state["config"])
    model = build_model(cfg.model, len(state["vocab"]))
    model.load_state_dict(state["model"])
    model.eval()
    valid = load_corpus(cfg.data).splits["validation"]
    out = run_cli(
        [
            "eval",
            "--checkpoint",
            str(trained / "checkpoints" / "last.pt"),
            "--split",
            "validation",
            "--batch-size",
            "1",
            "--device",
            "cpu",
        ]
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tokens"] == len(valid) - 1  # every character after the first, once
    assert got["loss"] == pytest.approx(hand_loss(model, valid), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-9)
    assert got["bpc"] == pytest.approx(got["loss"] / math.log(2), rel=1e-9)


@pytest.mark.slow
def test_eval_unknown_split_is_a_clear_error(trained):
    out = run_cli(
        [
            "eval",
            "--checkpoint",
            str(trained / "checkpoints" / "last.pt"),
            "--split",
            "test",
            "--device",
            "cpu",
        ],
        check=False,
    )
    assert out.returncode == 2
    assert "split 'test'" in out.stderr


@pytest.mark.slow
def test_best_checkpoint_has_lowest_validation_loss(trained):
    events = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    val = [(e["step"], e["val/loss"]) for e in events if "val/loss" in e]
    assert len(val) >= 5
    best_step, best_loss = min(val, key=lambda sv: sv[1])
    best = load_ckpt(trained, "best.pt")
    assert best["step"] == best_step
    assert best["best_val_loss"] == pytest.approx(best_loss, rel=1e-12)
    assert load_ckpt(trained)["best_val_loss"] == pytest.approx(best_loss, rel=1e-12)


def _model(**kw):
    cfg = config.load(None, [f"model.{k}={v}" for k, v in kw.items()])
    return build_model(cfg.model, 100)


def test_weight_tying_shares_the_matrix_and_cuts_parameters():
    untied = _model(kind="lstm", hidden_size=32, embedding_size=32)
    tied = _model(kind="lstm", hidden_size=32, embedding_size=32, tie_weights="true")
    assert num_params(untied) - num_params(tied) == 100 * 32
    assert tied.dense.weight.data_ptr() == tied.embedding.weight.data_ptr()
    # the state dict still loads into a fresh tied model (both names, one tensor)
    fresh = _model(kind="lstm", hidden_size=32, embedding_size=32, tie_weights="true")
    fresh.load_state_dict(tied.state_dict())
    assert fresh.dense.weight.data_ptr() == fresh.embedding.weight.data_ptr()


def test_weight_tying_needs_equal_widths():
    with pytest.raises(ConfigError, match="tie_weights"):
        _model(kind="gru", hidden_size=32, embedding_size=16, tie_weights="true")


def test_dropout_acts_in_training_only():
    x = torch.randint(0, 100, (3, 7))
    m = _model(kind="gru", hidden_size=16, num_layers=2, dropout=0.5)
    s = m.init_state(3, torch.device("cpu"))
    a, b = m(x, s)[0], m(x, s)[0]
    assert not torch.equal(a, b)  # masks differ between calls while training
    m.eval()
    assert torch.equal(m(x, s)[0], m(x, s)[0])
    plain = _model(kind="gru", hidden_size=16, num_layers=2, dropout=0.0)
    assert torch.equal(plain(x, s)[0], plain(x, s)[0])
    assert plain.dropout == 0.0 and m.dropout == 0.5


def gpu_recipes(*names: str, **env) -> subprocess.CompletedProcess:
    """launch/gpu_recipes.sh as a real process on the CPU, this interpreter as its Python;
    under `timeout -k` so that a hang takes torchrun's ranks down too."""
    return subprocess.run(
        ["timeout", "-k", "10", "280", "bash", "launch/gpu_recipes.sh", *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=sub_env(PY=sys.executable, NPROC=1, DEVICE="cpu", **env),
    )


@pytest.mark.slow
def test_gpu_recipes_script_trains_and_evaluates_best(tmp_path):
    """launch/gpu_recipes.sh end to end on the CPU at a tiny size: torchrun training, then
    `pipeline eval` of best.pt on validation and test; the validation loss it reports is the
    trainer's best validation loss (same streams, same checkpoint)."""
    tiny = (
        "train.amp=off model.hidden_size=32 model.embedding_size=32 "
        "model.num_layers=1 train.batch_size=8 train.num_steps=16 train.max_steps=24 "
        "train.eval_every=8 train.checkpoint_every=8 train.log_every=4 "
        "generate.prefixes=[] logging.wandb.mode=disabled"
    )
    out = tmp_path / "out"
    proc = gpu_recipes(
        "songci", RUNS=tmp_path / "runs", OUT=out, OVERRIDES_songci=tiny, HF_HOME=tmp_path / "hf"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL PASSED" in proc.stdout
    val = json.loads((out / "songci_validation.json").read_text().splitlines()[-1])
    test = json.loads((out / "songci_test.json").read_text().splitlines()[-1])
    assert val["split"] == "validation" and test["split"] == "test"
    assert val["checkpoint"].endswith("checkpoints/best.pt"), val
    events = [json.loads(line) for line in open(out / "songci_metrics.jsonl")]
    best = min(e["val/loss"] for e in events if "val/loss" in e)
    assert val["loss"] == pytest.approx(best, rel=1e-5)
    assert f"validation {val['bpc']:.3f}, test {test['bpc']:.3f}" in proc.stdout


def test_gpu_recipes_script_rejects_unknown_recipe(tmp_path):
    proc = gpu_recipes("nosuch", OUT=tmp_path / "out")
    assert proc.returncode == 1
    assert "no recipe configs/nosuch.yaml" in proc.stdout
