"""Cross-entropy over low-precision logits without an fp32 copy of the whole logit matrix.

Under bf16/fp16 autocast the output layer gives (N, V) half-precision logits. Casting them to
fp32 for `F.cross_entropy` costs a full fp32 copy, an fp32 log-softmax and an fp32 gradient
that is cast back: at V = 6.6k this was 40% of a CPU training step. Here the log-sum-exp is
accumulated in fp32 over row chunks (so the loss is as exact as the fp32 path), and the
backward forms (softmax - onehot) * grad in fp32 one chunk at a time and writes it into a
half-precision gradient. fp32 logits take
`F.cross_entropy` itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.data.common import IGNORE

LN2 = math.log(2.0)  # nats per bit: bits/char = loss / LN2


def perplexity(loss: float) -> float:
    """exp(loss), capped where exp would overflow."""
    return math.exp(min(loss, 700.0))


CHUNK = 128  # rows per fp32 chunk (3.4 MB at V = 6.6k); 32-512 measured within 10%


def _logsumexp_fp32(c_RV: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(row))) in fp32, in place on one fp32 copy of the chunk."""
    x = c_RV.float()
    m_R = x.amax(-1, keepdim=True)
    return x.sub_(m_R).exp_().sum(-1).log_().add_(m_R.squeeze(-1))


class _HalfCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int):
        keep_N = target_N != ignore_index
        safe_N = torch.where(keep_N, target_N, 0)
        lse_N = torch.cat([_logsumexp_fp32(c) for c in logits_NV.split(CHUNK)])
        picked_N = logits_NV.gather(1, safe_N[:, None]).squeeze(1).float()
        nll_N = (lse_N - picked_N) * keep_N
        ctx.save_for_backward(logits_NV, lse_N, safe_N, keep_N)
        return nll_N

    @staticmethod
    def backward(ctx, grad_N: torch.Tensor):
        logits_NV, lse_N, safe_N, keep_N = ctx.saved_tensors
        g_N = grad_N * keep_N
        grad_NV = torch.empty_like(logits_NV)
        for lo in range(0, len(logits_NV), CHUNK):
            hi = lo + CHUNK
            p = logits_NV[lo:hi].float().sub_(lse_N[lo:hi, None]).exp_().mul_(g_N[lo:hi, None])
            # The target's term (p - 1) g in fp32 BEFORE the cast: for a well-predicted
            # character p is close to 1, and p g - g taken in bf16 is the difference of two
            # nearly equal rounded numbers (35% median error at p = 0.997; nothing left at
            # p = 0.99995). In fp32 the only rounding is the final cast.
            p.scatter_add_(1, safe_N[lo:hi, None], -g_N[lo:hi, None])
            grad_NV[lo:hi] = p  # (softmax - onehot) * grad, cast to the logits' dtype
        return grad_NV, None, None


def cross_entropy(
    logits_NV: torch.Tensor,
    target_N: torch.Tensor,
    ignore_index: int = IGNORE,
    reduction: str = "mean",
) -> torch.Tensor:
    """F.cross_entropy semantics (mean over non-ignored targets, or sum)."""
    if logits_NV.dtype == torch.float32 or logits_NV.dtype == torch.float64:
        return F.cross_entropy(logits_NV, target_N, ignore_index=ignore_index, reduction=reduction)
    nll_N = _HalfCrossEntropy.apply(logits_NV, target_N, ignore_index)
    if reduction == "sum":
        return nll_N.sum()
    if reduction == "none":
        return nll_N
    return nll_N.sum() / (target_N != ignore_index).sum().clamp(min=1)
