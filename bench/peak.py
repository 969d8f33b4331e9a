"""This machine's matrix-product peak, measured: the yardstick for `make bench`'s fraction of
peak (a datasheet peak for a shared CPU would mislead, and a CPU without native bf16 has no
datasheet bf16 figure at all).

    python -m bench.peak [--threads 1,2]

The peak of a dtype is the best GFLOP/s of `torch.mm` over square products of a few sizes
(2 n^3 FLOPs each), best of several repetitions: large products are where a core's matrix
units come closest to their limit. bf16 uses oneDNN's bf16 GEMM where the CPU has AMX or
AVX512-BF16, and a slower path where it has neither; either way it is what a bf16 step's
products run on.
"""

from __future__ import annotations

import argparse
import time

import torch

SIZES = (512, 1024, 2048)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_gflops(dtype: torch.dtype, n: int, reps: int = 5, budget_s: float = 2.0) -> float:
    """Best GFLOP/s of an n x n x n `torch.mm` in `dtype` over up to `reps` timed calls (one
    warm-up call first; stops early once `budget_s` is spent, so a slow path stays short)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best, spent = float("inf"), 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return 2 * n**3 / best / 1e9


def best_gflops(dtype: torch.dtype, sizes=SIZES, budget_s: float = 2.0) -> float:
    """The best over `sizes`, smallest first; a size whose product takes longer than
    `budget_s` ends the climb (an emulated bf16 product of 2048^3 would take ~20 s)."""
    best = 0.0
    for n in sizes:
        gflops = matmul_gflops(dtype, n, budget_s=budget_s)
        best = max(best, gflops)
        if 2 * n**3 / gflops / 1e9 * 8 > budget_s:  # the next size costs 8x this one
            break
    return best


def measure(threads: int, sizes=SIZES) -> dict[str, float]:
    """{'fp32': GFLOP/s, 'bf16': GFLOP/s}: the best over `sizes`, on `threads` torch threads
    (the caller's thread count is restored)."""
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {name: best_gflops(dtype, sizes) for name, dtype in DTYPES.items()}
    finally:
        torch.set_num_threads(was)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="this machine's matrix-product peak")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    args = ap.parse_args(argv)
    for threads in (int(t) for t in args.threads.split(",")):
        peaks = measure(threads)
        print(
            f"{threads} thread(s): " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peaks.items())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
