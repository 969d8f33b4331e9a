"""Character-level RNN language models: pure nn.Modules, no rank, no I/O.

Every model maps ids x_BT and a state (a tuple of (num_layers, B, H) tensors) to time-major
logits_TBV and the new state. The state is passed in and returned, never stored in the
module: DDP would otherwise broadcast it as a buffer, and each rank carries its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, ModelConfig

State = tuple[torch.Tensor, ...]


class ScratchRNN(nn.Module):
    """The chapter's model: H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h), O_t = H_t W_hq + b_q,
    with normal(0, 0.01) weights and zero biases. X_t is one-hot, so X_t W_xh is row x_t of
    W_xh: the input projection is gathered for all steps at once, and the output layer is
    one matrix product over all steps; only H_{t-1} W_hh stays inside the time loop."""

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
        xw_TBH = F.embedding(x_BT.t(), self.W_xh) + self.b_h  # == one_hot(x) @ W_xh + b_h
        h_BH = state[0][0]
        hs = []
        for xw_BH in xw_TBH.unbind(0):
            h_BH = torch.tanh(torch.addmm(xw_BH, h_BH, self.W_hh))
            hs.append(h_BH)
        h_TBH = torch.stack(hs)
        logits_TBV = torch.matmul(h_TBH, self.W_hq) + self.b_q
        return logits_TBV, (h_BH.unsqueeze(0),)


class TorchRNN(nn.Module):
    """nn.RNN / nn.GRU / nn.LSTM over an input embedding (a learned lookup: the same function
    as the chapter's one-hot input times a weight matrix, without the one-hot matrix)."""

    CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

    def __init__(self, kind: str, vocab_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, embedding_size: int = 0, tie_weights: bool = False):
        super().__init__()
        emb = embedding_size or hidden_size
        self.kind, self.hidden_size, self.num_layers = kind, hidden_size, num_layers
        self.embedding = nn.Embedding(vocab_size, emb)
        self.drop = nn.Dropout(dropout)
        self.rnn = self.CELLS[kind](emb, hidden_size, num_layers,
                                    dropout=dropout if num_layers > 1 else 0.0)
        self.dense = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            if emb != hidden_size:
                raise ConfigError(f"config key 'model.tie_weights': needs model.embedding_size "
                                  f"({emb}) == model.hidden_size ({hidden_size})")
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
        if cfg.dropout or cfg.tie_weights or cfg.embedding_size:
            raise ConfigError("model.kind=rnn_scratch is the chapter's model: it takes no "
                              "model.dropout, model.tie_weights or model.embedding_size")
        return ScratchRNN(vocab_size, cfg.hidden_size, cfg.init_std)
    return TorchRNN(cfg.kind, vocab_size, cfg.hidden_size, cfg.num_layers, cfg.dropout,
                    cfg.embedding_size, cfg.tie_weights)


def detach_state(state: State) -> State:
    """Cut the graph between minibatches: backprop stops at the minibatch boundary (otherwise
    it would run back to the start of the epoch), the values carry on."""
    return tuple(s.detach() for s in state)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
