"""The measuring and checking part of launch/gpu_check.sh (the one GPU acceptance script).

    python -m bench.gpu_check env --results OUT/gpu_check.json
    python -m bench.gpu_check run RUN_DIR --amp bf16 [--need-mfu] --results ...
    python -m bench.gpu_check throughput --device cuda --results ...
    python -m bench.gpu_check songci RUN_DIR --budget 45 --results ...

Each command adds its section to the results JSON and prints what it found; the exit status
is 1 when a check failed. Checks read metrics by the names pipeline/ writes today
(train/loss, opt/nonfinite_steps, perf/tokens_per_s, perf/flops_per_token, perf/mfu,
val/bpc, time/elapsed_s): a metric that is missing (renamed, never written) fails its check
instead of passing for want of values.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline.training.autoamp import NAMES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("numpy", "omegaconf", "yaml", "tqdm", "datasets", "huggingface_hub", "safetensors")
PACKAGES += ("wandb", "matplotlib", "pytest")
NONFINITE_ALLOWED = 3  # fp16's loss scale may overflow a few times while it settles
SONGCI_MAX_BPC = 7.0  # the unigram plateau is ~9.2 bits/char; 45 s on an H100 reach ~6.3


def events_of(run_dir: Path, key: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if key in e]


def need(events: list[dict], key: str, problems: list[str]) -> list:
    """Every event's `key`; a problem (and []) when any event lacks it."""
    missing = sum(key not in e for e in events)
    if missing or not events:
        problems.append(f"metric '{key}' missing from {missing or 'all'} event(s)")
        return []
    return [e[key] for e in events]


def check_training(
    run_dir: Path, amp: str, need_mfu: bool, min_drop: float = 0.2
) -> tuple[dict, list[str]]:
    """A short training run: losses finite and falling by `min_drop`, at most NONFINITE_ALLOWED skipped
    (non-finite) steps, the precision asked for, tokens/s and FLOPs/token, MFU in (0, 1)
    where the card's peak is known."""
    problems: list[str] = []
    events = events_of(run_dir, "train/loss")
    loss = need(events, "train/loss", problems)
    skipped = sum(need(events, "opt/nonfinite_steps", problems))
    rate = need(events, "perf/tokens_per_s", problems)
    flops = need(events, "perf/flops_per_token", problems)
    precision = set(need(events, "precision", problems))
    mfu = [e["perf/mfu"] for e in events if "perf/mfu" in e]
    if loss and not all(math.isfinite(x) for x in loss):
        problems.append(f"non-finite training loss: {loss}")
    elif len(loss) < 2 or not loss[-1] < (1 - min_drop) * loss[0]:
        problems.append(f"the loss did not fall by {min_drop:.0%}: {loss}")
    if skipped > NONFINITE_ALLOWED:
        problems.append(f"{skipped:g} non-finite (skipped) steps > {NONFINITE_ALLOWED}")
    if precision and precision != {amp}:
        problems.append(f"precision {sorted(precision)}, asked for {amp}")
    if rate and not all(r > 0 for r in rate) or flops and not all(f > 0 for f in flops):
        problems.append("perf/tokens_per_s or perf/flops_per_token not > 0")
    if need_mfu and len(mfu) < len(events):
        problems.append("perf/mfu missing on a card whose peak is known")
    if not all(0 < m < 1 for m in mfu):
        problems.append(f"perf/mfu outside (0, 1): {mfu}")
    found = {
        "amp": amp,
        "loss": [loss[0], loss[-1]] if loss else None,
        "nonfinite_steps": skipped,
        "tokens_per_s": rate[-1] if rate else None,
        "flops_per_token": flops[-1] if flops else None,
        "mfu": mfu[-1] if mfu else None,
    }
    return found, problems


def check_songci(
    run_dir: Path, budget: float, max_bpc: float = SONGCI_MAX_BPC
) -> tuple[dict, list[str]]:
    """The songci GPU recipe under train.time_budget: validation bits/char finite, falling
    and below SONGCI_MAX_BPC; the training time within the budget (a little over for the
    final evaluation and save)."""
    problems: list[str] = []
    val = need(events_of(run_dir, "val/bpc"), "val/bpc", problems)
    elapsed = need(events_of(run_dir, "time/elapsed_s"), "time/elapsed_s", problems)
    mfu = [e["perf/mfu"] for e in events_of(run_dir, "perf/mfu")]
    if val and not all(math.isfinite(v) for v in val):
        problems.append(f"non-finite validation bits/char: {val}")
    elif val and not val[-1] < max_bpc:
        problems.append(f"validation {val[-1]:.3f} bits/char, not below {max_bpc}")
    if len(val) > 1 and not val[-1] < val[0]:
        problems.append(f"validation bits/char did not fall: {val}")
    if elapsed and elapsed[-1] > 1.25 * budget:
        problems.append(f"trained {elapsed[-1]:.0f} s on a {budget:g} s budget")
    found = {
        "val_bpc": val[-1] if val else None,
        "val_bpc_curve": val,
        "elapsed_s": elapsed[-1] if elapsed else None,
        "mfu": mfu[-1] if mfu else None,
    }
    return found, problems


def environment() -> tuple[dict, list[str]]:
    problems: list[str] = []
    found = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        found.update(
            gpu=torch.cuda.get_device_name(),
            gpus=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
            bf16=torch.cuda.is_bf16_supported(),
            nccl=torch.distributed.is_nccl_available(),
        )
    else:
        problems.append("torch sees no CUDA device")
    for name in PACKAGES:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            problems.append(f"package '{name}' is not installed")
    return found, problems


def throughput(device: str, rounds: int, steps: int) -> tuple[dict, list[str]]:
    """Tokens/s per model kind and precision at the chapter's size (32 x 35), alternating
    rounds in one process (bench.run's variants); the precision train.amp=auto picks for
    each (its own probe, as a run does) and the MFU of each row."""
    from bench.run import CONCISE, SCRATCH, PipelineVariant
    from pipeline.tracking.flops import peak_tflops, train_flops_per_token
    from pipeline.training import autoamp

    dev = torch.device(device)
    modes = autoamp.candidates(dev)
    name = autoamp.device_name(dev)
    rows, problems = [], []
    for kind in ("rnn_scratch", "rnn", "gru", "lstm"):
        config = SCRATCH if kind == "rnn_scratch" else CONCISE
        kind_args = [] if kind == "rnn_scratch" else [f"model.kind={kind}"]
        runs, failed = {}, {}
        for m in modes:
            try:  # oneDNN has no bf16 LSTM on CPUs without AVX-512: such a row fails
                runs[m] = PipelineVariant(config, [*kind_args, f"train.amp={m}"], device)
                for _ in range(3):
                    runs[m].step()
                runs[m].sync()
            except RuntimeError as err:
                runs.pop(m, None)
                failed[m] = str(err).splitlines()[0][:120]
        ran = [m for m in modes if m in runs]
        rates: dict[str, list[float]] = {m: [] for m in ran}
        for r in range(rounds):
            for m in ran if r % 2 == 0 else ran[::-1]:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0, tokens = time.perf_counter(), 0
                for _ in range(steps):
                    tokens += runs[m].step()
                runs[m].sync()
                if device == "cuda":
                    torch.cuda.synchronize()
                rates[m].append(tokens / (time.perf_counter() - t0))
        table = {m: statistics.median(v) for m, v in rates.items()}
        probe_run = runs["off"]
        began = time.perf_counter()
        probe = autoamp.measure(modes, probe_run.model, probe_run.tcfg, probe_run.streams, dev, 0)
        probe_s = time.perf_counter() - began
        ok = {m: r for m, r in probe.items() if not isinstance(r, str)}
        auto = autoamp.pick(ok)
        flops = train_flops_per_token(probe_run.model)
        fastest = max(table, key=table.get)
        row = {"kind": kind, "tokens_per_s": table, "fastest": fastest, "auto": auto}
        row["failed"] = failed
        row.update(probe_tokens_per_s=probe, probe_seconds=probe_s, flops_per_token=flops)
        row["mfu"] = {
            m: (r * flops / (peak_tflops(name, m) * 1e12) if peak_tflops(name, m) else None)
            for m, r in table.items()
        }
        rows.append(row)
        # the probe and this table are two measurements: allow their noise, not a wrong pick
        if table[auto] < 0.85 * table[fastest]:
            problems.append(
                f"{kind}: auto picked {auto} at {table[auto]:,.0f} tokens/s, the fastest "
                f"({fastest}) ran {table[fastest]:,.0f}"
            )
        if ok[auto] < 0.95 * max(ok.values()):
            problems.append(f"{kind}: auto's own probe has {auto} > 5% slower than the fastest")
    return {"device": name, "rows": rows}, problems


def markdown(section: dict) -> str:
    """The throughput table as docs/benchmarks.md shows it."""
    names = NAMES
    modes = list(
        dict.fromkeys(m for r in section["rows"] for m in [*r["tokens_per_s"], *r["failed"]])
    )
    head = "| model | " + " | ".join(f"{names[m]} tokens/s (MFU)" for m in modes)
    lines = [head + " | fastest | auto picks | auto's probe (s) |"]
    lines.append("|---|" + "---:|" * len(modes) + "---|---|---:|")
    for row in section["rows"]:
        cells = []
        for m in modes:
            if m not in row["tokens_per_s"]:
                cells.append("fails" if m in row["failed"] else "-")
                continue
            mfu = row["mfu"][m]
            cells.append(f"{row['tokens_per_s'][m]:,.0f}" + (f" ({mfu:.2%})" if mfu else ""))
        lines.append(
            f"| {row['kind']} | " + " | ".join(cells) + f" | {names[row['fastest']]} | "
            f"{names[row['auto']]} | {row['probe_seconds']:.1f} |"
        )
    return "\n".join(lines)


def save(results: Path, key: str, found: dict, problems: list[str]) -> int:
    data = json.loads(results.read_text()) if results.exists() else {}
    data[key] = {**found, "problems": problems, "passed": not problems}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({key: found}, ensure_ascii=False, default=str))
    for p in problems:
        print(f"FAIL ({key}): {p}")
    return 1 if problems else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["env", "run", "throughput", "songci"])
    ap.add_argument("run_dir", nargs="?", type=Path)
    ap.add_argument(
        "--results", type=Path, required=True, help="the results JSON (sections merged)"
    )
    ap.add_argument("--amp", default="off")
    ap.add_argument(
        "--need-mfu", action="store_true", help="the card's peak is known: MFU must be logged"
    )
    ap.add_argument("--key", help="the section's name (default: the command, or run_<amp>)")
    ap.add_argument("--min-drop", type=float, default=0.2, help="run: the loss must fall by this")
    ap.add_argument("--budget", type=float, default=45.0)
    ap.add_argument("--max-bpc", type=float, default=SONGCI_MAX_BPC)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.what == "env":
        found, problems = environment()
    elif args.what == "run":
        found, problems = check_training(args.run_dir, args.amp, args.need_mfu, args.min_drop)
    elif args.what == "songci":
        found, problems = check_songci(args.run_dir, args.budget, args.max_bpc)
    else:
        found, problems = throughput(args.device, args.rounds, args.steps)
        print(markdown(found))
    key = args.key or (f"run_{args.amp}" if args.what == "run" else args.what)
    return save(args.results, key, found, problems)


if __name__ == "__main__":
    sys.exit(main())
