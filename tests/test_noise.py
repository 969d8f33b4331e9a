"""Masks as pure functions of (seed, step, site, global stream, position): the tensor hash
equals its exact Python reference, masks have the configured rate and shape, a rank's masks
are the slice of the global ones, and the models apply them (dropout, locked dropout,
weight drop) as the same function whatever the world size."""

from __future__ import annotations

import pytest
import torch

from pipeline import config
from pipeline.config import ModelConfig
from pipeline.model.noise import BITS, GAMMA, WEIGHT_SITE, Noise, fmix64, site_key
from pipeline.model.rnn import TorchRNN, build_model

CPU = torch.device("cpu")
V, H, B, T = 19, 12, 6, 5


def reference_keep(seed: int, step: int, site: int, counter: int, p: float) -> bool:
    """One mask element by the definition, in exact Python integers."""
    x = fmix64(site_key(seed, step, site) + counter * GAMMA)
    return (x & ((1 << BITS) - 1)) < round((1 - p) * (1 << BITS))


def test_tensor_hash_equals_python_reference():
    noise, p = Noise(seed=11, step=7, first_stream=3), 0.4
    mask = noise.dropout_mask(2, p, (T, B, H), False, CPU, torch.float32)
    locked = noise.dropout_mask(2, p, (T, B, H), True, CPU, torch.float32)
    weight = noise.weight_mask(1, p, (H, 2 * H), CPU, torch.float32)
    scale = 1 / (1 - p)
    for t in range(T):
        for b in range(B):
            for j in range(H):
                g = 3 + b  # the global stream
                keep = reference_keep(11, 7, 2, (g * T + t) * H + j, p)
                assert mask[t, b, j].item() == pytest.approx(scale if keep else 0.0)
                if t == 0:
                    keep = reference_keep(11, 7, 2, g * H + j, p)
                    assert locked[0, b, j].item() == pytest.approx(scale if keep else 0.0)
    for r in range(H):
        for c in range(2 * H):
            keep = reference_keep(11, 7, WEIGHT_SITE + 1, r * 2 * H + c, p)
            assert weight[r, c].item() == pytest.approx(scale if keep else 0.0)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_rate_and_shape(p):
    noise = Noise(seed=0, step=123)
    mask = noise.dropout_mask(0, p, (35, 64, 256), False, CPU, torch.float32)
    assert mask.shape == (35, 64, 256)
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    assert (mask == 0).float().mean().item() == pytest.approx(p, abs=0.005)
    assert mask.mean().item() == pytest.approx(1.0, abs=0.02)  # inverted dropout keeps the mean
    locked = noise.dropout_mask(0, p, (35, 64, 256), True, CPU, torch.float32)
    assert locked.shape == (1, 64, 256)
    assert (locked == 0).float().mean().item() == pytest.approx(p, abs=0.01)
    w = noise.weight_mask(0, p, (1024, 256), CPU, torch.float32)
    assert w.shape == (1024, 256)
    assert (w == 0).float().mean().item() == pytest.approx(p, abs=0.005)


def test_rank_masks_are_slices_of_the_global_mask():
    """4 global streams on 1, 2 or 4 ranks: every rank's mask is its rows of the global one."""
    whole = Noise(5, 9, 0).dropout_mask(1, 0.5, (T, 4, H), False, CPU, torch.float32)
    locked = Noise(5, 9, 0).dropout_mask(1, 0.5, (T, 4, H), True, CPU, torch.float32)
    for world in (2, 4):
        b = 4 // world
        for rank in range(world):
            mine = Noise(5, 9, rank * b)
            rows = slice(rank * b, (rank + 1) * b)
            got = mine.dropout_mask(1, 0.5, (T, b, H), False, CPU, torch.float32)
            assert torch.equal(got, whole[:, rows])
            got = mine.dropout_mask(1, 0.5, (T, b, H), True, CPU, torch.float32)
            assert torch.equal(got, locked[:, rows])
            # weight drop: one mask for the whole global batch, the same on every rank
            assert torch.equal(
                mine.weight_mask(0, 0.3, (H, H), CPU, torch.float32),
                Noise(5, 9, 0).weight_mask(0, 0.3, (H, H), CPU, torch.float32),
            )


def test_masks_differ_by_seed_step_site_stream_and_time():
    def m(seed=1, step=2, site=0, first=0, locked=False):
        shape = (T, 8, 64)
        return Noise(seed, step, first).dropout_mask(site, 0.5, shape, locked, CPU, torch.float32)

    base = m()
    for other in (m(seed=2), m(step=3), m(site=1), m(first=8)):
        agree = (other == base).float().mean().item()
        assert 0.4 < agree < 0.6  # unrelated masks agree on about half the elements at p = 0.5
    assert torch.equal(m(), base)  # and the same arguments give the same mask
    assert 0.4 < (base[0] == base[1]).float().mean().item() < 0.6  # fresh per time step
    assert 0.4 < (base[:, 0] == base[:, 1]).float().mean().item() < 0.6  # and per stream


# ---------------------------------------------------------------- in the models


def models(**kw):
    torch.manual_seed(0)
    return {
        kind: TorchRNN(kind, V, H, num_layers=2, dropout=0.4, **kw).train()
        for kind in ("rnn", "gru", "lstm")
    }


@pytest.mark.parametrize("kw", [{}, {"dropout_kind": "locked", "weight_drop": 0.3}])
def test_rank_rows_equal_the_global_batch_rows(kw):
    """The forward of rank r's rows with Noise(first_stream=r*b) is the slice of the global
    forward: the model is the same function whatever the world size."""
    x = torch.randint(0, V, (4, T))
    for kind, model in models(**kw).items():
        state = tuple(torch.randn_like(s) for s in model.init_state(4, CPU))
        whole, whole_state = model(x, state, Noise(3, 17, 0))
        for rank in (0, 1):
            rows = slice(2 * rank, 2 * rank + 2)
            part, part_state = model(
                x[rows], tuple(s[:, rows] for s in state), Noise(3, 17, 2 * rank)
            )
            torch.testing.assert_close(part, whole[:, rows], msg=kind)
            for a, b in zip(part_state, whole_state):
                torch.testing.assert_close(a, b[:, rows], msg=kind)
        # a rank that took the masks of global stream 0 (the old every-rank-reseeds
        # behaviour) computes something else
        wrong, _ = model(x[2:], tuple(s[:, 2:] for s in state), Noise(3, 17, 0))
        assert not torch.allclose(wrong, whole[:, 2:], atol=1e-3), kind


def test_dropout_changes_the_loss_and_is_off_in_eval():
    """Training mode: the masks are a pure function of the noise; without one (outside the
    trainer) fresh masks from torch's RNG at every call; model.dropout=0 drops nothing. Eval
    mode drops nothing, noise or not. model.dropout from the config reaches the model."""
    x = torch.randint(0, V, (B, T))
    for kind, model in models().items():
        state = model.init_state(B, CPU)
        a = model(x, state, Noise(0, 1))[0]
        assert torch.equal(a, model(x, state, Noise(0, 1))[0])  # a pure function of the noise
        assert not torch.allclose(a, model(x, state, Noise(0, 2))[0])  # another step
        assert not torch.allclose(model(x, state)[0], model(x, state)[0])  # no noise given
        model.eval()
        e1, e2 = model(x, state, Noise(0, 1))[0], model(x, state, Noise(0, 2))[0]
        assert torch.equal(e1, e2) and not torch.allclose(a, e1), kind
        assert torch.equal(model(x, state)[0], e1), kind
        plain = build_model(ModelConfig(kind=kind, hidden_size=H, num_layers=2, dropout=0.0), V)
        assert plain.training and plain.dropout == 0.0
        assert torch.equal(plain(x, state)[0], plain(x, state)[0]), kind
    cfg = config.load(None, ["model.kind=gru", "model.num_layers=2", "model.dropout=0.5"])
    assert build_model(cfg.model, V).dropout == 0.5


def test_locked_dropout_shares_the_mask_across_time():
    """Dropout on the embedding only (one layer; the output mask is visible in the logits'
    input): with `locked`, a unit dropped at step t is dropped at every step of that stream."""
    torch.manual_seed(0)
    model = TorchRNN("rnn", V, H, num_layers=1, dropout=0.5, dropout_kind="locked").train()
    seen = []
    model.dense.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    model(torch.randint(0, V, (B, T)), model.init_state(B, CPU), Noise(0, 4))
    zero_TBH = seen[0] == 0  # the output-site mask, applied to the last layer's output
    assert zero_TBH.any()
    assert torch.equal(zero_TBH, zero_TBH[:1].expand_as(zero_TBH))
    standard = TorchRNN("rnn", V, H, num_layers=1, dropout=0.5).train()
    standard.dense.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    standard(torch.randint(0, V, (B, T)), standard.init_state(B, CPU), Noise(0, 4))
    zero_TBH = seen[1] == 0
    assert not torch.equal(zero_TBH, zero_TBH[:1].expand_as(zero_TBH))


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_weight_drop_masks_the_recurrent_weights(kind):
    """The forward equals the cell with W_hh * mask put in by hand, and the gradient of W_hh
    is zero exactly where the mask dropped a weight."""
    torch.manual_seed(0)
    model = TorchRNN(kind, V, H, num_layers=1, weight_drop=0.5).train()
    x, state = torch.randint(0, V, (B, T)), model.init_state(B, CPU)
    noise = Noise(2, 6)
    out, _ = model(x, state, noise)
    cell = model.rnn[0]
    mask = noise.weight_mask(0, 0.5, tuple(cell.weight_hh_l0.shape), CPU, torch.float32)
    assert 0.4 < (mask == 0).float().mean().item() < 0.6
    by_hand = TorchRNN(kind, V, H, num_layers=1).train()
    by_hand.load_state_dict(model.state_dict())
    with torch.no_grad():
        by_hand.rnn[0].weight_hh_l0.mul_(mask)
    torch.testing.assert_close(out, by_hand(x, state, noise)[0])
    out.sum().backward()
    grad = cell.weight_hh_l0.grad
    assert (grad[mask == 0] == 0).all() and (grad[mask != 0] != 0).float().mean() > 0.9
    # the module keeps its own weights: an eval forward afterwards equals a fresh copy's
    fresh = TorchRNN(kind, V, H, num_layers=1).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.eval()(x, state)[0], fresh(x, state)[0])


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_checkpoints_of_stacked_cells_still_load(kind):
    """Before the per-layer cells a model held one stacked nn.RNN/GRU/LSTM (`rnn.weight_ih_l1`);
    such a state dict loads and gives the stacked module's outputs."""
    torch.manual_seed(0)
    stacked = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[kind](H, H, 2)
    emb, dense = torch.nn.Embedding(V, H), torch.nn.Linear(H, V)
    old = {
        "embedding.weight": emb.weight,
        **{f"rnn.{k}": v for k, v in stacked.state_dict().items()},
        "dense.weight": dense.weight,
        "dense.bias": dense.bias,
    }
    assert "rnn.weight_hh_l1" in old
    model = TorchRNN(kind, V, H, num_layers=2).eval()
    model.load_state_dict(old)
    x = torch.randint(0, V, (B, T))
    state = model.init_state(B, CPU)
    with torch.no_grad():
        out, _ = stacked(emb(x.t()), state if kind == "lstm" else state[0])
        torch.testing.assert_close(model(x, state)[0], dense(out))
