"""Random masks as pure functions of (seed, step, site, GLOBAL stream, position).

No generator state exists: mask element n of a (seed, step, site) is SplitMix64's output
fmix64(key + n * GAMMA), computed with int64 tensor ops (products wrap modulo 2^64 on CPU
and CUDA alike). Hence a stream gets the same mask whichever rank holds it and whatever
the world size, a resume needs no saved RNG, CPU and CUDA draw the same masks, and the ops
need no host sync (a CUDA graph can capture them once `step` is a device tensor).

Counters: a standard dropout mask over (T, B, D) numbers element (t, stream g, unit j) as
n = (g * T + t) * D + j, with g the stream's GLOBAL index (rank * b + row); a locked
(variational) mask, shared by all time steps, as n = g * D + j; a weight-drop mask over a
(R, C) matrix as n = r * C + c, the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (odd; 2^64 / golden ratio)
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
BITS = 24  # resolution of the keep probability: 2^-24
SEED_SALT, WEIGHT_SITE = 0x5EED, 1 << 20  # weight-drop sites: WEIGHT_SITE + layer


def _i64(v: int) -> int:
    """An integer mod 2^64 as the signed int64 torch stores."""
    v &= M64
    return v - (1 << 64) if v >> 63 else v


def fmix64(x: int) -> int:
    """SplitMix64's finalizer on a Python int (the reference the tensor version matches)."""
    x &= M64
    x ^= x >> 30
    x = (x * MIX1) & M64
    x ^= x >> 27
    x = (x * MIX2) & M64
    return x ^ (x >> 31)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: mask the sign copies off)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def fmix64_(x: torch.Tensor) -> torch.Tensor:
    """fmix64 elementwise, in place on an int64 tensor."""
    x ^= _shr(x, 30)
    x *= _i64(MIX1)
    x ^= _shr(x, 27)
    x *= _i64(MIX2)
    x ^= _shr(x, 31)
    return x


def site_key(seed: int, step: int, site: int) -> int:
    """The key of one (seed, step, site): three chained mixes, so nearby seeds, steps and
    sites give unrelated keys."""
    k = fmix64(seed * GAMMA + SEED_SALT)
    k = fmix64(k + step * GAMMA)
    return fmix64(k + site * GAMMA)


def keep_from_bits(x: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """Inverted-dropout mask from mixed bits: 1 / (1 - p) with probability 1 - p, else 0."""
    threshold = round((1.0 - p) * (1 << BITS))
    keep = (x & ((1 << BITS) - 1)) < threshold
    return keep.to(dtype) * (1.0 / (1.0 - p))


@dataclass(frozen=True)
class Noise:
    """Where a training step's masks come from: the run's seed, the GLOBAL step, and the
    global index of this rank's first stream (rank * batch_size / world_size)."""

    seed: int
    step: int
    first_stream: int = 0

    def dropout_mask(
        self, site: int, p: float, shape_TBD: tuple, locked: bool, device, dtype
    ) -> torch.Tensor:
        """(T, B, D) mask, or (1, B, D) shared across time when `locked`."""
        T, B, D = shape_TBD
        per_stream = D if locked else T * D
        key = site_key(self.seed, self.step, site)
        g_B = torch.arange(self.first_stream, self.first_stream + B, device=device)
        base_1B1 = (g_B * _i64(per_stream * GAMMA) + _i64(key)).view(1, B, 1)
        if locked:
            inner_11D = torch.arange(D, device=device).view(1, 1, D)
        else:
            t_T11 = torch.arange(T, device=device).view(T, 1, 1)
            inner_11D = t_T11 * D + torch.arange(D, device=device).view(1, 1, D)
        x = inner_11D * _i64(GAMMA) + base_1B1  # key + n * GAMMA, n the global counter
        return keep_from_bits(fmix64_(x), p, dtype)

    def weight_mask(self, layer: int, p: float, shape: tuple, device, dtype) -> torch.Tensor:
        """DropConnect mask of a weight matrix: one per step for the whole global batch."""
        key = site_key(self.seed, self.step, WEIGHT_SITE + layer)
        n = torch.arange(shape[0] * shape[1], device=device).view(shape)
        return keep_from_bits(fmix64_(n * _i64(GAMMA) + _i64(key)), p, dtype)
