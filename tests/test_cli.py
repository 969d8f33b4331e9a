"""End to end: `python -m pipeline train` on a tiny config, then `generate` from its
checkpoint, as real subprocesses."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, load_ckpt, metrics, run_cli

from pipeline import config
from pipeline.data.corpus import load_corpus
from pipeline.data.vocab import Vocab
from pipeline.model.rnn import build_model
from pipeline.run.generate import generate

STEPS = 30


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    overrides = [
        *TINY,
        f"run.dir={run_dir}",
        f"train.max_steps={STEPS}",
        "train.epochs=50",
        "train.log_every=10",
        "data.valid_fraction=0.1",
        "generate.prefixes=[分开]",
        "generate.length=20",
        "run.name=tiny",
    ]
    proc = run_cli(["train", "--config", "configs/seed_scratch_random.yaml", *overrides])
    return run_dir, overrides, proc


@pytest.mark.slow
def test_train_writes_the_run_directory(tiny_run):
    run_dir, overrides, proc = tiny_run
    # config.yaml: the resolved config, YAML < command line
    cfg = config.load(str(run_dir / "config.yaml"), [])
    assert cfg.train.max_steps == STEPS and cfg.model.hidden_size == 32
    assert cfg.train.sampling == "random" and cfg.data.max_chars == 4000  # YAML, then CLI
    assert config.to_dict(cfg) == config.to_dict(
        config.load("configs/seed_scratch_random.yaml", overrides)
    )

    # metrics.jsonl: one JSON object per event, each with a step
    events = metrics(run_dir)
    assert events and all(isinstance(e["step"], int) for e in events)
    train = [e for e in events if "train/perplexity" in e]
    assert [e["step"] for e in train] == [10, 20, 30]
    assert all(e["train/perplexity"] > 1 for e in train)
    assert all(k in train[-1] for k in ("train/loss", "perf/tokens_per_s", "opt/lr", "epoch"))
    val = [e for e in events if "val/perplexity" in e]
    assert val and val[-1]["step"] == STEPS
    samples = [e for e in events if "samples" in e]
    assert samples and samples[-1]["samples"][0]["prefix"] == "分开"
    assert samples[-1]["samples"][0]["text"].startswith("分开")
    assert "validation perplexity" in proc.stdout and " - 分开" in proc.stdout

    # checkpoints/last.pt: weights-only, with model, vocab, config, step
    state = load_ckpt(run_dir)  # torch.load(..., weights_only=True)
    assert state["step"] == STEPS
    assert isinstance(state["vocab"], list) and isinstance(state["config"], dict)
    assert config.from_dict(state["config"]).train.max_steps == STEPS
    corpus = load_corpus(cfg.data)
    assert state["vocab"] == corpus.vocab.to_list()
    model = build_model(cfg.model, len(state["vocab"]))
    model.load_state_dict(state["model"])  # the unwrapped model's keys
    assert set(state["model"]) == {"W_xh", "W_hh", "b_h", "W_hq", "b_q"}


@pytest.mark.slow
def test_generate_from_the_checkpoint(tiny_run):
    run_dir, _, _ = tiny_run
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    proc = run_cli(["generate", "--checkpoint", ckpt, "--prefix", "分开", "--length", "25"])
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("分开") and len(lines[0]) == 27
    # the same text as generating in-process from the loaded checkpoint
    state = load_ckpt(run_dir)
    cfg = config.from_dict(state["config"])
    model = build_model(cfg.model, len(state["vocab"]))
    model.load_state_dict(state["model"])
    assert lines[0] == generate(model, Vocab(state["vocab"]), "分开", 25)
    # and the same as at the end of training (greedy, same model)
    samples = metrics(run_dir, "samples")
    assert samples[-1]["samples"][0]["text"][:22] == lines[0][:22]


@pytest.mark.slow
def test_generate_missing_checkpoint_exits_2(tmp_path):
    proc = run_cli(
        ["generate", "--checkpoint", str(tmp_path / "none.pt"), "--prefix", "分开"], check=False
    )
    assert proc.returncode == 2
    assert "none.pt' does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_exits_2(tmp_path):
    proc = run_cli(
        [
            "train",
            "--config",
            "configs/seed_scratch_consecutive.yaml",
            *TINY,
            f"run.dir={tmp_path / 'run'}",
            "train.device=cuda",
        ],
        check=False,
    )
    assert proc.returncode == 2
    assert "config key 'train.device'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_console_script_enters_where_python_m_pipeline_does():
    """`lyrics-rnn` and `python -m pipeline` share one entry and one exit path (the exit
    that survives gloo's teardown), not just `main`."""
    from importlib.metadata import entry_points

    import pipeline.__main__ as cli

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lyrics-rnn"]
    assert script.value == "pipeline.__main__:entry" and script.load() is cli.entry
