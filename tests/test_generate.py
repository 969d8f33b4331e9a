"""Generation: greedy equals the chapter's predict_rnn; sampling reproducible with a seed;
prefixes outside the vocabulary are a clear error (exit 2 through the CLI)."""

from __future__ import annotations

import zipfile

import pytest
import torch
from conftest import JAYCHOU_ZIP, run_cli

from bench.seed_reference import rnn, to_onehot
from pipeline import config
from pipeline.config import ModelConfig
from pipeline.data.vocab import Vocab
from pipeline.model.rnn import build_model
from pipeline.run.generate import PrefixError, check_prefix, generate, sample_seed, samples

with zipfile.ZipFile(JAYCHOU_ZIP) as _zf:
    TEXT = _zf.read("jaychou_lyrics.txt").decode("utf-8").replace("\n", " ")[:3000]
VOCAB = Vocab.from_text(TEXT)
H = 24


# ---------------------------------------------------------------- the chapter's predict


def init_rnn_state(batch_size, num_hiddens, device):
    return (torch.zeros((batch_size, num_hiddens), device=device),)


def predict_rnn(
    prefix,
    num_chars,
    rnn,
    params,
    init_rnn_state,
    num_hiddens,
    vocab_size,
    device,
    idx_to_char,
    char_to_idx,
):
    state = init_rnn_state(1, num_hiddens, device)
    output = [char_to_idx[prefix[0]]]
    for t in range(num_chars + len(prefix) - 1):
        X = to_onehot(torch.tensor([[output[-1]]], device=device), vocab_size)
        (Y, state) = rnn(X, state, params)
        if t < len(prefix) - 1:
            output.append(char_to_idx[prefix[t + 1]])
        else:
            output.append(Y[0].argmax(dim=1).item())
    return "".join([idx_to_char[i] for i in output])


def predict_rnn_pytorch(prefix, num_chars, model, vocab_size, device, idx_to_char, char_to_idx):
    state = None
    output = [char_to_idx[prefix[0]]]
    for t in range(num_chars + len(prefix) - 1):
        X = torch.tensor([output[-1]], device=device).view(1, 1)
        (Y, state) = model(X, state)
        if t < len(prefix) - 1:
            output.append(char_to_idx[prefix[t + 1]])
        else:
            output.append(Y.argmax(dim=1).item())
    return "".join([idx_to_char[i] for i in output])


def fixed_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    # larger weights than the chapter's 0.01, so that the greedy path is not one character
    model = build_model(ModelConfig(kind=kind, hidden_size=H, init_std=0.3), len(VOCAB))
    if kind != "rnn_scratch":
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
    return model.eval()


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("prefix", ["分开", "不分开", "我"])
def test_greedy_equals_chapter_predict_rnn(prefix):
    model = fixed_model("rnn_scratch")
    params = [model.W_xh, model.W_hh, model.b_h, model.W_hq, model.b_q]
    with torch.no_grad():
        ref = predict_rnn(
            prefix,
            50,
            rnn,
            params,
            init_rnn_state,
            H,
            len(VOCAB),
            torch.device("cpu"),
            VOCAB.itos,
            VOCAB.stoi,
        )
    ours = generate(model, VOCAB, prefix, 50)
    assert ours == ref
    assert ours.startswith(prefix) and len(ours) == len(prefix) + 50
    assert len(set(ours[len(prefix) :])) > 3  # a real path, not one repeated character
    assert generate(model, VOCAB, prefix, 50, seed=123) == ours  # greedy ignores the seed


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_greedy_torch_models_equal_chapter_predict_rnn_pytorch(kind):
    model = fixed_model(kind)

    def chapter_model(X, state):  # the chapter's RNNModel: (Y of (T*B, V), state or None)
        state = model.init_state(1, torch.device("cpu")) if state is None else state
        logits_TBV, state = model(X, state)
        return logits_TBV.flatten(0, 1), state

    with torch.no_grad():
        ref = predict_rnn_pytorch(
            "分开", 30, chapter_model, len(VOCAB), torch.device("cpu"), VOCAB.itos, VOCAB.stoi
        )
    assert generate(model, VOCAB, "分开", 30) == ref


def test_generate_leaves_training_mode_and_weights_alone():
    model = fixed_model("gru").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generate(model, VOCAB, "分开", 10, temperature=1.0, seed=0)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- sampling


def test_sampling_reproducible_with_seed():
    model = fixed_model("rnn_scratch")
    a = generate(model, VOCAB, "分开", 40, temperature=1.5, seed=7)
    torch.manual_seed(999)  # the global RNG plays no part
    assert generate(model, VOCAB, "分开", 40, temperature=1.5, seed=7) == a
    others = {generate(model, VOCAB, "分开", 40, temperature=1.5, seed=s) for s in range(1, 5)}
    assert len(others | {a}) > 1  # different seeds give different texts
    assert a != generate(model, VOCAB, "分开", 40)  # sampling is not greedy here


def test_top_k_keeps_only_the_k_most_likely():
    model = fixed_model("rnn_scratch")
    greedy = generate(model, VOCAB, "分开", 30)
    assert generate(model, VOCAB, "分开", 30, temperature=2.0, top_k=1, seed=0) == greedy
    k = 3
    text = generate(model, VOCAB, "分开", 30, temperature=5.0, top_k=k, seed=1)
    ids = torch.tensor([VOCAB.encode(text).tolist()])
    with torch.no_grad():
        logits_TBV, _ = model(ids, model.init_state(1, torch.device("cpu")))
    for t in range(len("分开") - 1, ids.shape[1] - 1):  # step t predicts character t + 1
        topk = torch.topk(logits_TBV[t, 0], k).indices.tolist()
        assert int(ids[0, t + 1]) in topk, f"character {t + 1} is outside the top {k}"
    assert text != greedy  # at temperature 5 it does leave the greedy path


class _Uniform(torch.nn.Module):
    """Equal logits whatever the input: every draw depends on the random stream alone, so two
    prefixes sampled from one stream get the same text after the prefix."""

    def init_state(self, batch_size, device):
        return (torch.zeros(1, batch_size, 1, device=device),)

    def forward(self, x_BT, state):
        return torch.zeros(x_BT.shape[1], x_BT.shape[0], len(VOCAB)), state


def test_each_prefix_draws_its_sample_from_its_own_stream():
    """The main job's 分开 and 不分开 samples were the same text after the prefix: one seed for
    both. Each prefix now has its own seeded stream: the tails differ even where the model
    ignores its input, and the samples are the same on every rerun (rank 0 draws them alone, so
    the world size plays no part)."""
    gcfg = config.GenerateConfig(prefixes=["分开", "不分开", "分开"], length=30, temperature=1.0)
    rows = samples(_Uniform(), VOCAB, gcfg, 0, "cpu")
    tails = [text[len(prefix) :] for prefix, text in rows]
    assert len(set(tails)) == 3, tails  # even the same prefix twice: its own stream
    assert samples(_Uniform(), VOCAB, gcfg, 0, "cpu") == rows
    assert samples(_Uniform(), VOCAB, gcfg, 1, "cpu") != rows  # seeded by the run
    for i, (prefix, text) in enumerate(rows):  # the CLI reproduces each with its seed
        assert generate(_Uniform(), VOCAB, prefix, 30, 1.0, seed=sample_seed(0, i)) == text
    # what one shared seed gave: the same tail for every prefix
    shared = {generate(_Uniform(), VOCAB, p, 30, 1.0, seed=0)[len(p) :] for p in gcfg.prefixes}
    assert len(shared) == 1
    assert len({sample_seed(s, i) for s in range(50) for i in range(10)}) == 500


# ---------------------------------------------------------------- prefix errors


def test_prefix_outside_vocabulary_lists_the_characters():
    with pytest.raises(PrefixError, match=r"'Ω' 'ß'"):
        check_prefix("分Ω开ßΩ", VOCAB)
    with pytest.raises(PrefixError, match="empty"):
        check_prefix("", VOCAB)
    unk_vocab = Vocab.from_text(TEXT, max_vocab=50)  # has <unk>: still an error, not <unk>
    rare = next(c for c in TEXT if c not in unk_vocab.stoi)
    with pytest.raises(PrefixError, match=repr(rare)):
        generate(fixed_model("rnn_scratch"), unk_vocab, "分" + rare, 5)


# ---------------------------------------------------------------- through the CLI


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint of a fixed (untrained) model, in the trainer's format."""
    cfg = config.load(None, ["model.hidden_size=24", "model.init_std=0.3"])
    model = fixed_model("rnn_scratch")
    path = tmp_path / "last.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "vocab": VOCAB.to_list(),
            "config": config.to_dict(cfg),
            "step": 0,
        },
        path,
    )
    return path, model


@pytest.mark.slow
def test_cli_generate_greedy_and_seeded_sampling(checkpoint):
    path, model = checkpoint
    greedy = run_cli(
        ["generate", "--checkpoint", str(path), "--prefix", "分开", "--length", "30"]
    ).stdout.splitlines()
    assert greedy == [generate(model, VOCAB, "分开", 30)]
    args = [
        "generate",
        "--checkpoint",
        str(path),
        "--prefix",
        "不分开",
        "--length",
        "30",
        "--temperature",
        "1.2",
        "--top-k",
        "20",
        "--seed",
        "5",
        "--num-samples",
        "3",
    ]
    samples = run_cli(args).stdout.splitlines()
    # sample k uses seed 5 + k: another process gives the same texts
    assert samples == [
        generate(model, VOCAB, "不分开", 30, temperature=1.2, top_k=20, seed=5 + k)
        for k in range(3)
    ]
    assert len(set(samples)) > 1


@pytest.mark.slow
def test_cli_prefix_outside_vocabulary_exits_2(checkpoint):
    path, _ = checkpoint
    proc = run_cli(["generate", "--checkpoint", str(path), "--prefix", "分开Ωß"], check=False)
    assert proc.returncode == 2
    assert "outside the vocabulary" in proc.stderr and "'Ω' 'ß'" in proc.stderr
    assert "Traceback" not in proc.stderr and "KeyError" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--length", "-5"),
        ("--length", "0"),
        ("--num-samples", "0"),
        ("--num-samples", "-1"),
        ("--top-k", "0"),
        ("--top-k", "-3"),
        ("--temperature", "0"),
        ("--temperature", "-0.5"),
    ],
)
def test_cli_non_positive_numbers_exit_2_naming_the_flag(checkpoint, flag, value):
    """Checked before the checkpoint is read: nothing is printed but the error."""
    path, _ = checkpoint
    args = ["generate", "--checkpoint", str(path), "--prefix", "分开", flag, value]
    proc = run_cli(args, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"argument {flag}: must be > 0, got {value}" in proc.stderr
    assert "Traceback" not in proc.stderr
