"""What world-size-invariant dropout costs (CPU): the counter-based masks of pipeline/noise.py
against torch's own dropout (not invariant) and against slicing a global mask drawn from a
generator seeded per step (invariant, but W times the random numbers on each rank); then a
whole training step at the chapter's size and at the CPU songci recipe's, with our masks,
with torch-generator masks (the old way) and without dropout. `make bench` runs it.

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


class TorchRNGNoise(Noise):
    """The masks as they were before: drawn from torch's generator (bernoulli_, what
    F.dropout does), not world-size invariant. Here only to price ours against."""

    def dropout_mask(self, site, p, shape_TBD, locked, device, dtype):
        T, B, D = shape_TBD
        shape = (1, B, D) if locked else (T, B, D)
        return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1 - p) / (1 - p)


STEP_SETUPS = (  # (label, config, vocabulary, overrides): the chapter's size and the recipe's
    (
        "configs/jaychou.yaml at the chapter's size (LSTM 256 x 2, batch 32 x 35, dropout 0.5)",
        "configs/jaychou.yaml",
        1027,
        ["train.batch_size=32"],
    ),
    (
        "configs/songci_cpu.yaml (LSTM 256 x 2, adaptive, batch 128 x 35) with locked dropout 0.05",
        "configs/songci_cpu.yaml",
        6635,
        ["model.dropout=0.05", "model.dropout_kind=locked"],  # the recipe trains without
    ),
)
MASKS = (
    ("counter hash (ours)", Noise, []),
    ("torch generator", TorchRNGNoise, []),
    ("no dropout", Noise, ["model.dropout=0"]),
)


def step_overhead(rounds: int, steps: int) -> dict[tuple[str, str], float]:
    """Milliseconds per fp32 training step (bench.step_probe's Zipf ids) of each STEP_SETUPS
    config with our masks, with torch-generator masks at the same sites and rates, and
    without dropout."""
    from bench.step_probe import setup, time_steps

    runs = {
        (label, mask): (*setup(str(ROOT / path), [*extra, *more], "off", vocab), noise_cls)
        for label, path, vocab, extra in STEP_SETUPS
        for mask, noise_cls, more in MASKS
    }
    times = time_steps(runs, rounds, steps)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def step_table(steps: dict[tuple[str, str], float]) -> list[str]:
    rows = [
        "| config | "
        + " | ".join(f"{m} ms" for m, _, _ in MASKS)
        + " | ours vs torch generator | ours vs no dropout |",
        "|---|" + "---:|" * (len(MASKS) + 2),
    ]
    for label, *_ in STEP_SETUPS:
        ours, torch_rng, none = (steps[label, m] for m, _, _ in MASKS)
        rows.append(
            f"| {label} | {ours:.1f} | {torch_rng:.1f} | {none:.1f} | "
            f"{(ours / torch_rng - 1) * 100:+.1f}% | {(ours / none - 1) * 100:+.1f}% |"
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    sites = per_site(args.rounds, 50)
    steps = step_overhead(args.rounds, 10)
    from bench.run import machine

    m = machine()
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, avx512_bf16={m['avx512_bf16']}, "
        f"AMX={m['amx']}; torch {m['torch']}; load average {m['load_average_at_start']:.1f} "
        f"at start (shared machine). {time.strftime('%Y-%m-%d %H:%M')}.\n",
        f"One dropout site, (T, B, D) = {SHAPE}, p = 0.3, {torch.get_num_threads()} thread(s), "
        f"median of {args.rounds} alternating rounds:\n",
        "| masks | ms a site |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in sites.items()),
        "",
        f"A training step, fp32, {torch.get_num_threads()} thread(s), median of {args.rounds} "
        "alternating rounds of 10 steps; the masks at the same sites and rates:\n",
        *step_table(steps),
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        from bench.report import replace_section

        head = "## Dropout masks"
        command = "Command: `OMP_NUM_THREADS=1 python -m bench.masks --write`."
        replace_section(ROOT / "docs" / "benchmarks.md", head, f"{head}\n\n{command}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
