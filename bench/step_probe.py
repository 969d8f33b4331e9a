"""Tokens/s of one training step (`pipeline.training.trainer.train_step`) of a config under override sets,
fp32 and bf16, on random ids drawn with Zipf frequencies (the vocabulary is sorted most
frequent first, so an adaptive output sees a realistic mix of head and tail targets).

    python -m bench.step_probe                                   # songci_cpu as committed
    python -m bench.step_probe "model.adaptive_cutoffs=[]" "train.batch_size=32"

Each positional argument is one variant: space-separated overrides ("" = the config as is).
Variants alternate in rounds (this machine is shared and its speed drifts); medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pipeline import config
from pipeline.model.noise import Noise
from pipeline.model.rnn import build_model
from pipeline.training.nonfinite import NonFiniteGuard
from pipeline.training.optim import build_optimizer
from pipeline.training.precision import Amp
from pipeline.training.step import train_step

ROOT = Path(__file__).resolve().parents[1]


def setup(cfg_path: str, overrides: list[str], amp_mode: str, vocab: int, fused: bool = True):
    cfg = config.load(cfg_path, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab)
    amp = Amp(amp_mode, torch.device("cpu"))
    opt = build_optimizer(cfg.train, model, fused)
    b, t = cfg.train.batch_size, cfg.train.num_steps
    zipf = 1.0 / torch.arange(1, vocab + 1).float()
    x, y = (torch.multinomial(zipf, b * t, replacement=True).view(b, t) for _ in range(2))
    return model, opt, amp, x, y


def time_steps(runs: dict, rounds: int, steps: int) -> dict:
    """Seconds per training step of each run {key: (model, opt, amp, x, y, noise_cls[,
    guard])}, one figure per round; the runs alternate within a round (one warm-up step each
    first). With a guard (pipeline.training.nonfinite) the step is the trainer's; without, the step
    before the guard existed."""
    times: dict = {k: [] for k in runs}
    for r in range(rounds):
        for key, (model, opt, amp, x, y, noise_cls, *guard) in runs.items():
            params, state = list(model.parameters()), model.init_state(x.shape[0], "cpu")
            guard = guard[0] if guard else None
            train_step(model, params, x, y, state, opt, amp, 1.0, noise_cls(0, 0), guard)
            t0 = time.perf_counter()
            for i in range(steps):
                noise = noise_cls(0, r * steps + i + 1)
                train_step(model, params, x, y, state, opt, amp, 1.0, noise, guard, i)
            times[key].append((time.perf_counter() - t0) / steps)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", default=[""])
    ap.add_argument("--config", default=str(ROOT / "configs/songci_cpu.yaml"))
    ap.add_argument("--vocab", type=int, default=6635, help="songci's training vocabulary")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    guard = NonFiniteGuard(10, torch.device("cpu"))
    runs = {
        (v, amp): (*setup(args.config, v.split(), amp, args.vocab), Noise, guard)
        for v in args.variants
        for amp in ("off", "bf16")
    }
    times = time_steps(runs, args.rounds, args.steps)
    tokens = {k: run[3].numel() for k, run in runs.items()}
    rates = {k: [tokens[k] / t for t in ts] for k, ts in times.items()}
    print(f"{torch.get_num_threads()} threads, median of {args.rounds} alternating rounds")
    print("| overrides | fp32 tokens/s | bf16 tokens/s |\n|---|---:|---:|")
    for v in args.variants:
        off, bf16 = (statistics.median(rates[(v, a)]) for a in ("off", "bf16"))
        print(f"| {v or '(as committed)'} | {off:,.0f} | {bf16:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
