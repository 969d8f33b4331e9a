"""Compare runs offline from their run directories (no wandb account needed).

    python -m pipeline compare runs/a runs/b [--plot compare.png]

Prints the config keys that differ between the runs and, per run, best and final
validation perplexity, throughput, wall time and world size; writes a PNG of perplexity
against step and against wall time. Reads only `metrics.jsonl` and `config.yaml`.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from pipeline.config import flatten
from pipeline.tracking.metrics import read_jsonl

IGNORED_KEYS = ("run.dir",)  # differs by construction


class CompareError(ValueError):
    pass


def load_run(path: str) -> dict:
    run_dir = Path(path)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise CompareError(f"'{path}' is not a run directory: it has no metrics.jsonl")
    config = {}
    if (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        config = flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))
    events = read_jsonl(metrics)
    return {
        "name": run_dir.resolve().name,
        "path": str(run_dir),
        "config": config,
        "train": [e for e in events if "train/perplexity" in e],
        "val": [e for e in events if "val/perplexity" in e],
    }


def summarize(run: dict) -> dict:
    train, val = run["train"], run["val"]
    times = [e["time/elapsed_s"] for e in train + val if "time/elapsed_s" in e]
    speeds = [e["perf/tokens_per_s"] for e in train if "perf/tokens_per_s" in e]
    return {
        "best val perplexity": min((e["val/perplexity"] for e in val), default=None),
        "final val perplexity": val[-1]["val/perplexity"] if val else None,
        "final train perplexity": train[-1]["train/perplexity"] if train else None,
        "steps": max((e["step"] for e in train + val), default=0),
        "tokens/s (median)": statistics.median(speeds) if speeds else None,
        "wall time (s)": max(times) if times else None,
        "world size": train[-1].get("world_size") if train else None,
    }


def config_differences(runs: list[dict]) -> dict[str, list]:
    keys = sorted(set().union(*(r["config"] for r in runs)) - set(IGNORED_KEYS))
    out = {}
    for key in keys:
        values = [r["config"].get(key, "-") for r in runs]
        if any(v != values[0] for v in values):
            out[key] = values
    return out


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def format_table(runs: list[dict]) -> str:
    rows: list[tuple[str, list[str]]] = [("run", [r["name"] for r in runs])]
    diffs = config_differences(runs)
    rows.append(("config differences" if diffs else "config differences: none", []))
    rows += [(f"  {k}", [_cell(v) for v in vs]) for k, vs in diffs.items()]
    rows.append(("results", []))
    summaries = [summarize(r) for r in runs]
    rows += [(f"  {k}", [_cell(s[k]) for s in summaries]) for k in summaries[0]]
    width0 = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows if cells) for i in range(len(runs))]
    lines = []
    for label, cells in rows:
        line = label.ljust(width0)
        if cells:
            line += "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths))
        lines.append(line.rstrip())
    return "\n".join(lines)


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for kind, style in (("train", "-"), ("val", "--")):
            events = run[kind]
            if not events:
                continue
            key = f"{kind}/perplexity"
            marker = "o" if kind == "val" else None
            label = f"{run['name']} ({'validation' if kind == 'val' else kind})"
            for ax, x_key in ((by_step, "step"), (by_time, "time/elapsed_s")):
                points = [e for e in events if x_key in e]
                ax.plot(
                    [e[x_key] for e in points],
                    [e[key] for e in points],
                    style,
                    color=color,
                    marker=marker,
                    markersize=3,
                    label=label,
                )
    for ax, xlabel in ((by_step, "step"), (by_time, "wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 340, not 3.4x10^2
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.grid(True, which="both", alpha=0.3)
    by_step.set_title("perplexity vs step")
    by_time.set_title("perplexity vs wall time")
    by_step.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(paths: list[str], plot_path: str) -> int:
    try:
        runs = [load_run(p) for p in paths]
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    names = [r["name"] for r in runs]
    for r in runs:  # same directory names in different places: label by path
        if names.count(r["name"]) > 1:
            r["name"] = r["path"]
    print(format_table(runs))
    plot(runs, plot_path)
    print(f"plot: {plot_path}")
    return 0
