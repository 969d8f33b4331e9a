"""train.amp=auto measures: the fastest candidate (never one more than 5% slower than the
fastest tried), never bf16 where the CPU emulates it, the same choice every time for one
device, shape and batch (kept in the cache folder), rank 0's choice on every rank, the
checkpoint's precision on resume, and a probe that leaves the run as it would have been."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY, free_port, load_ckpt

from pipeline import config
from pipeline.training import autoamp
from pipeline.training import trainer as train_mod
from pipeline.training.autoamp import candidates, pick
from pipeline.training.precision import Amp

MODEL = ["model.kind=gru", "model.dropout=0.3", "train.optimizer=adam", "train.lr=0.01"]


def cfg_for(tmp_path, name: str, *extra: str) -> config.Config:
    """On the CPU on any machine: its candidates, its bitwise promise (tests/test_gpu.py
    trains with amp=auto on CUDA)."""
    args = [*TINY, *MODEL, "train.threads=1", "train.max_steps=6", "train.device=cpu"]
    args.append(f"run.dir={tmp_path / name}")
    return config.load(None, [*args, *extra])


def head(run_dir) -> list[str]:
    return (Path(run_dir) / "config.yaml").read_text(encoding="utf-8").splitlines()[:2]


# ---------------------------------------------------------------- the choice


@pytest.mark.parametrize(
    "rates,expected",
    [
        ({"off": 100.0, "bf16": 104.0}, "off"),  # within 5%: the exact precision
        ({"off": 100.0, "bf16": 106.0}, "bf16"),
        ({"off": 50.0, "bf16": 100.0, "fp16": 104.0}, "bf16"),  # no loss scale, within 5%
        ({"off": 50.0, "bf16": 90.0, "fp16": 100.0}, "fp16"),
        ({"off": 267904.0, "bf16": 205097.0, "fp16": 204871.0}, "off"),  # rnn_scratch, H200
    ],
)
def test_pick_prefers_fp32_then_bf16_among_the_near_fastest(rates, expected):
    assert pick(rates) == expected


def test_pick_is_never_more_than_5_percent_slower_than_the_fastest():
    rng = random.Random(0)
    for _ in range(2000):
        modes = rng.sample(["off", "bf16", "fp16"], rng.randint(1, 3))
        rates = {m: rng.uniform(1.0, 2.0) for m in modes}
        assert rates[pick(rates)] >= 0.95 * max(rates.values()), rates


@pytest.mark.parametrize("native", ["0", "1"])
def test_the_cpu_tries_bf16_only_where_it_is_native(monkeypatch, native):
    monkeypatch.setenv("PIPELINE_NATIVE_BF16", native)
    expected = ["off", "bf16"] if native == "1" else ["off"]
    assert candidates(torch.device("cpu")) == expected


def test_without_native_bf16_nothing_is_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_NATIVE_BF16", "0")
    monkeypatch.setattr(autoamp, "measure", lambda *a: pytest.fail("measured"))
    cfg = cfg_for(tmp_path, "run", "train.amp=auto")
    train_mod.run(cfg)
    assert load_ckpt(cfg.run.dir)["precision"] == "off"
    assert head(cfg.run.dir)[1] == "# off (train.amp=auto: the only candidate on this device)"


def test_a_candidate_that_cannot_run_here_is_not_chosen(tmp_path, monkeypatch):
    """As oneDNN's LSTM in bf16 on a CPU without AVX-512: the error's first line is kept,
    the others are measured and one of them chosen."""
    monkeypatch.setenv("PIPELINE_NATIVE_BF16", "1")

    class NoBf16(Amp):
        def autocast(self):
            if self.mode == "bf16":
                raise RuntimeError("could not create a primitive descriptor\nmore")
            return super().autocast()

    monkeypatch.setattr(autoamp, "Amp", NoBf16)
    cfg = cfg_for(tmp_path, "run", "train.amp=auto")
    train_mod.run(cfg)
    assert load_ckpt(cfg.run.dir)["precision"] == "off"
    line = head(cfg.run.dir)[1]
    assert "bf16 failed (could not create a primitive descriptor)" in line and "fp32 " in line


def test_a_far_slower_candidate_is_timed_one_round_only(tmp_path, monkeypatch):
    """Emulated bf16 (here: a sleep per bf16 step) costs WARMUP + one round of steps, not
    WARMUP + ROUNDS rounds: under half the best rate it cannot come within 5%."""
    import time

    monkeypatch.setenv("PIPELINE_NATIVE_BF16", "1")
    steps = {"off": 0, "bf16": 0}

    class Slow(Amp):
        def autocast(self):
            steps[self.mode] += 1
            if self.mode == "bf16":
                time.sleep(0.2)
            return super().autocast()

    monkeypatch.setattr(autoamp, "Amp", Slow)
    cfg = cfg_for(tmp_path, "run", "train.amp=auto")
    train_mod.run(cfg)
    assert load_ckpt(cfg.run.dir)["precision"] == "off"
    w, r, s = autoamp.WARMUP, autoamp.ROUNDS, autoamp.STEPS
    assert steps["bf16"] == w + s  # warm-up and one round
    assert steps["off"] >= w + r * s  # every round (and the run's own steps after)


# ---------------------------------------------------------------- the probe leaves the run alone


@pytest.mark.parametrize("chosen", ["off", "bf16"])
@pytest.mark.parametrize("sampling", ["consecutive", "random"])
def test_the_probe_does_not_change_the_run(tmp_path, monkeypatch, chosen, sampling):
    """amp=auto (measuring fp32 and bf16 on copies) ends bit-identical to the same run with
    the chosen precision set explicitly: dropout masks, optimizer state, RNG all untouched."""
    monkeypatch.setenv("PIPELINE_NATIVE_BF16", "1")  # two candidates: a real measurement
    monkeypatch.setattr(autoamp, "pick", lambda rates: chosen)
    measured = []
    real = autoamp.measure
    monkeypatch.setattr(autoamp, "measure", lambda *a: measured.append(1) or real(*a))
    extra = [f"train.sampling={sampling}"]
    auto = cfg_for(tmp_path, "auto", "train.amp=auto", *extra)
    train_mod.run(auto)
    assert measured == [1] and "measured in" in head(auto.run.dir)[1]
    explicit = cfg_for(tmp_path, "explicit", f"train.amp={chosen}", *extra)
    train_mod.run(explicit)
    a, b = load_ckpt(auto.run.dir), load_ckpt(explicit.run.dir)
    assert a["precision"] == b["precision"] == chosen
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for key, value in a["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, b["optimizer"]["state"][key][name]), (key, name)


# ---------------------------------------------------------------- kept, and kept on resume


def test_the_choice_is_kept_per_device_shape_and_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_NATIVE_BF16", "1")
    calls = []
    real = autoamp.measure
    monkeypatch.setattr(autoamp, "measure", lambda *a: calls.append(1) or real(*a))
    first = cfg_for(tmp_path, "first", "train.amp=auto")
    train_mod.run(first)
    kept = list((tmp_path / "cache" / "amp_auto").glob("*.json"))
    assert calls == [1] and len(kept) == 1
    record = json.loads(kept[0].read_text())
    assert record["key"]["batch"] == [4, 8] and set(record["tokens_per_s"]) == {"off", "bf16"}
    assert record["key"]["model"]["kind"] == "gru" and record["key"]["device"]
    # the kept choice wins even where a new measurement would choose otherwise
    record["mode"] = "bf16" if record["mode"] == "off" else "off"
    kept[0].write_text(json.dumps(record))
    again = cfg_for(tmp_path, "again", "train.amp=auto")
    train_mod.run(again)
    assert calls == [1] and load_ckpt(again.run.dir)["precision"] == record["mode"]
    assert head(again.run.dir)[1].endswith(f"tokens/s, kept; {kept[0]})")
    other = cfg_for(tmp_path, "other", "train.amp=auto", "train.batch_size=8")
    train_mod.run(other)  # another batch: measured again, kept beside the first
    assert calls == [1, 1] and len(list(kept[0].parent.glob("*.json"))) == 2


def test_a_resumed_run_keeps_its_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_NATIVE_BF16", "1")
    monkeypatch.setattr(autoamp, "pick", lambda rates: "bf16")
    cfg = cfg_for(tmp_path, "run", "train.amp=auto")
    train_mod.run(cfg)
    assert load_ckpt(cfg.run.dir)["precision"] == "bf16"
    for kept in (tmp_path / "cache" / "amp_auto").glob("*.json"):
        kept.unlink()  # no kept choice: a fresh start would measure
    monkeypatch.setattr(autoamp, "measure", lambda *a: pytest.fail("measured on resume"))
    longer = cfg_for(tmp_path, "run", "train.amp=auto", "train.max_steps=10")
    train_mod.run(longer)
    final = load_ckpt(cfg.run.dir)
    assert final["step"] == 10 and final["precision"] == "bf16"
    assert "kept from the checkpoint" in head(cfg.run.dir)[1]


# ---------------------------------------------------------------- rank 0 decides for all


def _rank_body(rank: int, world: int, port: int, tmp: str, queue) -> None:
    import torch.distributed as tdist

    from pipeline.data.streams import make_train_streams
    from pipeline.dist import DistContext, shutdown

    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        # each rank would choose otherwise: only rank 0's choice may count
        autoamp.candidates = lambda device: ["off", "bf16"]
        autoamp.pick = lambda rates, _r=rank: ["bf16", "off"][_r]
        cfg = config.load(None, [*TINY, *MODEL, "train.amp=auto", f"data.cache_dir={tmp}/c{rank}"])
        ids = torch.randint(20, (400,)).numpy()
        streams = make_train_streams(ids, "consecutive", 4, 8, rank, world, torch.device("cpu"), 0)
        torch.manual_seed(0)
        model = train_mod.build_model(cfg.model, 20)
        ctx = DistContext(rank=rank, world_size=world)
        amp: Amp = autoamp.for_run(cfg, ctx, model, streams, 20, None)
        queue.put((rank, amp.mode, amp.choice.source))
    finally:
        shutdown()


@pytest.mark.slow
def test_every_rank_uses_rank_0s_choice(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        partial(_rank_body),
        args=(2, free_port(), str(tmp_path), queue),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    results = sorted(queue.get() for _ in range(2))
    assert results == [(0, "bf16", "measured"), (1, "bf16", "measured")]
    assert (
        not (tmp_path / "c1").exists() and (tmp_path / "c0").exists()
    )  # rank 1 neither measured nor kept anything
