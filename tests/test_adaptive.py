"""Adaptive input and output (model.adaptive_cutoffs): a normalised distribution over the whole
vocabulary, the training NLL equal to the full log-probability of the target, tying, and the
trainer's loss path through it."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, load_ckpt, metrics, run_cli

from pipeline.data.common import IGNORE
from pipeline.model.adaptive import AdaptiveIO
from pipeline.model.rnn import TorchRNN, num_params

V, D, N = 50, 16, 40


@pytest.mark.parametrize("tie", [True, False])
def test_log_prob_is_normalised_and_nll_is_its_target_entry(tie):
    torch.manual_seed(0)
    io = AdaptiveIO(V, D, [10, 30], 2, tie)
    assert io.dims == [16, 8, 4]
    h = torch.randn(N, D)
    lp = io.log_prob(h)
    assert lp.shape == (N, V)
    torch.testing.assert_close(lp.logsumexp(-1), torch.zeros(N), atol=1e-5, rtol=0)
    target = torch.arange(N) % V  # every cluster, head and tails
    target[3] = IGNORE
    nll = io.nll(h, target, IGNORE)
    ref = -lp.gather(1, target.clamp(min=0)[:, None]).squeeze(1) * (target != IGNORE)
    torch.testing.assert_close(nll, ref)
    assert nll[3] == 0


def test_embed_is_the_cluster_row_projected_up():
    torch.manual_seed(0)
    io = AdaptiveIO(V, D, [10, 30], 2, True)
    x = torch.tensor([[0, 9, 10, 29, 30, 49]])
    e = io.embed(x)[0]
    torch.testing.assert_close(e[1], io.emb[0][9])
    torch.testing.assert_close(e[2], io.emb[1][0] @ io.proj[0])
    torch.testing.assert_close(e[5], io.emb[2][19] @ io.proj[1])


def test_tying_shares_input_and_output_and_the_gradient_reaches_both_uses():
    torch.manual_seed(0)
    tied, untied = AdaptiveIO(V, D, [10, 30], 2, True), AdaptiveIO(V, D, [10, 30], 2, False)
    assert num_params(untied) - num_params(tied) == sum(p.numel() for p in [*tied.emb, *tied.proj])
    # a tail character used only as a target still moves its (shared) embedding row
    h = torch.randn(4, D)
    tied.nll(h, torch.tensor([40, 41, 1, 2]), IGNORE).sum().backward()
    assert tied.emb[2].grad[10].abs().sum() > 0 and tied.proj[1].grad.abs().sum() > 0


@pytest.mark.parametrize("tie", [True, False])
def test_every_parameter_gets_a_gradient_when_no_target_is_in_a_tail(tie):
    """DDP (no find_unused_parameters) needs a gradient for every parameter on every rank,
    also on a rank whose minibatch has no target in some tail cluster: it gets zeros."""
    torch.manual_seed(0)
    io = AdaptiveIO(V, D, [10, 30], 2, tie)
    x, y = torch.tensor([1, 2, 3, 4]), torch.tensor([2, 3, 4, 5])  # head ids only
    h = torch.tanh(io.embed(x))  # as in the model: the inputs, then the outputs
    io.nll(h, y, IGNORE).sum().backward()
    missing = [n for n, p in io.named_parameters() if p.grad is None]
    assert not missing
    assert io.bias[2].grad.abs().sum() == 0 and io.bias[0].grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_model_nll_path_equals_its_log_probabilities(kind):
    torch.manual_seed(0)
    model = TorchRNN(kind, V, D, num_layers=2, tie_weights=True, adaptive_cutoffs=(10, 30))
    model.eval()
    x, y = torch.randint(0, V, (3, 7)), torch.randint(0, V, (3, 7))
    state = model.init_state(3, torch.device("cpu"))
    lp_TBV, s1 = model(x, state)
    nll_N, s2 = model(x, state, None, y)
    ref = -lp_TBV.flatten(0, 1).gather(1, y.t().reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(nll_N, ref)
    for a, b in zip(s1, s2):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_training_with_an_adaptive_output_learns(tmp_path):
    """The jaychou text with cutoffs: the loss falls and the checkpoint reloads for eval."""
    run_dir = tmp_path / "run"
    run_cli(
        [
            "train",
            *TINY,
            f"run.dir={run_dir}",
            "model.kind=lstm",
            "model.tie_weights=true",
            "model.adaptive_cutoffs=[50,200]",
            "train.optimizer=adam",
            "train.lr=0.01",
            "train.epochs=3",
            "data.valid_fraction=0.1",
        ]
    )
    saved = load_ckpt(run_dir)
    assert any(k.startswith("io.emb") for k in saved["model"])
    out = run_cli(["eval", "--checkpoint", str(run_dir / "checkpoints" / "last.pt")])
    assert '"perplexity"' in out.stdout
    losses = [e["train/loss"] for e in metrics(run_dir, "train/loss")]
    assert losses[-1] < losses[0] - 0.5, losses
