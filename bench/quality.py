"""Quality within a wall-clock budget: train the CPU recipe, then report held-out numbers.

    python -m bench.quality                       # configs/songci_cpu.yaml, 600 s, 1 process
    python -m bench.quality --nproc 2 --budget 300 --config configs/songci_cpu.yaml
    make bench-quality

Trains with `train.time_budget=BUDGET` (training time, evaluations and saves included;
start-up, data preparation and the final evaluation of best.pt are not counted: the LR
schedule ends when the budget does, on whatever machine runs it), evaluates
`checkpoints/best.pt` over the whole validation and test splits (`python -m pipeline eval`),
generates samples for a few prefixes and prints it all.

Unless --no-write, the result REPLACES its section of record in docs/benchmarks.md, under
"## Quality": one section per run kind, headed without a date,

    ### Quality: configs/songci_cpu.yaml, 1 process, fp32, 600 s

(config, processes, the precision `train.amp` resolved to, budget; overrides other than
`train.amp` are added to the heading, so an exploration does not overwrite the recipe's
record; use --no-write for those). The block holds the date, the command (with the
environment variables that change what runs: PIPELINE_NATIVE_BF16, ONEDNN_MAX_CPU_ISA,
OMP_NUM_THREADS), the machine, the table, the budget's outcome and the samples. A rerun of
the same kind replaces its section; history stays in git.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.report import replace_section
from pipeline.training.precision import cpu_has_native_bf16, cpu_model_name, resolve

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def sh(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    return proc.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/songci_cpu.yaml")
    ap.add_argument("--budget", type=float, default=600.0, help="training seconds")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (torchrun when > 1)")
    ap.add_argument("--prefixes", default="春风,明月,分开")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", default="", help="also append the result as one JSON line here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="quality_"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    py = sys.executable
    train = [
        "-m",
        "pipeline",
        "train",
        "--config",
        args.config,
        f"run.dir={run_dir}",
        "train.resume=never",
        "run.overwrite=true",
        f"train.time_budget={args.budget}",
        "logging.wandb.mode=disabled",
        *args.overrides,
    ]
    if args.nproc > 1:
        cmd = [
            str(Path(py).with_name("torchrun")),
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            *train,
        ]
    else:
        cmd = [py, *train]
    t0 = time.time()
    sh(cmd, env)
    wall = time.time() - t0
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_ev = [e for e in events if "train/loss" in e]
    last = train_ev[-1]
    best = run_dir / "checkpoints" / "best.pt"
    ckpt = best if best.exists() else run_dir / "checkpoints" / "last.pt"
    evals = {}
    for split in ("validation", "test"):
        out = sh(
            [
                py,
                "-m",
                "pipeline",
                "eval",
                "--checkpoint",
                str(ckpt),
                "--split",
                split,
                "--device",
                "cpu",
            ],
            env,
        )
        evals[split] = json.loads(out.strip().splitlines()[-1])
    samples = []
    for prefix in args.prefixes.split(","):
        out = sh(
            [
                py,
                "-m",
                "pipeline",
                "generate",
                "--checkpoint",
                str(ckpt),
                "--prefix",
                prefix,
                "--length",
                "60",
                "--temperature",
                "0.8",
                "--top-k",
                "20",
                "--seed",
                "0",
            ],
            env,
        )
        samples.append(out.strip())
    resolved = config_of(run_dir)["train"]  # the budget's horizon, written by the run
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": args.config,
        "overrides": args.overrides,
        "nproc": args.nproc,
        "budget_s": args.budget,
        "train_time_s": max(e.get("time/elapsed_s", 0) for e in events),
        "amp": resolve(resolved["amp"], torch.device("cpu")),
        "native_bf16": cpu_has_native_bf16(),
        "schedule_steps": resolved["schedule_steps"],
        "last_lr": last.get("opt/lr"),
        "wall_s": round(wall, 1),
        "steps": last["step"],
        "chars_seen": last.get("train/chars"),
        "tokens_per_s": sum(e["perf/tokens_per_s"] for e in train_ev[-5:]) / min(5, len(train_ev)),
        "checkpoint": ckpt.name,
        "checkpoint_step": evals["validation"]["step"],
        "val": evals["validation"],
        "test": evals["test"],
        "samples": samples,
    }
    print(json.dumps(result, ensure_ascii=False, indent=1))
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
    if not args.no_write:
        write_doc(result, argv if argv is not None else sys.argv[1:])
    return 0


def config_of(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))


ENV_SHOWN = ("PIPELINE_NATIVE_BF16", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


def heading(r: dict) -> str:
    """The section of record for this kind of run: no date, so a rerun replaces it."""
    procs = "1 process" if r["nproc"] == 1 else f"{r['nproc']} processes"
    amp = "fp32" if r["amp"] == "off" else r["amp"]
    extra = [o for o in r["overrides"] if not o.startswith("train.amp=")]
    tail = f", {' '.join(extra)}" if extra else ""
    return f"### Quality: {r['config']}, {procs}, {amp}, {r['budget_s']:g} s{tail}"


def command(argv: list[str]) -> str:
    """The command that reproduces the run: the environment that changes it, then the
    arguments less --json/--run-dir (where results go, not what runs)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--json", "--run-dir"):
            skip = True
        elif not a.startswith(("--json=", "--run-dir=")):
            args.append(a)
    env = [f"{k}={os.environ[k]}" for k in ENV_SHOWN if k in os.environ]
    return " ".join([*env, "python -m bench.quality", *args])


def write_doc(r: dict, argv: list[str], doc: Path = DOC) -> None:
    """Replace (or, the first time, add at the end of "## Quality") the section of record
    for this run's kind in `doc`."""
    cpu = cpu_model_name(platform.processor() or platform.machine())
    load = os.getloadavg()[0]
    forced = os.environ.get("PIPELINE_NATIVE_BF16", "")
    native = f"{'native' if r['native_bf16'] else 'no native'} bf16" + (
        f" (PIPELINE_NATIVE_BF16={forced})" if forced in ("0", "1") else ""
    )
    text = [
        heading(r) + "\n",
        f"{r['date']}. Command: `{command(argv)}`. Machine: {cpu}, {os.cpu_count()} cores, "
        f"{native}, amp {r['amp']}, torch {torch.__version__}, load average {load:.1f} at "
        "the end.\n",
        "| split | loss (nats) | perplexity | bits/char | characters |",
        "|---|---:|---:|---:|---:|",
    ]
    for split in ("val", "test"):
        e = r[split]
        text.append(
            f"| {split} | {e['loss']:.4f} | {e['perplexity']:.1f} | {e['bpc']:.3f} | "
            f"{int(e['tokens']):,} |"
        )
    text.append(
        f"\nTrained {r['train_time_s']:.0f} s of a {r['budget_s']:.0f} s budget; the LR "
        f"schedule spanned {r['schedule_steps']} steps and ended at lr {r['last_lr']:.2e}."
    )
    text.append(
        f"\n{r['steps']} steps, {r['chars_seen']:,} training characters seen, "
        f"{r['tokens_per_s']:,.0f} tokens/s at the end, checkpoint `{r['checkpoint']}` "
        f"(step {r['checkpoint_step']}); {r['wall_s']:.0f} s wall in all.\n"
    )
    text.append("Samples (temperature 0.8, top-k 20, seed 0):\n")
    for s in r["samples"]:
        text.append("```\n" + s + "\n```")
    if not doc.exists():
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text("# Benchmarks\n\n## Quality\n", encoding="utf-8")
    replace_section(doc, heading(r), "\n".join(text) + "\n", parent="## Quality")


if __name__ == "__main__":
    sys.exit(main())
