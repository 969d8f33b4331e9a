"""Character-level RNN language models: pure nn.Modules, no rank, no I/O.

Every model maps ids x_BT and a state (a tuple of (num_layers, B, H) tensors) to time-major
logits_TBV and the new state. The state is passed in and returned, never stored in the
module: DDP would otherwise broadcast it as a buffer, and each rank carries its own.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, ModelConfig

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

    def forward(self, x_BT: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        dtype = compute_dtype(x_BT.device)
        xw_TBH = F.embedding(x_BT.t(), self.W_xh) + self.b_h  # == one_hot(x) @ W_xh + b_h
        h_TBH = TanhRecurrence.apply(xw_TBH.to(dtype), state[0][0].to(dtype), self.W_hh.to(dtype))
        T, B, H = h_TBH.shape
        logits_TBV = torch.addmm(self.b_q, h_TBH.view(T * B, H), self.W_hq).view(T, B, -1)
        return logits_TBV, (h_TBH[-1].float().unsqueeze(0),)


class TorchRNN(nn.Module):
    """nn.RNN / nn.GRU / nn.LSTM over an input embedding (a learned lookup: the same function
    as the chapter's one-hot input times a weight matrix, without the one-hot matrix)."""

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
    ):
        super().__init__()
        emb = embedding_size or hidden_size
        self.kind, self.hidden_size, self.num_layers = kind, hidden_size, num_layers
        self.embedding = nn.Embedding(vocab_size, emb)
        self.drop = nn.Dropout(dropout)
        self.rnn = self.CELLS[kind](
            emb, hidden_size, num_layers, dropout=dropout if num_layers > 1 else 0.0
        )
        self.dense = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            if emb != hidden_size:
                raise ConfigError(
                    f"config key 'model.tie_weights': needs model.embedding_size "
                    f"({emb}) == model.hidden_size ({hidden_size})"
                )
            self.dense.weight = self.embedding.weight

    def init_state(self, batch_size: int, device: torch.device) -> State:
        z = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device)
        return (z, z.clone()) if self.kind == "lstm" else (z,)

    def forward(self, x_BT: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        e_TBE = self.drop(self.embedding(x_BT.t()))
        h0 = state if self.kind == "lstm" else state[0]
        out_TBH, hn = self.rnn(e_TBE, h0)
        logits_TBV = self.dense(self.drop(out_TBH))
        return logits_TBV, (tuple(hn) if self.kind == "lstm" else (hn,))


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    if cfg.kind == "rnn_scratch":
        ignored = [
            f"model.{k}={v}"
            for k, v in (
                ("num_layers", cfg.num_layers),
                ("dropout", cfg.dropout),
                ("embedding_size", cfg.embedding_size),
                ("tie_weights", cfg.tie_weights),
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
    return TorchRNN(
        cfg.kind,
        vocab_size,
        cfg.hidden_size,
        cfg.num_layers,
        cfg.dropout,
        cfg.embedding_size,
        cfg.tie_weights,
    )


def detach_state(state: State) -> State:
    """Cut the graph between minibatches: backprop stops at the minibatch boundary (otherwise
    it would run back to the start of the epoch), the values carry on."""
    return tuple(s.detach() for s in state)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
