"""Small measurements behind the analysis in docs/benchmarks.md (not part of `make bench`).

    python -m bench.probes gemm                 # fp32/bf16 matrix-product peaks, 1 and 2 threads
    python -m bench.probes allreduce            # one gloo all_reduce of the rnn_scratch gradient
    python -m bench.probes pair                 # 1-rank trainer alone vs two independent at once
    python -m bench.probes phases               # forward/backward/step ms, 1 rank vs 2 DDP ranks
    python -m bench.probes phases --per-rank 64

`allreduce` and `phases` start themselves under torchrun (2 ranks, 1 thread each). The model
is `configs/seed_scratch_consecutive.yaml` on the whole corpus (vocabulary 2,614, 1.41M
parameters), as in the DDP table of `make bench`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import SCRATCH, torchrun_tokens_per_s  # noqa: E402

N_GRAD = 1_410_000  # rnn_scratch's parameters at vocabulary 2,614 (hidden 256)


def gemm(_args) -> None:
    n = 2048
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            for _ in range(3):
                a @ b
            best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(5))
            print(f"{threads} thread(s), {dtype}: {2 * n**3 / best / 1e9:.0f} GFLOP/s (best of 5)")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _under_torchrun(args) -> bool:
    """Re-run this command under torchrun (2 ranks) unless already a worker."""
    if "LOCAL_RANK" in os.environ:
        return False
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "bench.probes", *sys.argv[1:]]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    if args.cmd == "phases":  # and the 1-rank baseline, in-process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        phases(args)
    return True


def allreduce(args) -> None:
    if _under_torchrun(args):
        return
    from pipeline import dist

    ctx = dist.init("cpu", 1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(N_GRAD).to(dtype)
        for _ in range(3):
            dist.all_reduce_sum(t)
        dist.barrier()
        seconds = _timed(lambda t=t: [dist.all_reduce_sum(t) for _ in range(20)]) / 20
        if ctx.is_main:
            mb = N_GRAD * t.element_size() / 1e6
            print(f"{dtype}: {seconds * 1e3:.2f} ms per all_reduce of {mb:.1f} MB")
    dist.shutdown()


def pair(args) -> None:
    for amp in ("off", "bf16"):
        solo, together = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                solo.append(torchrun_tokens_per_s(1, 120, 20, amp, Path(tmp) / "solo"))
                rates = [0.0, 0.0]

                def one(i: int, rates=rates, tmp=tmp, amp=amp) -> None:
                    rates[i] = torchrun_tokens_per_s(1, 120, 20, amp, Path(tmp) / f"p{i}")

                threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
                [t.start() for t in threads]
                [t.join() for t in threads]
                together.append(sum(rates))
                print(f"{amp} round {r}: alone {solo[-1]:.0f}, together {rates}", flush=True)
        s, p = statistics.median(solo), statistics.median(together)
        print(f"{amp}: alone {s:.0f}, two at once {p:.0f} in all, {p / (2 * s):.3f} of twice")


def phases(args) -> None:
    if _under_torchrun(args):
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pipeline import config, dist
    from pipeline.amp import Amp
    from pipeline.corpus import load_corpus
    from pipeline.model import build_model, detach_state
    from pipeline.optim import build_optimizer, clip_grad_global
    from pipeline.streams import make_train_streams

    ctx = dist.init("cpu", 1)
    w = ctx.world_size
    cfg = config.load(
        str(ROOT / SCRATCH),
        ["data.max_chars=0", f"train.batch_size={args.per_rank * w}", f"train.amp={args.amp}"],
    )
    t = cfg.train
    corpus = load_corpus(cfg.data, ctx)
    streams = make_train_streams(
        corpus.splits["train"], t.sampling, t.batch_size, t.num_steps, ctx.rank, w, ctx.device, 0
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, len(corpus.vocab))
    amp = Amp(t.amp, ctx.device)
    opt = build_optimizer(t, model)
    train_model = DDP(model) if w > 1 else model
    params, hidden = list(model.parameters()), model.init_state(streams.b, ctx.device)
    times = {"forward": [], "backward": [], "step": []}
    for i in range(80):
        hidden = detach_state(hidden)
        x, y = streams.batch(0, i % streams.epoch_size)
        t0 = time.perf_counter()
        with amp.autocast():
            nll, hidden = train_model(x, hidden, None, y)
        loss = nll.mean()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # with DDP: holds the all-reduce
        t2 = time.perf_counter()
        clip_grad_global(params, t.clip)
        opt.step()
        t3 = time.perf_counter()
        if i >= 10:
            for k, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[k].append(seconds * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{w} rank(s), rank {ctx.rank}, {args.per_rank} streams/rank, amp {args.amp}: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
        + f", step total {sum(med.values()):.1f} ms",
        flush=True,
    )
    del train_model
    dist.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["gemm", "allreduce", "pair", "phases"])
    ap.add_argument("--per-rank", type=int, default=32, help="phases: streams per rank")
    ap.add_argument("--amp", default="off", choices=["off", "bf16"], help="phases")
    ap.add_argument("--rounds", type=int, default=3, help="pair")
    args = ap.parse_args()
    {"gemm": gemm, "allreduce": allreduce, "pair": pair, "phases": phases}[args.cmd](args)
    if "pipeline.dist" in sys.modules:  # a torchrun worker ends like the trainer's ranks
        sys.modules["pipeline.dist"].leave(0)


if __name__ == "__main__":
    main()
