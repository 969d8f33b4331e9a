"""Mixed precision and clipping: fp16 scaler ordering, bf16 convergence, inf steps skipped on
every rank alike, and the reported grad norm being the norm of the all-reduced gradients."""

from __future__ import annotations

import collections
import math
from functools import partial

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import TINY, free_port, kernels_run, metrics, run_cli
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import TrainConfig
from pipeline.dist import shutdown
from pipeline.model.rnn import ScratchRNN
from pipeline.tracking.metrics import TrainAccumulator
from pipeline.training.optim import build_optimizer
from pipeline.training.precision import Amp, cpu_has_native_bf16, resolve
from pipeline.training.step import train_step

V, H, B, T = 23, 16, 4, 6
CPU = torch.device("cpu")


def tiny_setup(amp_mode: str, init_scale: float = 2.0**8, seed: int = 0):
    torch.manual_seed(seed)
    model = ScratchRNN(V, H, init_std=0.3)
    amp = Amp(amp_mode, CPU)
    opt = build_optimizer(TrainConfig(optimizer="sgd", lr=0.5), model)  # fused
    if amp_mode == "fp16":  # a modest scale: the first steps must not overflow by themselves
        amp.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return model, opt, amp


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(V, (B, T + 1), generator=g)
    return xy[:, :-1], xy[:, 1:]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def grad_norm(model) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))


# ---------------------------------------------------------------- fp16 scaler, one process


@pytest.mark.parametrize("native", ["0", "1"])
def test_auto_follows_the_native_bf16_check_and_its_override(monkeypatch, native):
    """amp=auto on the CPU: bf16 where bf16 is native, else fp32. PIPELINE_NATIVE_BF16
    answers the check (how the suite is run as the other kind of machine sees it)."""
    monkeypatch.setenv("PIPELINE_NATIVE_BF16", native)
    assert cpu_has_native_bf16() is (native == "1")
    assert resolve("auto", torch.device("cpu")) == ("bf16" if native == "1" else "off")
    assert resolve("fp16", torch.device("cpu")) == "fp16"  # an explicit mode is kept


def test_fp16_unscale_happens_before_clip():
    """Clip acts on the UNSCALED gradients: after the step the gradients have norm = clip
    (clipping before unscale_ would leave clip / scale), and the reported norm is unscaled."""
    model, opt, amp = tiny_setup("fp16", init_scale=2.0**10)
    ref, _, _ = tiny_setup("off")
    x, y = batch(1)
    _, ref_norm, _ = train_step(
        ref,
        list(ref.parameters()),
        x,
        y,
        ref.init_state(B, CPU),
        torch.optim.SGD(ref.parameters(), lr=0.0),
        Amp("off", CPU),
        0.0,
    )
    loss, norm, _ = train_step(
        model, list(model.parameters()), x, y, model.init_state(B, CPU), opt, amp, clip=1e-3
    )
    assert torch.isfinite(loss) and torch.isfinite(norm)
    assert norm.item() == pytest.approx(ref_norm.item(), rel=0.05)  # fp16 vs fp32 forward
    assert grad_norm(model) == pytest.approx(1e-3, rel=1e-3)
    assert amp.scaler.get_scale() == 2.0**10  # no overflow, no change yet


def test_fp16_overflow_skips_step_and_halves_scale():
    model, opt, amp = tiny_setup("fp16")
    params = list(model.parameters())
    x, y = batch(2)
    before = snapshot(model)
    handle = model.W_hh.register_hook(lambda g: torch.full_like(g, math.inf))
    acc = TrainAccumulator(CPU)
    loss, norm, _ = train_step(model, params, x, y, model.init_state(B, CPU), opt, amp, 1.0)
    acc.add(loss, x.numel(), norm, 1.0)
    handle.remove()
    assert not torch.isfinite(norm)
    for k, v in snapshot(model).items():
        assert torch.equal(v, before[k]), f"{k} changed on an inf step"
    assert amp.scaler.get_scale() == 2.0**7
    loss, norm, _ = train_step(model, params, x, y, model.init_state(B, CPU), opt, amp, 1.0)
    acc.add(loss, x.numel(), norm, 1.0)
    assert torch.isfinite(norm)
    assert not torch.equal(model.W_hh, before["W_hh"])  # the next good step does update
    out = acc.reduce(1)
    assert out["opt/nonfinite_steps"] == 1
    assert math.isfinite(out["opt/grad_norm"]) and out["opt/grad_norm"] == pytest.approx(
        norm.item()
    )


# ---------------------------------------------------------------- bf16 convergence (real CLI)


@pytest.mark.slow
def test_bf16_autocast_run_converges_as_fp32_does(tmp_path):
    """Settings that converge in fp32 as well (Adam lr 0.01, clip 1): on any CPU (bf16 is
    emulated where it is not native, only slower), the bf16 run learns the text like the fp32
    run, with no skipped step: neither run ends more than two epochs behind the other's
    curve. (The final losses alone differ by up to ~25% between runs whose arithmetic differs
    in the last bits, in either direction: this memorisation curve is steep at its end. With
    the target's gradient term formed in fp32, seeds 0-3 put bf16 0 to 1.5 epochs behind fp32
    on a CPU without native bf16; the old bf16 difference overstated the push on confident
    targets, and its curve ran up to an epoch ahead.)"""
    curve = {}
    for amp in ("off", "bf16"):
        run_dir = tmp_path / amp
        run_cli(
            [
                "train",
                *TINY,
                f"run.dir={run_dir}",
                f"train.amp={amp}",
                "train.epochs=10",
                "train.optimizer=adam",
                "train.lr=0.01",
                "model.hidden_size=64",
            ],
            timeout=240,
        )
        events = metrics(run_dir, "train/perplexity")
        first, last = events[0]["train/perplexity"], events[-1]["train/perplexity"]
        assert all(math.isfinite(e["train/loss"]) for e in events)
        assert last < 0.05 * first, (amp, first, last)  # measured: 311 -> 1.8 (fp32)
        assert events[-1]["opt/nonfinite_steps"] == 0
        curve[amp] = [e["train/loss"] for e in events]
    assert curve["bf16"][-1] <= curve["off"][-3] and curve["off"][-1] <= curve["bf16"][-3], curve


# ---------------------------------------------------------------- two ranks (gloo)


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )


def _worker(body, rank: int, world: int, port: int, queue) -> None:
    _init(rank, world, port)
    try:
        queue.put(body(rank, world))
    finally:
        # body's frame (and its DDP model) is gone here: collect, then destroy the group, or
        # gloo may abort at exit (pipeline.dist.shutdown, the trainer's own teardown)
        shutdown()


def _body_inf(rank: int, world: int):
    model, opt, amp = tiny_setup("fp16")
    params = list(model.parameters())
    ddp = DDP(model)
    x, y = batch(10 + rank)  # each rank its own data
    before = snapshot(model)
    if rank == 1:  # inf only on rank 1's local gradient; the all-reduce spreads it
        model.W_hh.register_hook(lambda g: torch.full_like(g, math.inf))
    acc = TrainAccumulator(CPU)
    loss, norm, _ = train_step(ddp, params, x, y, model.init_state(B, CPU), opt, amp, 1.0)
    acc.add(loss, x.numel(), norm, 1.0)
    unchanged = all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    return (
        rank,
        unchanged,
        bool(torch.isfinite(norm)),
        amp.scaler.get_scale(),
        acc.reduce(world)["opt/nonfinite_steps"],
    )


def _body_norm(rank: int, world: int):
    model, opt, amp = tiny_setup("off")
    x, y = batch(20 + rank)
    # By hand: each rank's local gradient, averaged over ranks with an explicit all-reduce.
    twin, _, _ = tiny_setup("off")
    out, _ = twin(x, twin.init_state(B, CPU))
    torch.nn.functional.cross_entropy(out.flatten(0, 1), y.t().reshape(-1)).backward()
    local = torch.cat([p.grad.flatten() for p in twin.parameters()])
    averaged = local.clone()
    tdist.all_reduce(averaged)
    averaged /= world
    hand = averaged.double().norm().item()

    clip = 0.5 * hand
    acc = TrainAccumulator(CPU)
    ddp = DDP(model)
    loss, norm, _ = train_step(
        ddp, list(model.parameters()), x, y, model.init_state(B, CPU), opt, amp, clip
    )
    acc.add(loss, x.numel(), norm, clip)
    reduced = acc.reduce(world)
    return (
        rank,
        hand,
        local.double().norm().item(),
        norm.item(),
        grad_norm(model),
        reduced["opt/grad_norm"],
        reduced["opt/clipped"],
    )


def _spawn(body, world: int = 2) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        partial(_worker, body),
        args=(world, free_port(), queue),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return sorted(queue.get() for _ in range(world))


@pytest.mark.slow
def test_inf_step_skipped_on_every_rank():
    results = _spawn(_body_inf)
    for rank, unchanged, finite, scale, skipped in results:
        assert unchanged, f"rank {rank} updated its parameters on an inf step"
        assert not finite, f"rank {rank} saw a finite norm"
        assert scale == 2.0**7, f"rank {rank}: scaler did not back off"
        assert skipped == 1
    assert len({r[3] for r in results}) == 1  # scales agree


@pytest.mark.slow
def test_reported_grad_norm_is_norm_of_all_reduced_grads():
    results = _spawn(_body_norm)
    hand = results[0][1]
    for rank, hand_r, _local, norm, after, logged, clipped in results:
        assert hand_r == pytest.approx(hand, rel=1e-6)  # the same global gradient everywhere
        assert norm == pytest.approx(hand, rel=1e-5), f"rank {rank}"
        assert logged == pytest.approx(hand, rel=1e-5)
        assert after == pytest.approx(0.5 * hand, rel=1e-4)  # clipped to clip = hand / 2
        assert clipped == 1.0
    assert (
        abs(results[0][2] - results[1][2]) > 1e-6 * hand
    )  # local norms differ: test is not vacuous


# ---------------------------------------------------------------- no host sync per step


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_hot_loop_reads_values_only_at_log_intervals(tmp_path, monkeypatch, amp, device):
    """Count host reads of floating/bool tensors (.item(), .tolist(), bool(), float()) during a
    60-step run logging every 20 steps: a per-step read (a device sync on CUDA) would give 60+.
    fp16 included: its fused optimizer takes GradScaler's found_inf on the device (with a
    plain optimizer GradScaler.step reads it with .item() every step). Integer reads are
    counted apart: the non-finite guard's flag at each stop check (every
    train.signal_check_every steps; with several ranks it rides in the stop check's
    all-reduce) and the finiteness check of each save. On CUDA (a gpu test) every such read
    is a device sync."""
    from pipeline import config
    from pipeline.training.trainer import run

    reads, int_reads = [], []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            if self.dtype.is_floating_point or self.dtype == torch.bool:
                reads.append(_name)
            else:
                int_reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = config.load(
        None,
        [
            *TINY,
            f"run.dir={tmp_path / 'run'}",
            "train.max_steps=60",
            "train.log_every=20",
            "train.epochs=100",
            f"train.amp={amp}",
            f"train.device={device}",
            "logging.progress=off",
        ],
    )
    run(cfg)
    # 3 log intervals, one read each (the metrics reduce); fp16 also reads its scale per
    # interval and the final save reads the scaler state
    limit = 3 * 3 if amp == "fp16" else 3
    assert 0 < len(reads) <= limit, reads
    # 6 stop checks (steps 10, 20, ..., 60), the guard's streak at the final save, and the
    # save's finiteness check: 8 (fp16: and the scaler's growth tracker at the save); a
    # per-step read would give 60+
    assert len(int_reads) <= 60 // 10 + 2 + (amp == "fp16"), int_reads


def test_a_skipped_steps_loss_does_not_poison_the_intervals_mean():
    """A non-finite step is skipped (its norm is not finite): its NaN loss is left out of
    train/loss, which averages the steps taken."""
    acc = TrainAccumulator(CPU)
    for loss, norm in ((2.0, 1.0), (math.nan, math.nan), (4.0, 1.0)):
        acc.add(torch.tensor(loss), 10, torch.tensor(norm), 1.0)
    out = acc.reduce(1)
    assert out["train/loss"] == pytest.approx(3.0) and out["opt/nonfinite_steps"] == 1
    acc.add(torch.tensor(math.inf), 10, torch.tensor(math.inf), 1.0)
    assert math.isnan(acc.reduce(1)["train/loss"])  # nothing taken: no mean to give


# ---------------------------------------------------------------- weight casts per bf16 step


class _ParamCasts(TorchDispatchMode):
    """Counts casts of each parameter's storage to a lower precision."""

    def __init__(self, model):
        super().__init__()
        self.names = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten._to_copy and out.dtype == torch.bfloat16:
            name = self.names.get(args[0].untyped_storage().data_ptr())
            if name is not None:
                self.count[name] += 1
        return out


@pytest.mark.parametrize(
    "kind,extra",
    [("rnn_scratch", {}), ("rnn", {}), ("gru", {"num_layers": 2, "dropout": 0.3}),
     ("lstm", {"num_layers": 2, "tie_weights": True}),
     ("gru", {"adaptive_cutoffs": (10,), "tie_weights": True})],
)  # fmt: skip
def test_a_bf16_step_casts_each_weight_once_and_no_more(kind, extra):
    """Autocast keeps one bf16 copy per weight for the whole forward (its cast cache: the
    weights are leaves), so a step casts each weight once, the least a step that updates
    every weight can do; a bf16 copy kept between steps would have to be refreshed after
    each update, the same cast moved. This fails if a weight is cast twice (e.g. two
    autocast regions in one step, or a weight used as a non-leaf)."""
    if not kernels_run(kind if kind != "rnn_scratch" else "rnn_scratch", "bf16"):
        pytest.skip(f"this cpu has no {kind} kernel in bf16 (see check_precision_runs)")
    from pipeline.config import ModelConfig
    from pipeline.model.noise import Noise
    from pipeline.model.rnn import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, hidden_size=H, **extra), V)
    params = list(model.parameters())
    opt = build_optimizer(TrainConfig(optimizer="adamw", lr=1e-3), model)
    amp = Amp("bf16", CPU)
    x, y = batch(0)
    counter = _ParamCasts(model)
    with counter:
        train_step(model, params, x, y, model.init_state(B, CPU), opt, amp, 1.0, Noise(0, 0))
    assert counter.count, "no weight reached a bf16 kernel"
    assert max(counter.count.values()) == 1, dict(counter.count)
