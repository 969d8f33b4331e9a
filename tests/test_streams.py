"""pipeline.data.streams against the chapter's reference iterators (d2l-zh, PyTorch edition), and
the per-rank layout: the union of the rank batches is exactly the single-process batch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from bench.seed_reference import data_iter_consecutive, data_iter_random
from pipeline.data.common import DataError
from pipeline.data.streams import IGNORE, ConsecutiveStreams, EvalStreams, RandomWindows

CPU = torch.device("cpu")


# ---------------------------------------------------------------- helpers


def corpus(n: int, vocab: int = 37, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


def batches(streams, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [streams.batch(epoch, i) for i in range(streams.epoch_size)]


def assert_same_batches(ours, ref) -> None:
    assert len(ours) == len(ref)
    for (x, y), (rx, ry) in zip(ours, ref):
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert torch.equal(x, rx.long()) and torch.equal(y, ry.long())


# Lengths where the last minibatch is full, where the tail is cut, and odd sizes.
SHAPES = [(1000, 4, 5), (1003, 4, 7), (777, 6, 9), (96, 2, 5), (353, 3, 35)]


# ---------------------------------------------------------------- equal to the chapter


@pytest.mark.parametrize("n,B,T", SHAPES)
def test_consecutive_equals_chapter(n, B, T):
    ids = corpus(n)
    ours = ConsecutiveStreams(ids, B, T, rank=0, world_size=1, device=CPU)
    ref = list(data_iter_consecutive(ids.tolist(), B, T))
    batch_len = n // B
    assert ours.epoch_size == (batch_len - 1) // T == len(ref) > 0
    for epoch in (0, 3):  # consecutive batches do not depend on the epoch
        assert_same_batches(batches(ours, epoch), ref)


@pytest.mark.parametrize("n,B,T", SHAPES)
def test_random_equals_chapter_with_our_permutation(n, B, T):
    ids = corpus(n)
    ours = RandomWindows(ids, B, T, rank=0, world_size=1, device=CPU, seed=5)
    assert ours.num_examples == (n - 1) // T
    assert ours.epoch_size == ((n - 1) // T) // B
    for epoch in (0, 1, 2):
        perm = ours.permutation(epoch)
        assert sorted(perm.tolist()) == list(range(ours.num_examples))  # a permutation
        ref = list(data_iter_random(ids.tolist(), B, T, example_indices=perm.tolist()))
        assert len(ref) == ours.epoch_size
        assert_same_batches(batches(ours, epoch), ref)


def test_random_epochs_differ_and_targets_are_shifted_inputs():
    ids = np.arange(2000, dtype=np.int64)  # an id is its position
    s = RandomWindows(ids, 4, 10, rank=0, world_size=1, device=CPU, seed=0)
    assert not torch.equal(s.permutation(0), s.permutation(1))
    x, y = s.batch(0, 0)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    assert (x[:, 0] % 10 == 0).all()  # windows start at multiples of num_steps


# ---------------------------------------------------------------- ranks


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("sampling", ["consecutive", "random"])
def test_rank_batches_union_is_world1_batch(world_size, sampling):
    ids, B, T = corpus(1500), 8, 6

    def make(rank, w):
        if sampling == "consecutive":
            return ConsecutiveStreams(ids, B, T, rank, w, CPU)
        return RandomWindows(ids, B, T, rank, w, CPU, seed=11)

    single = make(0, 1)
    ranks = [make(r, world_size) for r in range(world_size)]
    b = B // world_size
    for s in ranks:
        assert s.b == b and s.epoch_size == single.epoch_size
    for epoch in (0, 1):
        for i in range(single.epoch_size):
            x1, y1 = single.batch(epoch, i)
            for r, s in enumerate(ranks):  # rank r owns rows [r*b, (r+1)*b)
                x, y = s.batch(epoch, i)
                assert torch.equal(x, x1[r * b : (r + 1) * b])
                assert torch.equal(y, y1[r * b : (r + 1) * b])


def test_permutation_depends_only_on_seed_and_epoch():
    ids = corpus(3000)
    a = RandomWindows(ids, 4, 7, rank=0, world_size=1, device=CPU, seed=3)
    b = RandomWindows(ids, 8, 7, rank=1, world_size=2, device=CPU, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    random.seed(123)
    for epoch in (0, 1, 5):
        p = a.permutation(epoch).clone()
        torch.manual_seed(epoch + 999)
        assert torch.equal(p, b.permutation(epoch))
        assert torch.equal(p, a.permutation(epoch))
    other = RandomWindows(ids, 4, 7, rank=0, world_size=1, device=CPU, seed=4)
    assert not torch.equal(a.permutation(0), other.permutation(0))
    assert not torch.equal(a.permutation(0), a.permutation(1))


@pytest.mark.parametrize("sampling", ["consecutive", "random"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_memmap_gives_same_batches(tmp_path, sampling, world_size):
    ids = corpus(1234)
    path = tmp_path / "ids.bin"
    ids.tofile(path)
    mm = np.memmap(path, dtype=ids.dtype, mode="r", shape=ids.shape)
    for rank in range(world_size):
        if sampling == "consecutive":
            a = ConsecutiveStreams(ids, 6, 9, rank, world_size, CPU)
            b = ConsecutiveStreams(mm, 6, 9, rank, world_size, CPU)
        else:
            a = RandomWindows(ids, 6, 9, rank, world_size, CPU, seed=2)
            b = RandomWindows(mm, 6, 9, rank, world_size, CPU, seed=2)
        assert b.lazy and not a.lazy
        assert a.epoch_size == b.epoch_size
        for epoch in (0, 1):
            assert_same_batches(batches(b, epoch), batches(a, epoch))


# ---------------------------------------------------------------- evaluation streams


@pytest.mark.parametrize(
    "n,batch_size,T", [(101, 4, 7), (50, 16, 5), (9, 16, 3), (1000, 5, 35), (2, 4, 4)]
)
def test_eval_streams_cover_every_target_once(n, batch_size, T):
    ids = np.arange(n, dtype=np.int64) + 1000  # distinct ids: a target names its position
    for world_size in (1, 2):
        seen, width = [], None
        for rank in range(world_size):
            s = EvalStreams(ids, batch_size, T, rank, world_size, CPU)
            xs, ys = zip(*list(s))
            assert all(x.shape[1] <= T for x in xs)
            x, y = torch.cat(xs, 1), torch.cat(ys, 1)
            assert width is None or x.shape[1] == width  # same number of chunks on each rank
            width = x.shape[1]
            valid = y != IGNORE
            assert torch.equal(y[valid], x[valid] + 1)  # every target follows its input
            for row in range(y.shape[0]):  # padding only at the end of a row
                k = int(valid[row].sum())
                assert valid[row, :k].all()
                seen.extend(y[row, :k].tolist())
        assert seen == ids[1:].tolist(), f"world size {world_size}"


# ---------------------------------------------------------------- errors


def test_batch_not_divisible_by_world_size():
    for cls in (ConsecutiveStreams, RandomWindows):
        kw = {"seed": 0} if cls is RandomWindows else {}
        with pytest.raises(DataError, match=r"batch_size=6 is not divisible by the world size 4"):
            cls(corpus(1000), 6, 5, 0, 4, CPU, **kw)


def test_more_ranks_than_streams():
    with pytest.raises(DataError, match=r"world size 8 is larger than train.batch_size=4"):
        ConsecutiveStreams(corpus(1000), 4, 5, 0, 8, CPU)
    with pytest.raises(DataError, match=r"world size 8 is larger"):
        RandomWindows(corpus(1000), 4, 5, 0, 8, CPU, seed=0)


def test_corpus_too_short():
    # consecutive needs batch_len - 1 >= T, i.e. B * (T + 1) characters
    ConsecutiveStreams(corpus(4 * 6), 4, 5, 0, 1, CPU)
    with pytest.raises(DataError, match=r"has 23 characters.*needs at least 24"):
        ConsecutiveStreams(corpus(23), 4, 5, 0, 1, CPU)
    # random needs (n - 1) // T >= B, i.e. B * T + 1 characters
    RandomWindows(corpus(21), 4, 5, 0, 1, CPU, seed=0)
    with pytest.raises(DataError, match=r"has 20 characters.*needs at least 21"):
        RandomWindows(corpus(20), 4, 5, 0, 1, CPU, seed=0)
    with pytest.raises(DataError, match=r"evaluation split has 1 characters"):
        EvalStreams(corpus(1), 4, 5, 0, 1, CPU)
