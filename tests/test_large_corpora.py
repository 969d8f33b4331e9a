"""Corpora far larger than memory: random sampling's window order needs memory for a
minibatch, not for a permutation; evaluation reads one chunk at a time and can be bounded
(eval.max_chars); an older random-sampling checkpoint stopped mid-epoch is refused clearly."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import TINY, load_ckpt, metrics

from pipeline.__main__ import main
from pipeline.data.shuffle import Order, order, round_keys
from pipeline.data.streams import EvalStreams, RandomWindows

CPU = torch.device("cpu")


def huge_ids(tmp_path, n: int) -> np.memmap:
    """n uint16 ids in a sparse file: no disk and no memory until a page is read."""
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.truncate(n * 2)
    return np.memmap(path, dtype=np.uint16, mode="r", shape=(n,))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 1000, 65537, 100_003])
def test_the_order_is_a_permutation_of_any_size(n):
    got = Order(n, seed=7, epoch=3)[0:n]
    assert np.array_equal(np.sort(got), np.arange(n))
    assert np.array_equal(got, order(n, round_keys(7, 3), np.arange(n)))  # blocks = direct


def test_the_order_is_a_pure_function_of_seed_and_epoch_and_looks_random():
    n = 50_000
    a, b = Order(n, 1, 0)[0:n], Order(n, 1, 0)[0:n]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, Order(n, 1, 1)[0:n]) and not np.array_equal(a, Order(n, 2, 0)[0:n])
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.02  # no trace of the identity
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.02  # neighbours unrelated
    first = a[: n // 10]  # an early slice is spread over the whole range
    assert first.min() < n * 0.01 and first.max() > n * 0.99


def test_random_windows_of_ten_billion_characters_use_memory_for_a_minibatch(tmp_path):
    """1e10 ids (2.9e8 windows): a permutation would be 2.3 GB of int64; the minibatches of
    three epochs, at their start, middle and end, take a few MB of host memory."""
    ids = huge_ids(tmp_path, 10**10)
    tracemalloc.start()
    try:
        streams = RandomWindows(ids, 64, 35, rank=1, world_size=2, device=CPU, seed=5)
        for epoch in range(3):
            for i in (0, 1, streams.epoch_size // 2, streams.epoch_size - 1):
                x, y = streams.batch(epoch, i)
                assert x.shape == (32, 35) and torch.equal(x[:, 1:], y[:, :-1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert streams.num_examples == (10**10 - 1) // 35
    assert peak < 8 * 2**20, peak


def test_evaluation_holds_one_chunk_of_a_huge_split(tmp_path):
    ids = huge_ids(tmp_path, 10**9)
    tracemalloc.start()
    try:
        streams = EvalStreams(ids, 16, 35, rank=0, world_size=2, device=CPU)
        chunks = iter(streams)
        for _ in range(3):
            x, y = next(chunks)
            assert x.shape == y.shape == (8, 35)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak


def test_chunks_equal_the_split_laid_out_in_rows():
    """The rows as before (every target once, padding IGNORE), built chunk by chunk."""
    ids = np.arange(1, 104, dtype=np.uint16)  # 103 ids, 102 targets, 5 rows of 21 or 20
    for rank in (0, 1):
        s = EvalStreams(ids, 5, 8, rank=rank, world_size=2, device=CPU)
        x = torch.cat([c[0] for c in s], dim=1)
        y = torch.cat([c[1] for c in s], dim=1)
        assert x.shape == (3, 21)
        rows = [(0, 21), (21, 21), (42, 20), (62, 20), (82, 20), (102, 0)][rank * 3 : rank * 3 + 3]
        for r, (start, length) in enumerate(rows):
            assert x[r, :length].tolist() == list(range(start + 1, start + length + 1))
            assert y[r, :length].tolist() == list(range(start + 2, start + length + 2))
            assert (y[r, length:] == -100).all()


BASE = [*TINY, "data.valid_fraction=0.2", "model.kind=gru", "train.threads=1"]


def test_eval_max_chars_bounds_training_and_the_eval_command(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # train.device=cpu: training's own evaluation is compared with the eval command's (on
    # the CPU) to 1e-6; on CUDA the two reduce in other orders (seen: rel 1.4e-6 on an H200)
    args = [*BASE, "train.device=cpu", "train.max_steps=4", "eval.max_chars=301"]
    assert main(["train", *args, f"run.dir={run_dir}"]) == 0
    val = metrics(run_dir, "val/loss")[-1]
    capsys.readouterr()
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    assert main(["eval", "--checkpoint", ckpt, "--max-chars", "301", "--device", "cpu"]) == 0
    bounded = json.loads(capsys.readouterr().out)
    assert bounded["tokens"] == 300 and bounded["loss"] == pytest.approx(val["val/loss"], rel=1e-6)
    assert main(["eval", "--checkpoint", ckpt, "--device", "cpu"]) == 0
    whole = json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit) as bad:  # argparse: exit 2, naming the flag
        main(["eval", "--checkpoint", ckpt, "--max-chars", "-1"])
    assert bad.value.code == 2 and "--max-chars" in capsys.readouterr().err
    assert whole["tokens"] == 800 - 1 and not math.isclose(whole["loss"], bounded["loss"])


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_an_older_random_checkpoint(tmp_path, capsys, where):
    """Saved before the window order changed (format 2): inside an epoch it is refused with
    exit 2, naming why; at an epoch's end it goes on (the next epoch has no old order)."""
    run_dir = tmp_path / "run"
    args = [*BASE, "train.sampling=random", f"run.dir={run_dir}"]
    steps = {"mid_epoch": 3, "epoch_end": None}[where]
    extra = [f"train.max_steps={steps}"] if steps else ["train.epochs=1"]
    assert main(["train", *args, *extra]) == 0
    saved = load_ckpt(run_dir)
    assert (saved["batch_in_epoch"] > 0) == (where == "mid_epoch") and saved["format"] == 3
    saved["format"] = 2
    old = tmp_path / "old.pt"
    torch.save(saved, old)
    capsys.readouterr()
    code = main(
        ["train", *args, "train.epochs=2", f"train.resume={old}", f"run.dir={tmp_path / 'b'}"]
    )
    err = capsys.readouterr().err
    if where == "mid_epoch":
        assert code == 2 and "format 2" in err and "window order changed" in err and str(old) in err
    else:
        assert code == 0 and load_ckpt(tmp_path / "b")["epoch"] == 2
