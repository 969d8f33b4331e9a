"""What world-size-invariant dropout costs (CPU): the counter-based masks of pipeline/noise.py
against torch's own dropout (not invariant) and against slicing a global mask drawn from a
generator seeded per step (invariant, but W times the random numbers on each rank); then a
whole training step of the CPU songci recipe with and without its dropout.

    python -m bench.masks            # prints a table; --write adds it to docs/benchmarks.md

Variants alternate in rounds (this machine is shared and noisy); medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.noise import Noise

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (35, 32, 256)  # (T, B, D): one dropout site of the songci CPU recipe, one rank


def per_site(rounds: int, reps: int) -> dict[str, float]:
    """Milliseconds to draw and apply one (T, B, D) mask, p = 0.3."""
    x = torch.randn(SHAPE)
    T, B, D = SHAPE

    def generator_slice(world: int):
        def fn(step: int):  # the global mask from a per-step generator; this rank's rows
            g = torch.Generator().manual_seed(step)
            keep = torch.rand((T, B * world, D), generator=g) >= 0.3
            return x * keep[:, :B].to(x.dtype) / 0.7

        return fn

    variants = {
        "torch F.dropout (not invariant)": lambda step: F.dropout(x, 0.3, True),
        "counter hash, standard (ours)": lambda step: (
            x * Noise(0, step, B).dropout_mask(1, 0.3, SHAPE, False, "cpu", x.dtype)
        ),
        "counter hash, locked (ours)": lambda step: (
            x * Noise(0, step, B).dropout_mask(1, 0.3, SHAPE, True, "cpu", x.dtype)
        ),
        "generator per step, global mask sliced, W=2": generator_slice(2),
        "generator per step, global mask sliced, W=8": generator_slice(8),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            fn(0)
            t0 = time.perf_counter()
            for i in range(reps):
                fn(r * reps + i)
            times[name].append((time.perf_counter() - t0) / reps * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def step_overhead(rounds: int, steps: int) -> dict[str, float]:
    """Milliseconds per training step of configs/songci_cpu.yaml (fp32, random ids) with its
    locked dropout, with standard dropout at the same rate, and without dropout."""
    from pipeline import config
    from pipeline.amp import Amp
    from pipeline.model import build_model
    from pipeline.optim import build_optimizer
    from pipeline.train import train_step

    vocab = 6635
    setups = {}
    for name, extra in (
        ("locked dropout 0.05 (the recipe)", []),
        ("standard dropout 0.05", ["model.dropout_kind=standard"]),
        ("dropout 0", ["model.dropout=0"]),
    ):
        cfg = config.load(str(ROOT / "configs/songci_cpu.yaml"), ["train.amp=off", *extra])
        torch.manual_seed(0)
        model = build_model(cfg.model, vocab)
        amp = Amp("off", torch.device("cpu"))
        opt = build_optimizer(cfg.train, model, "off")
        b, t = cfg.train.batch_size, cfg.train.num_steps
        x, y = torch.randint(0, vocab, (b, t)), torch.randint(0, vocab, (b, t))
        setups[name] = (model, opt, amp, x, y, cfg)
    times: dict[str, list[float]] = {k: [] for k in setups}
    for r in range(rounds):
        for name, (model, opt, amp, x, y, _cfg) in setups.items():
            params, state = list(model.parameters()), model.init_state(x.shape[0], "cpu")
            train_step(model, params, x, y, state, opt, amp, 1.0, Noise(0, 0))
            t0 = time.perf_counter()
            for i in range(steps):
                train_step(model, params, x, y, state, opt, amp, 1.0, Noise(0, r * steps + i))
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    sites = per_site(args.rounds, 50)
    steps = step_overhead(args.rounds, 10)
    lines = [
        f"One dropout site, (T, B, D) = {SHAPE}, p = 0.3, {torch.get_num_threads()} thread(s), "
        f"median of {args.rounds} alternating rounds:\n",
        "| masks | ms a site |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in sites.items()),
        "",
        "A training step of configs/songci_cpu.yaml (fp32; 2-layer LSTM 256, adaptive tied "
        "output, batch 128 x 35; dropout at 3 sites):\n",
        "| step | ms |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in steps.items()),
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        doc = ROOT / "docs" / "benchmarks.md"
        body = doc.read_text(encoding="utf-8")
        head = "## Dropout masks"
        block = f"{head}\n\nCommand: `OMP_NUM_THREADS=1 python -m bench.masks --write`.\n\n{text}\n"
        start = body.find(head)
        if start >= 0:
            end = body.find("\n## ", start + len(head))
            body = body[:start] + block + (body[end:] if end >= 0 else "")
        else:
            body = body.rstrip() + "\n\n" + block
        doc.write_text(body, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
