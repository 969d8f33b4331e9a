"""Models: the scratch RNN's index input is the chapter's one-hot input; state in and out."""

from __future__ import annotations

import pytest
import torch

from bench.seed_reference import rnn, to_onehot
from pipeline import config
from pipeline.config import ConfigError, ModelConfig
from pipeline.model.rnn import ScratchRNN, TorchRNN, build_model, detach_state, num_params

V, H, B, T = 23, 16, 3, 7


# ---------------------------------------------------------------- index input == one-hot input


def test_scratch_index_input_equals_chapter_one_hot():
    torch.manual_seed(0)
    model = ScratchRNN(V, H)
    with torch.no_grad():  # non-zero biases, so that they are checked too
        model.b_h.normal_(0, 0.1)
        model.b_q.normal_(0, 0.1)
    params = [
        torch.nn.Parameter(p.detach().clone())
        for p in (model.W_xh, model.W_hh, model.b_h, model.W_hq, model.b_q)
    ]
    x = torch.randint(0, V, (B, T))
    y = torch.randint(0, V, (B, T))
    h0 = torch.randn(B, H) * 0.5

    logits_TBV, (h_1BH,) = model(x, (h0.unsqueeze(0),))
    outputs, (h_ref,) = rnn(to_onehot(x, V), (h0,), params)

    torch.testing.assert_close(logits_TBV, torch.stack(outputs))
    torch.testing.assert_close(h_1BH[0], h_ref)
    # the chapter's loss: outputs concatenated over time, targets Y.T flattened
    loss_fn = torch.nn.CrossEntropyLoss()
    loss_ref = loss_fn(torch.cat(outputs, dim=0), torch.flatten(y.T).long())
    loss = loss_fn(logits_TBV.flatten(0, 1), y.t().reshape(-1))
    torch.testing.assert_close(loss, loss_ref)
    loss.backward()
    loss_ref.backward()
    names = ["W_xh", "W_hh", "b_h", "W_hq", "b_q"]
    for name, p_ref in zip(names, params):
        torch.testing.assert_close(
            getattr(model, name).grad, p_ref.grad, msg=lambda m, n=name: f"grad of {n}: {m}"
        )
    # the one-hot product only touches the rows of W_xh that occur in x
    unused = sorted(set(range(V)) - set(x.flatten().tolist()))
    assert unused and model.W_xh.grad[unused].abs().sum() == 0


def test_scratch_parameters_are_the_chapters():
    torch.manual_seed(0)
    model = ScratchRNN(1038, 256)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {
        "W_xh": (1038, 256),
        "W_hh": (256, 256),
        "b_h": (256,),
        "W_hq": (256, 1038),
        "b_q": (1038,),
    }
    assert model.b_h.abs().sum() == 0 and model.b_q.abs().sum() == 0
    for w in (model.W_xh, model.W_hh, model.W_hq):  # normal(0, 0.01)
        assert abs(w.mean().item()) < 1e-3
        assert w.std().item() == pytest.approx(0.01, rel=0.05)


# ---------------------------------------------------------------- state in and out


@pytest.mark.parametrize("kind", ["rnn_scratch", "rnn", "gru", "lstm"])
def test_state_passed_in_and_out_not_stored(kind):
    torch.manual_seed(0)
    layers = 1 if kind == "rnn_scratch" else 2
    model = build_model(ModelConfig(kind=kind, hidden_size=H, num_layers=layers), V)
    assert list(model.buffers()) == []  # nothing for DDP to broadcast
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, V, (B, T))

    state0 = model.init_state(B, torch.device("cpu"))
    assert len(state0) == (2 if kind == "lstm" else 1)
    assert all(s.shape == (layers, B, H) and s.abs().sum() == 0 for s in state0)
    logits, state1 = model(x, state0)
    assert logits.shape == (T, B, V)
    assert len(state1) == len(state0)
    assert all(s.shape == (layers, B, H) for s in state1)
    assert all(s.abs().sum() == 0 for s in state0)  # the input state is not modified

    # the result depends only on (x, state): running the same call again gives the same
    # output, and running the two halves with the state carried gives the whole
    logits_again, _ = model(x, state0)
    torch.testing.assert_close(logits_again, logits)
    first, mid = model(x[:, :3], state0)
    second, end = model(x[:, 3:], mid)
    torch.testing.assert_close(torch.cat([first, second]), logits)
    for a, b in zip(end, state1):
        torch.testing.assert_close(a, b)
    # a different incoming state changes the output
    other, _ = model(x, tuple(torch.ones_like(s) for s in state0))
    assert not torch.allclose(other, logits)
    # the module holds no state of its own afterwards
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert list(model.buffers()) == []

    detached = detach_state(state1)
    assert all(not s.requires_grad for s in detached)
    assert all(torch.equal(a, b) for a, b in zip(detached, state1))


def test_torch_models_options():
    m = TorchRNN("gru", V, H, num_layers=2, dropout=0.3, embedding_size=8)
    assert m.embedding.weight.shape == (V, 8) and m.dropout == 0.3
    # one single-layer cell per layer: the module, not the kernel, drops between them
    assert [(c.input_size, c.num_layers, c.dropout) for c in m.rnn] == [(8, 1, 0), (H, 1, 0)]


def test_weight_tying_shares_the_matrix_and_cuts_parameters():
    """model.tie_weights (through the config): the output layer is the embedding matrix, one
    V x H matrix fewer; a state dict loads into a fresh tied model (both names, one tensor);
    unequal widths are a config error."""

    def model(kind="lstm", hidden_size=H, embedding_size=H, **kw):
        kw.update(kind=kind, hidden_size=hidden_size, embedding_size=embedding_size)
        return build_model(config.load(None, [f"model.{k}={v}" for k, v in kw.items()]).model, V)

    untied, tied = model(), model(tie_weights="true")
    assert tied.dense.weight is tied.embedding.weight
    assert tied.dense.weight.data_ptr() == tied.embedding.weight.data_ptr()
    assert num_params(untied) - num_params(tied) == V * H
    fresh = model(tie_weights="true")
    fresh.load_state_dict(tied.state_dict())
    assert fresh.dense.weight.data_ptr() == fresh.embedding.weight.data_ptr()
    assert torch.equal(fresh.dense.weight, tied.dense.weight)
    with pytest.raises(ConfigError, match="model.tie_weights"):
        TorchRNN("lstm", V, H, embedding_size=8, tie_weights=True)
    with pytest.raises(ConfigError, match="model.tie_weights"):
        model(kind="gru", hidden_size=32, embedding_size=16, tie_weights="true")


def test_scratch_says_which_options_it_ignores():
    """Any config runs with model.kind=rnn_scratch (the chapter's one-layer model): options it
    has no use for are named in a warning, and the model is the chapter's."""
    with pytest.warns(UserWarning, match=r"ignoring model.num_layers=2, model.dropout=0.2"):
        m = build_model(ModelConfig(kind="rnn_scratch", num_layers=2, dropout=0.2), V)
    assert isinstance(m, ScratchRNN) and m.init_state(B, torch.device("cpu"))[0].shape[0] == 1


def test_forget_bias_shifts_only_the_forget_gate():
    """model.forget_bias adds to the forget gate's slice of each LSTM layer's input bias
    (gates i, f, g, o) and leaves every other initial weight as torch draws it."""
    cfg = dict(kind="lstm", num_layers=2, hidden_size=H)
    torch.manual_seed(0)
    plain = build_model(ModelConfig(**cfg), V).state_dict()
    torch.manual_seed(0)
    shifted = build_model(ModelConfig(**cfg, forget_bias=1.5), V).state_dict()
    for key, value in plain.items():
        delta = shifted[key] - value
        if key.endswith("bias_ih_l0"):
            want = torch.zeros(4, H)
            want[1] = 1.5
            torch.testing.assert_close(delta.view(4, H), want)
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), key
    with pytest.warns(UserWarning, match=r"model.forget_bias=1.0: only an lstm"):
        build_model(ModelConfig(kind="gru", hidden_size=H, forget_bias=1.0), V)
