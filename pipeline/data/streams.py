"""Minibatches as pure functions of (ids, seed, epoch, batch index, rank, world size).

Consecutive sampling (the chapter's `data_iter_consecutive`): the first
`batch_size * batch_len` ids are laid out as `batch_size` rows (streams) of `batch_len`
consecutive characters; minibatch i is columns [i*T, i*T+T) of every row, targets shifted by
one, `(batch_len - 1) // T` minibatches an epoch. Rank r owns rows [r*b, (r+1)*b), b =
batch_size / world_size: a contiguous shard of the corpus, so it reads only its own slice of
a memory-mapped file and carries its own hidden state from one minibatch to the next.

Random sampling (`data_iter_random`): window j is ids[j*T : j*T+T] (target shifted by one),
`(n - 1) // T` windows, shuffled each epoch by a bijection keyed by (seed, epoch) alone
(pipeline.data.shuffle: computed for the positions a minibatch needs, never a whole permutation in
memory), so every rank gets the same order; global minibatch i is windows
order[i*B : (i+1)*B] and rank r takes its slice [r*b, (r+1)*b) of it. `(n - 1) // T // B`
minibatches an epoch.

Hence with W ranks, the union of the rank batches is exactly the single-process batch.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.common import IGNORE, DataError
from pipeline.data.shuffle import Order


def local_batch(batch_size: int, world_size: int) -> int:
    if world_size > batch_size:
        raise DataError(
            f"world size {world_size} is larger than train.batch_size={batch_size}: "
            f"every rank needs at least one stream"
        )
    if batch_size % world_size:
        raise DataError(
            f"train.batch_size={batch_size} is not divisible by the world size "
            f"{world_size}: each rank needs batch_size / world_size streams"
        )
    return batch_size // world_size


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class RankBatches:
    """This rank's share of every global minibatch: b = batch_size / world_size streams of
    num_steps characters. Small in-memory corpora go to the device once; memory-mapped ones
    are sliced per batch, so that resident memory does not grow with the corpus."""

    def __init__(
        self,
        ids: np.ndarray,
        batch_size: int,
        num_steps: int,
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int = 0,
    ):
        self.b = local_batch(batch_size, world_size)
        self.B, self.T, self.rank = batch_size, num_steps, rank
        self.seed, self.device = seed, device
        self.lazy = isinstance(ids, np.memmap)
        self.epoch_size = self._layout(ids)
        if self.epoch_size < 1:
            raise DataError(
                f"training split has {len(ids)} characters; {self.sampling} sampling with "
                f"batch_size={batch_size} and num_steps={num_steps} needs at least "
                f"{self._need()}"
            )

    def _on_device(self, a: np.ndarray):
        return a if self.lazy else _to_device(a, self.device)


class ConsecutiveStreams(RankBatches):
    sampling = "consecutive"

    def _layout(self, ids: np.ndarray) -> int:
        self.batch_len = len(ids) // self.B
        start = self.rank * self.b * self.batch_len
        shard = ids[start : start + self.b * self.batch_len].reshape(self.b, self.batch_len)
        self.rows = self._on_device(shard)
        return (self.batch_len - 1) // self.T

    def _need(self) -> int:
        return self.B * (self.T + 1)

    def batch(self, epoch: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = i * self.T
        if self.lazy:
            xy = _to_device(self.rows[:, lo : lo + self.T + 1], self.device)
        else:
            xy = self.rows[:, lo : lo + self.T + 1]
        return xy[:, :-1], xy[:, 1:]


class RandomWindows(RankBatches):
    sampling = "random"

    def _layout(self, ids: np.ndarray) -> int:
        self.num_examples = (len(ids) - 1) // self.T
        self.ids = self._on_device(ids)
        self._order: Order | None = None
        self._offsets = torch.arange(self.T + 1, device=self.device)
        return self.num_examples // self.B

    def _need(self) -> int:
        return self.B * self.T + 1

    def order(self, epoch: int) -> Order:
        if self._order is None or self._order.epoch != epoch:
            self._order = Order(self.num_examples, self.seed, epoch)
        return self._order

    def permutation(self, epoch: int) -> torch.Tensor:
        """The whole epoch's window order (O(n) memory: for inspection; training never
        builds it)."""
        return torch.from_numpy(self.order(epoch)[0 : self.num_examples])

    def batch(self, epoch: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = i * self.B + self.rank * self.b
        starts = self.order(epoch)[lo : lo + self.b] * self.T
        if self.lazy:
            xy = _to_device(self.ids[starts[:, None] + np.arange(self.T + 1)], self.device)
        else:
            xy = self.ids[_to_device(starts, self.device)[:, None] + self._offsets]
        return xy[:, :-1], xy[:, 1:]


def make_train_streams(ids, sampling, batch_size, num_steps, rank, world_size, device, seed):
    kind = ConsecutiveStreams if sampling == "consecutive" else RandomWindows
    return kind(ids, batch_size, num_steps, rank, world_size, device, seed)


def eval_row_bounds(n_ids: int, batch_size: int) -> list[tuple[int, int]]:
    """Split the n_ids - 1 prediction targets of a split into `batch_size` consecutive rows
    whose lengths differ by at most one: every character after the first is predicted once."""
    n_targets = n_ids - 1
    base, extra = divmod(n_targets, batch_size)
    bounds, start = [], 0
    for j in range(batch_size):
        length = base + (1 if j < extra else 0)
        bounds.append((start, length))
        start += length
    return bounds


class EvalStreams:
    """A split as `batch_size` GLOBAL rows, whatever the world size, read in consecutive
    chunks of `num_steps` with the state carried. Rank r evaluates rows [r*b, (r+1)*b),
    b = ceil(rows / W); slots past the last row are padding whose targets are all IGNORE. So
    the summed loss covers each target exactly once, and the rows (hence the loss, to float
    rounding) do not depend on W. Each chunk is read from the ids (a memory-mapped file
    stays on disk) when it is evaluated: memory holds one chunk, not the split."""

    def __init__(self, ids: np.ndarray, batch_size, num_steps, rank, world_size, device):
        if len(ids) < 2:
            raise DataError(f"evaluation split has {len(ids)} characters; need at least 2")
        rows = min(batch_size, len(ids) - 1)
        self.b = -(-rows // world_size)
        bounds = eval_row_bounds(len(ids), rows)[rank * self.b : (rank + 1) * self.b]
        bounds += [(0, 0)] * (self.b - len(bounds))  # padding rows
        self.starts = np.array([start for start, _ in bounds], dtype=np.int64)[:, None]
        self.lengths = np.array([length for _, length in bounds], dtype=np.int64)[:, None]
        self.width = max(1, -(-(len(ids) - 1) // rows))
        self.ids, self.T, self.device = ids, num_steps, device

    def __iter__(self):
        for lo in range(0, self.width, self.T):
            cols = np.arange(lo, min(lo + self.T, self.width))[None, :]
            valid = cols < self.lengths
            at = np.where(valid, self.starts + cols, 0)
            x = np.where(valid, self.ids[at].astype(np.int64), 0)
            y = np.where(valid, self.ids[at + 1].astype(np.int64), IGNORE)
            yield _to_device(x, self.device), _to_device(y, self.device)


def eval_streams(ids, ecfg, train_num_steps: int, ctx, batch_size: int = 0, max_chars=None):
    """The EvalStreams of a split for this rank: eval.batch_size rows (or `batch_size`) of the
    first eval.max_chars characters (or `max_chars`; 0 = all), eval.num_steps a chunk."""
    limit = ecfg.max_chars if max_chars is None else max_chars
    if limit:
        ids = ids[:limit]
    steps = ecfg.num_steps or train_num_steps
    rows = batch_size or ecfg.batch_size
    return EvalStreams(ids, rows, steps, ctx.rank, ctx.world_size, ctx.device)
