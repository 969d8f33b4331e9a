"""What the non-finite guard costs: a training step as the trainer runs it (fused optimizer
kernels taking the guard's device-side skip as `found_inf`, the carried state kept on a
skip) against the step before the guard (foreach optimizer, no check), side by side.

    OMP_NUM_THREADS=1 python -m bench.guard           # prints the table
    OMP_NUM_THREADS=1 python -m bench.guard --write   # and replaces its section in docs

Rows: the chapter's from-scratch RNN (configs/seed_scratch_consecutive.yaml: SGD, hidden 256,
batch 32 x 35), nn.LSTM at the chapter's size (configs/seed_concise.yaml with Adam), and the
main job's 2-layer LSTM (configs/jaychou.yaml, AdamW); fp32, and bf16 where the CPU has it
natively; the variants alternate
in rounds (bench.step_probe.time_steps), medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from bench.report import replace_section
from bench.step_probe import setup, time_steps
from pipeline.model.noise import Noise
from pipeline.training.nonfinite import NonFiniteGuard
from pipeline.training.precision import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "rnn_scratch (chapter, SGD)": ("configs/seed_scratch_consecutive.yaml", [], 1027),
    "lstm (chapter size, Adam)": ("configs/seed_concise.yaml", ["model.kind=lstm"], 1027),
    "lstm 2x256 (main job, AdamW)": ("configs/jaychou.yaml", ["model.dropout=0"], 2525),
}
HEAD = "## Non-finite guard"
NOTE = """"Before" is the step as it was before the guard (foreach optimizer, no check); "guarded"
is the trainer's step (fused optimizer kernels that take the guard's device-side skip as
`found_inf`, the carried state kept on a skip). The guard adds about ten tiny device ops a
step; the target is at most +3% for the rnn_scratch and LSTM steps. Milliseconds are medians
over rounds and move with the machine's load; the cost is taken pair by pair within a round.
A CPU without native bf16 gets fp32 rows only; the last bf16 rows, from the native-bf16 AMD
EPYC (2026-12-02): `git show 480b3a2:docs/benchmarks.md`, "Non-finite guard"."""


def precisions() -> tuple[str, ...]:
    """bf16 only where the CPU has it natively: elsewhere it is emulated (about 50x slower)
    and oneDNN has no bf16 LSTM, so `make bench` would stop here."""
    return ("off", "bf16") if cpu_has_native_bf16() else ("off",)


def measure(rounds: int, steps: int) -> list[str]:
    runs = {}
    amps = precisions()
    for name, (cfg, overrides, vocab) in ROWS.items():
        for amp in amps:
            runs[(name, amp, "before")] = (*setup(str(ROOT / cfg), overrides, amp, vocab, False), Noise)  # fmt: skip
            guard = NonFiniteGuard(10, torch.device("cpu"))
            runs[(name, amp, "guarded")] = (*setup(str(ROOT / cfg), overrides, amp, vocab), Noise, guard)  # fmt: skip
    times = time_steps(runs, rounds, steps)
    rows = ["| step | amp | before (ms) | guarded (ms) | cost |", "|---|---|---:|---:|---:|"]
    for name in ROWS:
        for amp in amps:
            before, after = (times[(name, amp, k)] for k in ("before", "guarded"))
            ratio = statistics.median(a / b for a, b in zip(after, before))  # pair by pair
            b_ms, a_ms = statistics.median(before) * 1e3, statistics.median(after) * 1e3
            label = "fp32" if amp == "off" else amp
            rows.append(f"| {name} | {label} | {b_ms:.2f} | {a_ms:.2f} | {ratio - 1:+.1%} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    from bench.run import machine

    m = machine()
    text = "\n".join(
        [
            f"Machine: {m['cpu']}, {m['cores']} cores, avx512_bf16={m['avx512_bf16']}, "
            f"AMX={m['amx']}; torch {m['torch']}; load average "
            f"{m['load_average_at_start']:.1f} at start (shared machine). "
            f"{time.strftime('%Y-%m-%d %H:%M')}.\n",
            f"{torch.get_num_threads()} thread(s), median of {args.rounds} alternating rounds "
            f"of {args.steps} steps; cost = the median of the per-round ratios guarded/before:\n",
            *measure(args.rounds, args.steps),
        ]
    )
    print(text)
    if args.write:
        command = "Command: `OMP_NUM_THREADS=1 python -m bench.guard --write`."
        block = f"{HEAD}\n\n{command}\n\n{text}\n\n{NOTE}\n"
        replace_section(ROOT / "docs" / "benchmarks.md", HEAD, block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
