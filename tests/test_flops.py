"""perf/flops_per_token: training FLOPs from the model's shapes, against hand counts for
every kind (tied, untied, adaptive output) and against torch's own FLOP counter; perf/mfu
against the card's dense peak, and none on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, load_ckpt, metrics
from torch.utils.flop_counter import FlopCounterMode

from pipeline import config
from pipeline.config import ModelConfig
from pipeline.data.streams import make_train_streams
from pipeline.dist import DistContext
from pipeline.model.rnn import build_model
from pipeline.tracking.flops import (
    Perf,
    devices_in_use,
    peak_tflops,
    tail_shares,
    train_flops_per_token,
)
from pipeline.training import trainer as train_mod

V = 30  # vocabulary; hidden 16 everywhere below


def model(kind: str, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, hidden_size=16, **kw), V)


# By hand: multiply-adds per token, x 6 (2 FLOPs each; forward + backward to inputs and weights)
HAND = {
    # W_hh 16x16, W_hq 16x30 (the one-hot input is a row lookup)
    "rnn_scratch": ({}, 6 * (16 * 16 + 16 * 30)),
    # embedding 16 -> cell: W_ih 16x16 + W_hh 16x16; output 16x30
    "rnn": ({}, 6 * (16 * 16 + 16 * 16 + 16 * 30)),
    # 3 gates; layer 0 from an embedding of 8, layer 1 from 16; output 16x30
    "gru 2 layers": (
        {"num_layers": 2, "embedding_size": 8},
        6 * (3 * 16 * 8 + 3 * 16 * 16 + 3 * 16 * 16 + 3 * 16 * 16 + 16 * 30),
    ),
    # 4 gates, two layers of 16 -> 16; the tied output is the same product
    "lstm tied": (
        {"num_layers": 2, "tie_weights": True},
        6 * (2 * (4 * 16 * 16 + 4 * 16 * 16) + 16 * 30),
    ),
    "lstm untied": ({"num_layers": 2}, 6 * (2 * (4 * 16 * 16 + 4 * 16 * 16) + 16 * 30)),
}


@pytest.mark.parametrize("name", HAND)
def test_flops_per_token_by_hand(name):
    kw, expected = HAND[name]
    assert train_flops_per_token(model(name.split()[0], **kw)) == expected


@pytest.mark.parametrize("tie", [False, True])
def test_an_adaptive_output_by_hand(tie):
    """Cutoffs [10, 20], div 2: widths 16, 8, 4. Input: every id through both tail
    projections (8x16, 4x16). Head: 10 characters + 2 cluster entries at 16. A tail: its
    projection 16->d_k and its 10 characters at d_k, for its share of the targets."""
    m = model("lstm", adaptive_cutoffs=[10, 20], adaptive_div=2, tie_weights=tie)
    shares = [0.25, 0.1]
    cell = 4 * 16 * 16 + 4 * 16 * 16
    inputs = 8 * 16 + 4 * 16
    head = (10 + 2) * 16
    tails = 0.25 * (16 * 8 + 10 * 8) + 0.1 * (16 * 4 + 10 * 4)
    expected = 6 * (cell + inputs + head + tails)
    assert train_flops_per_token(m, shares) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "kind,kw",
    [
        ("rnn_scratch", {}),
        ("rnn", {}),
        ("gru", {"num_layers": 2, "embedding_size": 8}),
        ("rnn", {"adaptive_cutoffs": [10, 20], "adaptive_div": 2}),
        ("rnn", {"adaptive_cutoffs": [10, 20], "adaptive_div": 2, "tie_weights": True}),
    ],
)
def test_torchs_flop_counter_agrees(kind, kw):
    """torch.utils.flop_counter over one forward and backward (the CPU decomposes nn.RNN
    and nn.GRU into matrix products; its LSTM is one oneDNN kernel the counter cannot see).
    The count leaves out one product per layer: the gradient to the initial state, which
    needs none; ours keeps it (a 1/T share): the rest agrees exactly."""
    m = model(kind, **kw)
    B, T = 4, 5
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)
    counter = FlopCounterMode(display=False)
    with counter:
        nll, _ = m(x, m.init_state(B, torch.device("cpu")), None, y)
        nll.mean().backward()
    counted = counter.get_total_flops() / (B * T)
    shares = None
    if hasattr(m, "io"):
        b = m.io.bounds
        shares = [float(((y >= lo) & (y < hi)).float().mean()) for lo, hi in zip(b[1:], b[2:])]
    ours = train_flops_per_token(m, shares)
    gates = {"rnn_scratch": 1, "rnn": 1, "gru": 3}[kind]
    h0_grad = 0 if kind == "rnn_scratch" else 2 * gates * 16 * 16 * kw.get("num_layers", 1) / T
    assert ours == pytest.approx(counted + h0_grad, rel=1e-8)  # the shares: float32 means


def test_tail_shares_are_the_training_targets_shares():
    m = model("rnn", adaptive_cutoffs=[10, 20], adaptive_div=2)
    ids = torch.randint(V, (2000,), generator=torch.Generator().manual_seed(2)).numpy()
    streams = make_train_streams(ids, "consecutive", 4, 8, 0, 1, torch.device("cpu"), 0)
    assert streams.epoch_size <= 64  # every minibatch is sampled: the shares are exact
    y = torch.cat([streams.batch(0, i)[1].flatten() for i in range(streams.epoch_size)])
    expected = [float(((y >= 10) & (y < 20)).float().mean()), float((y >= 20).float().mean())]
    assert tail_shares(m, streams) == pytest.approx(expected)
    assert tail_shares(model("rnn"), streams) is None


@pytest.mark.parametrize(
    "name,precision,expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5),
        ("NVIDIA H100 PCIe", "fp16", 756.5),
        ("NVIDIA H100 NVL", "bf16", 835.5),
        ("NVIDIA H200", "bf16", 989.5),
        ("NVIDIA H200", "off", 67.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-PCIE-40GB", "off", 19.5),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA L40S", "fp16", 362.05),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
        ("NVIDIA L40", "bf16", None),  # not in the table: no MFU rather than a wrong one
        ("Tesla T4", "fp16", None),
    ],
)
def test_dense_peaks_by_card_and_dtype(name, precision, expected):
    assert peak_tflops(name, precision) == expected


def test_gpus_in_use_and_mfu():
    assert devices_in_use(8, 8, 8) == 8 and devices_in_use(16, 8, 8) == 16
    assert devices_in_use(2, 2, 1) == 1  # two ranks sharing one GPU (dist.backend=gloo)
    perf = Perf(model("rnn_scratch"), None, "off", DistContext())
    assert perf.peak is None and perf.metrics(1e6) == {"perf/flops_per_token": 4416.0}
    perf.peak = 1e12
    assert perf.metrics(1e6)["perf/mfu"] == pytest.approx(1e6 * 4416.0 / 1e12)


def test_a_cpu_run_logs_flops_per_token_and_no_mfu(tmp_path):
    cfg = config.load(None, [*TINY, "train.device=cpu", "train.max_steps=4", "train.log_every=2"])
    cfg.run.dir = str(tmp_path / "run")
    train_mod.run(cfg)
    events = metrics(cfg.run.dir, "train/loss")
    vocab = len(load_ckpt(cfg.run.dir)["vocab"])
    assert [e["perf/flops_per_token"] for e in events] == [6.0 * (32 * 32 + 32 * vocab)] * 2
    assert not any("perf/mfu" in e for e in events)
