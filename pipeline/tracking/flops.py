"""Training FLOPs per token from the model's shapes, and the model FLOPs utilisation (MFU)
against the card's dense peak: perf/flops_per_token and perf/mfu in metrics.jsonl and wandb.

Counted: the matrix products, 2 FLOPs per multiply-add, three times over for a training step
(forward; backward to the inputs and to the weights), the usual 6 x (weights used per token).
Left out: embedding lookups (gathers), elementwise work (gates, tanh, dropout, softmax).
Tied output weights cost what untied ones do (the product is the same size). An adaptive
output computes a tail cluster's softmax only for the targets in that cluster, so its cost
takes the share of targets in each cluster (measured on the training stream at start-up).
"""

from __future__ import annotations

import re

import torch
from torch import nn

# Dense peaks in TFLOP/s (no structured sparsity) by card and dtype: bf16/fp16 are the tensor
# cores with fp32 accumulation (what PyTorch's matmuls use); fp32 is the CUDA-core FP32 peak
# (PyTorch leaves TF32 off for matmuls by default). First match on torch.cuda.get_device_name.
PEAKS_TFLOPS: list[tuple[str, dict[str, float]]] = [
    # NVIDIA H200 NVL datasheet: FP32 60, BF16/FP16 1,671 with sparsity -> 835.5 dense
    (r"\bH200 NVL\b", {"fp32": 60.0, "bf16": 835.5, "fp16": 835.5}),
    # NVIDIA H200 (SXM) datasheet: FP32 67, BF16/FP16 1,979 with sparsity -> 989.5 dense
    (r"\bH200\b", {"fp32": 67.0, "bf16": 989.5, "fp16": 989.5}),
    # NVIDIA H100 datasheet, PCIe column: FP32 51, BF16/FP16 1,513 with sparsity -> 756.5
    (r"\bH100 PCIe\b", {"fp32": 51.0, "bf16": 756.5, "fp16": 756.5}),
    # NVIDIA H100 datasheet, NVL column: FP32 60, BF16/FP16 1,671 with sparsity -> 835.5
    (r"\bH100 NVL\b", {"fp32": 60.0, "bf16": 835.5, "fp16": 835.5}),
    # NVIDIA H100 datasheet, SXM column: FP32 67, BF16/FP16 1,979 with sparsity -> 989.5
    (r"\bH100\b", {"fp32": 67.0, "bf16": 989.5, "fp16": 989.5}),
    # NVIDIA A100 datasheet (SXM and PCIe alike): FP32 19.5, BF16/FP16 312 dense
    (r"\bA100\b", {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0}),
    # NVIDIA L40S datasheet: FP32 91.6, BF16/FP16 362.05 dense (733 with sparsity)
    (r"\bL40S\b", {"fp32": 91.6, "bf16": 362.05, "fp16": 362.05}),
    # NVIDIA L4 datasheet: FP32 30.3, BF16/FP16 242 with sparsity -> 121 dense
    (r"\bL4\b", {"fp32": 30.3, "bf16": 121.0, "fp16": 121.0}),
    # NVIDIA Ada Lovelace architecture whitepaper, appendix (GeForce RTX 4090): FP32 82.6,
    # FP16/BF16 tensor with FP32 accumulate 165.2 dense (330.4 with sparsity)
    (r"\bRTX 4090\b(?! D)", {"fp32": 82.6, "bf16": 165.2, "fp16": 165.2}),
]
DTYPES = {"off": "fp32", "bf16": "bf16", "fp16": "fp16"}
TAIL_SAMPLE_BATCHES = 64  # minibatches whose targets give an adaptive output's cluster shares


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The card's dense peak for the run's precision (amp mode), or None if not in the table."""
    for pattern, peaks in PEAKS_TFLOPS:
        if re.search(pattern, device_name):
            return peaks[DTYPES[precision]]
    return None


def _cell_macs(rnn: nn.ModuleList) -> int:
    """Per token, every layer: input-to-hidden and hidden-to-hidden products (all gates)."""
    return sum(cell.weight_ih_l0.numel() + cell.weight_hh_l0.numel() for cell in rnn)


def _adaptive_macs(io, tail_shares: list[float]) -> float:
    """Input projections (every id goes through every cluster's, static shapes), the head
    (frequent characters + one entry per tail cluster), and each tail's projection and
    softmax for its share of the targets."""
    d = io.dims[0]
    inputs = sum(p.numel() for p in io.proj)
    head = (io.bounds[1] + len(io.bounds) - 2) * d
    tails = 0.0
    for k, share in enumerate(tail_shares, start=1):
        size = io.bounds[k + 1] - io.bounds[k]
        tails += share * (d * io.dims[k] + size * io.dims[k])
    return inputs + head + tails


def train_flops_per_token(model: nn.Module, tail_shares: list[float] | None = None) -> float:
    """Training FLOPs per token of pipeline.model.rnn's models: 6 x multiply-adds per token.
    `tail_shares`: an adaptive output's share of targets in each tail cluster."""
    if hasattr(model, "W_hh"):  # ScratchRNN: one-hot input is a gather; W_hh, then W_hq
        macs = model.W_hh.numel() + model.W_hq.numel()
    elif hasattr(model, "io"):
        macs = _cell_macs(model.rnn) + _adaptive_macs(model.io, tail_shares or [])
    else:
        macs = _cell_macs(model.rnn) + model.dense.weight.numel()
    return 6.0 * macs


def tail_shares(model: nn.Module, streams) -> list[float] | None:
    """An adaptive output's share of training targets in each tail cluster, from up to
    TAIL_SAMPLE_BATCHES minibatches spread over the first epoch (one host read at start-up);
    None for other outputs."""
    io = getattr(model, "io", None)
    if io is None:
        return None
    n = min(TAIL_SAMPLE_BATCHES, streams.epoch_size)
    picks = sorted({i * streams.epoch_size // n for i in range(n)})
    y = torch.cat([streams.batch(0, i)[1].flatten() for i in picks]).cpu()
    bounds = io.bounds
    return [float(((y >= lo) & (y < hi)).float().mean()) for lo, hi in zip(bounds[1:], bounds[2:])]


def devices_in_use(world_size: int, local_world_size: int, gpus: int) -> int:
    """GPUs the job computes on: ranks beyond a node's GPU count share them (dist.backend=gloo)."""
    nodes = max(1, world_size // max(1, local_world_size))
    return nodes * min(local_world_size, gpus)


class Perf:
    """perf/flops_per_token at every log, and perf/mfu where the card's peak is known. On the
    CPU no peak is measured, so no MFU (a datasheet peak for a shared CPU would mislead)."""

    def __init__(self, model: nn.Module, streams, precision: str, ctx):
        self.flops_per_token = train_flops_per_token(model, tail_shares(model, streams))
        self.peak = None
        if ctx.device.type == "cuda":
            tflops = peak_tflops(torch.cuda.get_device_name(ctx.device), precision)
            gpus = devices_in_use(ctx.world_size, ctx.local_world_size, torch.cuda.device_count())
            self.peak = tflops * 1e12 * gpus if tflops else None

    def metrics(self, tokens_per_s: float) -> dict:
        out = {"perf/flops_per_token": self.flops_per_token}
        if self.peak:
            out["perf/mfu"] = tokens_per_s * self.flops_per_token / self.peak
        return out
