"""Character-level RNN language models: pure nn.Modules, no rank, no I/O.

Every model maps ids x_BT and a state (a tuple of (num_layers, B, H) tensors) to time-major
logits_TBV (log-probabilities with an adaptive output) and the new state; given the targets
y_BT it returns instead the per-target negative log-likelihood nll_N (time-major, 0 where
the target is IGNORE), which the adaptive output computes without the full logits. The
state is passed in and returned, never stored in the module: DDP would otherwise broadcast
it as a buffer, and each rank carries its own. In training mode `noise`
(pipeline.model.noise.Noise: seed, global step, this rank's first global stream) decides every
dropout and weight-drop mask.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipeline.config import ConfigError, ModelConfig
from pipeline.data.common import IGNORE
from pipeline.model.adaptive import AdaptiveIO
from pipeline.model.loss import cross_entropy
from pipeline.model.noise import Noise

State = tuple[torch.Tensor, ...]


def compute_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype when autocast is on for `device`, else float32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


class TanhRecurrence(torch.autograd.Function):
    """h_t = tanh(xw_t + h_{t-1} W_hh) for t = 1..T, all in one autograd node.

    Autograd through a Python loop records two nodes per step and accumulates dW_hh with one
    small product per step. Here the backward loop carries only dh (one (B,H)x(H,H) product a
    step) and dW_hh = H_prev^T dPre is ONE (H, T*B) x (T*B, H) product after the loop. Inputs
    arrive in the compute dtype (bf16/fp16 under autocast): no casts inside the loop.
    """

    @staticmethod
    def forward(ctx, xw_TBH, h0_BH, W_hh):
        h_TBH = torch.empty_like(xw_TBH)
        h_BH = h0_BH
        for t in range(xw_TBH.shape[0]):
            h_BH = torch.tanh(torch.addmm(xw_TBH[t], h_BH, W_hh), out=h_TBH[t])
        ctx.save_for_backward(h0_BH, W_hh, h_TBH)
        return h_TBH

    @staticmethod
    def backward(ctx, g_TBH):
        h0_BH, W_hh, h_TBH = ctx.saved_tensors
        dpre_TBH = torch.empty_like(h_TBH)
        W_t = W_hh.t().contiguous()
        carry_BH = torch.zeros_like(h0_BH)  # d loss / d h_t from step t+1
        for t in range(h_TBH.shape[0] - 1, -1, -1):
            h_BH = h_TBH[t]
            dh_BH = g_TBH[t] + carry_BH
            torch.mul(dh_BH, 1 - h_BH * h_BH, out=dpre_TBH[t])  # tanh' = 1 - h^2
            carry_BH = dpre_TBH[t] @ W_t
        hprev_TBH = torch.cat([h0_BH.unsqueeze(0), h_TBH[:-1]])
        dW_hh = hprev_TBH.flatten(0, 1).t() @ dpre_TBH.flatten(0, 1)
        return dpre_TBH, carry_BH, dW_hh


class ScratchRNN(nn.Module):
    """The chapter's model: H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h), O_t = H_t W_hq + b_q,
    with normal(0, 0.01) weights and zero biases. X_t is one-hot, so X_t W_xh is row x_t of
    W_xh: the input projection is gathered for all steps at once, and the output layer is
    one matrix product over all steps; only H_{t-1} W_hh stays inside the time loop, run by
    TanhRecurrence (one autograd node, hand-written backward)."""

    def __init__(self, vocab_size: int, hidden_size: int, init_std: float = 0.01):
        super().__init__()
        self.hidden_size = hidden_size

        def normal(*shape):
            return nn.Parameter(torch.randn(*shape) * init_std)

        self.W_xh = normal(vocab_size, hidden_size)
        self.W_hh = normal(hidden_size, hidden_size)
        self.b_h = nn.Parameter(torch.zeros(hidden_size))
        self.W_hq = normal(hidden_size, vocab_size)
        self.b_q = nn.Parameter(torch.zeros(vocab_size))

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return (torch.zeros(1, batch_size, self.hidden_size, device=device),)

    def forward(
        self, x_BT: torch.Tensor, state: State, noise: Noise | None = None, targets=None
    ) -> tuple[torch.Tensor, State]:
        dtype = compute_dtype(x_BT.device)
        xw_TBH = F.embedding(x_BT.t(), self.W_xh) + self.b_h  # == one_hot(x) @ W_xh + b_h
        h_TBH = TanhRecurrence.apply(xw_TBH.to(dtype), state[0][0].to(dtype), self.W_hh.to(dtype))
        T, B, H = h_TBH.shape
        logits_TBV = torch.addmm(self.b_q, h_TBH.view(T * B, H), self.W_hq).view(T, B, -1)
        state = (h_TBH[-1].float().unsqueeze(0),)
        return (logits_TBV if targets is None else nll(logits_TBV, targets)), state


class TorchRNN(nn.Module):
    """nn.RNN / nn.GRU / nn.LSTM over an input embedding (a learned lookup: the same function
    as the chapter's one-hot input times a weight matrix, without the one-hot matrix).

    One single-layer cell per layer, so that this module, not the kernel, draws the masks
    between layers: dropout on the embedding, between layers and before the output layer
    (sites 0..num_layers), and DropConnect on each layer's hidden-to-hidden weights, all from
    `noise` (pipeline.model.noise): a pure function of (seed, step, site, global stream), so the
    same stream gets the same mask whatever rank holds it."""

    CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

    def __init__(
        self,
        kind: str,
        vocab_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        embedding_size: int = 0,
        tie_weights: bool = False,
        dropout_kind: str = "standard",
        weight_drop: float = 0.0,
        adaptive_cutoffs: tuple = (),
        adaptive_div: int = 4,
        forget_bias: float = 0.0,
    ):
        super().__init__()
        emb = embedding_size or hidden_size
        self.kind, self.hidden_size, self.num_layers = kind, hidden_size, num_layers
        self.dropout, self.locked, self.weight_drop = dropout, dropout_kind == "locked", weight_drop
        for key, wants in (("tie_weights", tie_weights), ("adaptive_cutoffs", adaptive_cutoffs)):
            if wants and emb != hidden_size:
                raise ConfigError(
                    f"config key 'model.{key}': needs model.embedding_size "
                    f"({emb}) == model.hidden_size ({hidden_size})"
                )
        cell = self.CELLS[kind]
        rnn = nn.ModuleList(
            cell(emb if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )
        if kind == "lstm" and forget_bias:  # gates i, f, g, o: a remembering start
            with torch.no_grad():
                for layer in rnn:
                    layer.bias_ih_l0[hidden_size : 2 * hidden_size] += forget_bias
        if adaptive_cutoffs:
            self.io = AdaptiveIO(
                vocab_size, hidden_size, list(adaptive_cutoffs), adaptive_div, tie_weights
            )
        else:
            embedding = nn.Embedding(vocab_size, emb)
            dense = nn.Linear(hidden_size, vocab_size)
        # Initialised in the order above, registered in format 1's (embedding, rnn, dense):
        # an optimizer state is positional, so one saved with the stacked cells then lines
        # up with the same parameters (the per-layer cells list them in the stacked order).
        if not adaptive_cutoffs:
            self.embedding = embedding
        self.rnn = rnn
        if not adaptive_cutoffs:
            self.dense = dense
            if tie_weights:
                self.dense.weight = self.embedding.weight
        self.register_load_state_dict_pre_hook(_stacked_to_per_layer)

    def init_state(self, batch_size: int, device: torch.device) -> State:
        z = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device)
        return (z, z.clone()) if self.kind == "lstm" else (z,)

    def forward(
        self, x_BT: torch.Tensor, state: State, noise: Noise | None = None, targets=None
    ) -> tuple[torch.Tensor, State]:
        if self.training and noise is None:  # outside the trainer: masks from torch's RNG
            noise = Noise(int(torch.randint(2**62, ())), 0)
        adaptive = hasattr(self, "io")
        e_TBD = self.io.embed(x_BT.t()) if adaptive else self.embedding(x_BT.t())
        h_TBD = self._drop(e_TBD, 0, noise)
        last = []
        for i, cell in enumerate(self.rnn):
            h0 = tuple(s[i : i + 1] for s in state)
            h_TBD, hn = self._cell(cell, i, h_TBD, h0 if self.kind == "lstm" else h0[0], noise)
            last.append(hn if self.kind == "lstm" else (hn,))
            h_TBD = self._drop(h_TBD, i + 1, noise)
        # Carried and saved in fp32 whatever the compute dtype (under bf16 autocast nn.LSTM
        # returns bf16 states): cast at use, so a run resumes in any precision.
        state = tuple(torch.cat(parts).float() for parts in zip(*last))
        if not adaptive:
            logits_TBV = self.dense(h_TBD)
            return (logits_TBV if targets is None else nll(logits_TBV, targets)), state
        T, B, _ = h_TBD.shape
        h_ND = h_TBD.flatten(0, 1)
        if targets is None:
            return self.io.log_prob(h_ND).view(T, B, -1), state
        return self.io.nll(h_ND, targets.t().reshape(-1), IGNORE), state

    def _drop(self, h_TBD: torch.Tensor, site: int, noise: Noise | None) -> torch.Tensor:
        if not (self.training and self.dropout):
            return h_TBD
        mask = noise.dropout_mask(
            site, self.dropout, h_TBD.shape, self.locked, h_TBD.device, h_TBD.dtype
        )
        return h_TBD * mask

    def _cell(self, cell: nn.Module, i: int, h_TBD, h0, noise: Noise | None):
        if not (self.training and self.weight_drop):
            return cell(h_TBD, h0)
        w = cell.weight_hh_l0
        mask = noise.weight_mask(i, self.weight_drop, tuple(w.shape), w.device, w.dtype)
        return functional_call(cell, {"weight_hh_l0": w * mask}, (h_TBD, h0))


_STACKED_KEY = re.compile(r"^rnn\.((?:weight|bias)_(?:ih|hh))_l(\d+)$")


def _stacked_to_per_layer(module, state_dict, prefix, *args) -> None:
    """Checkpoints from before the per-layer cells hold one stacked nn.RNN/GRU/LSTM
    (`rnn.weight_ih_l1`); the same weights are now `rnn.1.weight_ih_l0`."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        found = _STACKED_KEY.match(key[len(prefix) :])
        if found:
            name, layer = found.groups()
            state_dict[f"{prefix}rnn.{layer}.{name}_l0"] = state_dict.pop(key)


def nll(logits_TBV: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    """-log p(target) per target, time-major (N = T * B), 0 where the target is IGNORE."""
    return cross_entropy(
        logits_TBV.flatten(0, 1), y_BT.t().reshape(-1), ignore_index=IGNORE, reduction="none"
    )


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    if cfg.kind == "rnn_scratch":
        ignored = [
            f"model.{k}={v}"
            for k, v in (
                ("num_layers", cfg.num_layers),
                ("dropout", cfg.dropout),
                ("weight_drop", cfg.weight_drop),
                ("embedding_size", cfg.embedding_size),
                ("tie_weights", cfg.tie_weights),
                ("adaptive_cutoffs", cfg.adaptive_cutoffs),
                ("forget_bias", cfg.forget_bias),
            )
            if v and not (k == "num_layers" and v == 1)
        ]
        if ignored:  # any config runs with any model.kind; say what does not apply
            warnings.warn(
                "model.kind=rnn_scratch is the chapter's one-layer model without "
                f"dropout or embedding; ignoring {', '.join(ignored)}",
                stacklevel=2,
            )
        return ScratchRNN(vocab_size, cfg.hidden_size, cfg.init_std)
    if cfg.forget_bias and cfg.kind != "lstm":
        warnings.warn(
            f"model.forget_bias={cfg.forget_bias}: only an lstm has a forget gate; "
            f"ignored for model.kind={cfg.kind}",
            stacklevel=2,
        )
    cutoffs = [c for c in cfg.adaptive_cutoffs if c < vocab_size]
    if len(cutoffs) < len(cfg.adaptive_cutoffs):  # any config runs on any text
        warnings.warn(
            f"model.adaptive_cutoffs={cfg.adaptive_cutoffs}: the vocabulary has {vocab_size} "
            f"characters, so the clusters start at {cutoffs} only",
            stacklevel=2,
        )
    return TorchRNN(
        cfg.kind,
        vocab_size,
        cfg.hidden_size,
        cfg.num_layers,
        cfg.dropout,
        cfg.embedding_size,
        cfg.tie_weights,
        cfg.dropout_kind,
        cfg.weight_drop,
        tuple(cutoffs),
        cfg.adaptive_div,
        cfg.forget_bias,
    )


def detach_state(state: State) -> State:
    """Cut the graph between minibatches: backprop stops at the minibatch boundary (otherwise
    it would run back to the start of the epoch), the values carry on."""
    return tuple(s.detach() for s in state)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
