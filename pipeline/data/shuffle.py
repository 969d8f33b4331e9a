"""A seeded bijection on [0, n): the order of random windows without a permutation in memory.

`order(n, key, i)` is where position i of the shuffled order points, for a tensor of
positions i, in O(len(i)) memory and time: a balanced Feistel network on [0, 4^h) (4^h >= n,
the smallest such h), six rounds, walked in cycles until the value falls below n (a
permutation of [0, 4^h) restricted this way is a permutation of [0, n); 4^h < 4n keeps the
walk short). The key comes from (seed, epoch) alone, so every rank, every world size and a
resume compute the same order. Integer arithmetic only, with no product above 2^62: the
same values on any machine.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
M31 = (1 << 31) - 1
M64 = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def round_keys(seed: int, epoch: int) -> list[int]:
    base = _splitmix((seed & M64) * 0x100000001B3 + epoch)
    return [_splitmix(base + j) & M31 for j in range(ROUNDS)]


def _half_bits(n: int) -> int:
    h = 1
    while 4**h < n:
        h += 1
    return h


def _f(r: np.ndarray, key: int, mask: int) -> np.ndarray:
    x = (r + key) & M31
    x = (x * 0x2545F491) & M31
    x = x ^ (x >> 15)
    x = (x * 0x4F6CDD1D) & M31
    x = x ^ (x >> 13)
    return x & mask


def _encrypt(x: np.ndarray, keys: list[int], h: int) -> np.ndarray:
    mask = (1 << h) - 1
    left, right = x >> h, x & mask
    for key in keys:
        left, right = right, left ^ _f(right, key, mask)
    return (left << h) | right


def order(n: int, keys: list[int], i: np.ndarray) -> np.ndarray:
    """The shuffled order at positions `i` (each in [0, n)): an int64 value in [0, n) each,
    distinct for distinct positions. On the host (numpy): a few microseconds a minibatch."""
    h = _half_bits(n)
    y = _encrypt(np.asarray(i, dtype=np.int64), keys, h)
    out = y >= n
    while out.any():
        y = np.where(out, _encrypt(y, keys, h), y)
        out = y >= n
    return y


class Order:
    """The shuffled order of one epoch, computed BLOCK positions at a time and cached one
    block at a time: a fixed ~1 MB whatever n, a few microseconds a minibatch."""

    BLOCK = 1 << 16

    def __init__(self, n: int, seed: int, epoch: int):
        self.n, self.epoch, self.keys = n, epoch, round_keys(seed, epoch)
        self._block = (-1, np.empty(0, dtype=np.int64))

    def __getitem__(self, s: slice) -> np.ndarray:
        """order[lo:hi] (lo < hi <= n)."""
        lo, hi = s.start, s.stop
        parts = []
        while lo < hi:
            j = lo // self.BLOCK
            if self._block[0] != j:
                start = j * self.BLOCK
                stop = min(start + self.BLOCK, self.n)
                self._block = (j, order(self.n, self.keys, np.arange(start, stop)))
            off = lo - j * self.BLOCK
            take = min(hi - lo, self.BLOCK - off)
            parts.append(self._block[1][off : off + take])
            lo += take
        return np.concatenate(parts) if len(parts) != 1 else parts[0]
