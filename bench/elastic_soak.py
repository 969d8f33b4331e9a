"""Soak test of elastic restarts: the kill-and-restart scenario of tests/test_elastic.py, many
times in a row, on one node (one torchrun agent, 2 ranks) and on two simulated nodes (two
agents, c10d rendezvous on 127.0.0.1). A run succeeds when the agents exit 0 after the
restart and the final parameters equal the uninterrupted run's bit for bit.

    .venv/bin/python bench/elastic_soak.py                    # 10 runs of each scenario
    .venv/bin/python bench/elastic_soak.py --runs 3 --scenarios 2-fresh
    .venv/bin/python bench/elastic_soak.py --scenarios 2-shared   # shows the failure mode

Scenarios: `1-shared` one node, torchrun's defaults (the agent shares its TCPStore; the
trainer's per-restart namespace makes the restart connect); `1-fresh` and `2-fresh` with the
recommended TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; `2-shared` two nodes without it (restart
counts can differ between nodes, and such an attempt hangs until the timeout).

Exit status 0 only when every run succeeded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("PIPELINE_DATA_DIR", str(ROOT.parent / "shared" / "data"))

from conftest import load_ckpt, torchrun  # noqa: E402  (sets the offline environment)
from test_elastic import BASE, TIMEOUT, check_restarted, kill_and_restart  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument(
        "--scenarios",
        nargs="+",
        default=["1-shared", "1-fresh", "2-fresh"],
        choices=["1-shared", "1-fresh", "2-fresh", "2-shared"],
    )
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="elastic_soak_"))
    torchrun(2, ["train", *BASE, f"run.dir={work / 'reference'}"], timeout=TIMEOUT)
    reference = load_ckpt(work / "reference")["model"]
    ok_all = True
    for scenario in args.scenarios:
        nodes, share = int(scenario[0]), scenario.endswith("shared")
        ok = 0
        for i in range(args.runs):
            run_dir = work / f"{scenario}_{i}"
            t0 = time.monotonic()
            out = kill_and_restart(run_dir, nodes, victim_rank=i % 2, share_store=share)
            problem = check_restarted(out, run_dir, reference)
            ok += not problem
            print(
                f"{scenario} run {i + 1:2d}: killed rank {i % 2} after step "
                f"{out['killed_at']}, {time.monotonic() - t0:5.1f} s: {problem or 'ok'}",
                flush=True,
            )
            if problem:
                print(out["log"][-3000:], flush=True)
        print(f"{scenario}: {ok} of {args.runs} restarted runs succeeded", flush=True)
        ok_all &= ok == args.runs
    print(f"run directories under {work}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
