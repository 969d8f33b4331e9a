"""Adaptive input and output layers (Grave et al. 2017; Baevski & Auli 2019), tied or not.

The vocabulary is sorted most frequent first (pipeline.data.vocab), so `cutoffs` split it into a
head of frequent characters and tail clusters of rarer ones: cluster k holds ids
[bounds[k], bounds[k+1]) at width d / div^k. A character's input vector is its row of the
cluster's embedding, projected up to d. The output is a softmax over the head characters
plus one entry per tail cluster; a character of tail cluster k has
log p = log p_head(cluster k) + log p_k(character), where p_k is a softmax over the cluster
computed at width d / div^k. Training evaluates the tail softmaxes only for the rows whose
target is in that cluster (on CUDA, selecting them reads their count: one host sync per
cluster); a cluster without such rows still gives its parameters a (zero) gradient. Tied
(`tie=True`), the output uses the input's embeddings and projections. At V = 6,635 with
cutoffs [1000, 3000] and d = 256 this costs about a quarter of the full output layer's
products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdaptiveIO(nn.Module):
    def __init__(self, vocab_size: int, d: int, cutoffs: list[int], div: int, tie: bool):
        super().__init__()
        self.bounds = [0, *cutoffs, vocab_size]
        n = len(self.bounds) - 1
        self.dims = [max(1, d // div**k) for k in range(n)]
        sizes = [hi - lo for lo, hi in zip(self.bounds, self.bounds[1:])]

        def matrices(shapes, std):
            return nn.ParameterList(nn.Parameter(torch.randn(*s) * std) for s in shapes)

        self.emb = matrices([(s, dk) for s, dk in zip(sizes, self.dims)], 1.0)
        self.proj = nn.ParameterList(  # input: d_k -> d
            nn.Parameter(torch.randn(dk, d) * dk**-0.5) for dk in self.dims[1:]
        )
        self.tie = tie
        if not tie:
            self.out_emb = matrices([(s, dk) for s, dk in zip(sizes, self.dims)], d**-0.5)
            self.out_proj = matrices([(dk, d) for dk in self.dims[1:]], d**-0.5)
        self.cluster = nn.Parameter(torch.zeros(n - 1, d))  # head logits of the tail clusters
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in sizes)
        self.cluster_bias = nn.Parameter(torch.zeros(n - 1))

    def _out(self, k: int):
        """Output embedding and projection (d -> d_k is its transpose) of cluster k."""
        emb = self.emb if self.tie else self.out_emb
        proj = self.proj if self.tie else self.out_proj
        return emb[k], (proj[k - 1] if k else None)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Input vectors (..., d) of ids x; static shapes (every cluster for every id)."""
        out = None
        for k, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            inside = (x >= lo) & (x < hi)
            rows = F.embedding((x - lo).clamp(0, hi - lo - 1), self.emb[k])
            vec = rows if k == 0 else rows @ self.proj[k - 1]
            vec = vec * inside.unsqueeze(-1).to(vec.dtype)
            out = vec if out is None else out + vec
        return out

    def _head(self, h_ND: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([self._out(0)[0], self.cluster])
        return F.log_softmax(
            F.linear(h_ND, weight, torch.cat([self.bias[0], self.cluster_bias])), -1
        )

    def _tail(self, k: int, h_ND: torch.Tensor) -> torch.Tensor:
        emb, proj = self._out(k)
        # F.linear(h, proj) is h @ proj^T on the parameter itself: under autocast its bf16
        # copy is the one the input projection made (a transposed view would be cast again)
        return F.log_softmax(F.linear(F.linear(h_ND, proj), emb, self.bias[k]), -1)

    def log_prob(self, h_ND: torch.Tensor) -> torch.Tensor:
        """log p over the whole vocabulary, (N, V): for evaluation and generation."""
        head = self._head(h_ND)
        size0 = self.bounds[1]
        parts = [head[:, :size0]]
        for k in range(1, len(self.bounds) - 1):
            parts.append(head[:, size0 + k - 1 : size0 + k] + self._tail(k, h_ND))
        return torch.cat(parts, -1)

    def nll(self, h_ND: torch.Tensor, target_N: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """-log p(target) per row, 0 where the target is `ignore_index`."""
        keep = target_N != ignore_index
        target = torch.where(keep, target_N, 0)
        head = self._head(h_ND)
        size0 = self.bounds[1]
        head_target = target.clamp(max=size0 - 1)
        for k, lo in enumerate(self.bounds[1:-1], start=1):  # a tail's rows point at its entry
            head_target = torch.where(target >= lo, size0 + k - 1, head_target)
        nll = -head.gather(1, head_target[:, None]).squeeze(1)
        for k in range(1, len(self.bounds) - 1):
            lo, hi = self.bounds[k], self.bounds[k + 1]
            rows = ((target >= lo) & (target < hi)).nonzero().squeeze(1)
            # no `if rows.numel()`: with no row in the cluster the products are empty, yet
            # its parameters stay in the graph and get a zero gradient (DDP needs every
            # parameter's gradient on every rank, whatever its minibatch holds)
            tail = self._tail(k, h_ND.index_select(0, rows))
            picked = tail.gather(1, (target.index_select(0, rows) - lo)[:, None]).squeeze(1)
            nll = nll.index_add(0, rows, -picked.to(nll.dtype))
        return nll * keep
