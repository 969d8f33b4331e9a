"""Render bench/results.json into docs/benchmarks.md.

Only the text between `<!-- bench.run:NAME -->` and `<!-- /bench.run:NAME -->` is regenerated;
everything else in the file (other sections, prose) stays. Other benchmarks replace their own
section with `replace_section` (bench.guard: "## Non-finite guard"; bench.quality: one
"### Quality: ..." section per kind of run): nothing appends to the page, history stays in git.
"""

from __future__ import annotations

import re
from pathlib import Path

SKELETON = """# Benchmarks

The current tables of record, each with the command that reproduces it, the machine and the
date; history stays in git. Regenerate the marked tables with `make bench` (throughput, DDP)
and `python -m bench.run --parity`; they come from `bench/results.json`. Each script replaces
its own section; nothing appends.

## Seed parity

<!-- bench.run:parity -->
<!-- /bench.run:parity -->

## Throughput

### A CPU with native bf16

<!-- bench.run:throughput_native_bf16 -->
<!-- /bench.run:throughput_native_bf16 -->

### A CPU without native bf16

<!-- bench.run:throughput_no_native_bf16 -->
<!-- /bench.run:throughput_no_native_bf16 -->

### Host memory between steps

<!-- bench.run:hostmem -->
<!-- /bench.run:hostmem -->

## DDP scaling

### A CPU with native bf16

<!-- bench.run:ddp_native_bf16 -->
<!-- /bench.run:ddp_native_bf16 -->

### A CPU without native bf16

<!-- bench.run:ddp_no_native_bf16 -->
<!-- /bench.run:ddp_no_native_bf16 -->

## Data path

## Quality

## GPU

`launch/gpu_check.sh` is the prepared check for a lent GPU machine; no run recorded yet.

<!-- bench.run:throughput_cuda -->
<!-- /bench.run:throughput_cuda -->
"""


def _machine(sec: dict) -> str:
    m = sec["machine"]
    note = " (QUICK smoke run: numbers meaningless)" if sec.get("quick") else ""
    gpu = (
        f"GPU {m['gpu']} (CUDA {m['cuda']}, cuDNN {m['cudnn']}); "
        if sec.get("device") == "cuda"
        else ""
    )
    return (
        f"Machine: {gpu}{m['cpu']}, {m['cores']} cores, avx512_bf16={m['avx512_bf16']}, "
        f"AMX={m['amx']}; torch {m['torch']}; load average {m['load_average_at_start']:.1f} "
        f"at start (shared machine). {sec['date']}, `{sec['command']}`{note}.\n"
    )


def _parity(sec: dict) -> str:
    seeds = sec.get("seeds", [0])
    lines = [
        _machine(sec),
        f"Training perplexity at epoch {sec['epochs']} (`train/perplexity` of the last "
        "epoch in metrics.jsonl; each precision of a config run side by side, 1 thread "
        f"each; mean over train.seed {', '.join(map(str, seeds))}). `chapter` is the perplexity "
        "the chapter prints. Targets: within 10% of it, bf16 within 5% of fp32.\n\n",
        "| config | chapter | fp32 | fp32 / chapter | bf16 | bf16 / fp32 | bf16 / fp32 per seed "
        "| s (fp32, bf16) |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in sec["rows"]:
        per = ", ".join(f"{p['bf16'] / p['fp32']:.3f}" for p in r.get("per_seed", []))
        lines.append(
            f"| {r['config']} | {r['chapter']:.2f} | {r['fp32']:.3f} | "
            f"{r['fp32_vs_chapter']:.3f} | {r['bf16']:.3f} | {r['bf16_vs_fp32']:.3f} | "
            f"{per or '-'} | {r['seconds_fp32']:.0f}, {r['seconds_bf16']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _throughput(sec: dict) -> str:
    device = sec.get("device", "cpu")
    peaks = sec.get("peak_gflops") or {}
    lines = [
        _machine(sec),
        f"{device}, {sec['threads']} torch thread(s); {sec['rounds']} alternating rounds of "
        f"{sec['steps_per_round']} minibatches x {sec['tokens_per_step']} tokens per "
        "variant; medians. `wall` is tokens per wall-clock second, `cpu` tokens per CPU "
        "second of the process (insensitive to other jobs taking the cores). "
        "GFLOP/s = tokens/s (wall) x the model's training FLOPs per token "
        "(`pipeline/tracking/flops.py`: 6 x multiply-adds; the seed reference is counted as "
        "the same model)."
        + (
            " `of peak`: that over this machine's matrix-product peak for the row's dtype, "
            "measured in the same run (`bench/peak.py`: "
            + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peaks.items())
            + f" on {sec['threads']} thread(s))."
            if peaks
            else ""
        )
        + "\n\n",
        "| variant | tokens/s wall | x seed | tokens/s cpu | x seed (cpu) | GFLOP/s |"
        + (" of peak |" if peaks else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if peaks else ""),
    ]
    for r in sec["rows"]:
        gflops = f"{r['gflops']:.1f}" if "gflops" in r else "-"
        of_peak = f" {r['of_peak']:.2f} |" if "of_peak" in r else " - |"
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['ratio_vs_seed']:.2f} | "
            f"{r['tokens_per_cpu_s']:,.0f} | {r['cpu_ratio_vs_seed']:.2f} | {gflops} |"
            + (of_peak if peaks else "")
        )
    return "\n".join(lines) + "\n"


def _ddp(sec: dict) -> str:
    layouts = list(sec["rows"][0]["tokens_per_s"]) if sec["rows"] else []
    lines = [
        _machine(sec),
        "Weak scaling on the CPU, 1 torch thread per process: B streams per rank, so 2 ranks "
        "train a global batch of 2B. `2 independent` is two 1-process jobs started together "
        "on the same cores (their tokens/s summed): what the machine gives two of anything. "
        "`2 ranks shm|ddp` is one `torchrun --standalone --nproc_per_node=2` job on gloo with "
        "`dist.grad_sync=shm` (the default here) or `ddp`. tokens/s is the trainer's global "
        f"`perf/tokens_per_s` (median over log intervals of {sec['log_every']} steps, the "
        f"first dropped; {sec['steps']} steps), median over alternating runs; `/ 2x1` divides "
        "by twice the 1-process rate. Target: 2 ranks >= 0.95.\n\n",
        "| model | precision | streams per rank | "
        + " | ".join(f"{k} tokens/s" for k in layouts)
        + " | "
        + " | ".join(f"{k} / 2x1" for k in layouts[1:])
        + " |",
        "|---|---|---:|" + "---:|" * (2 * len(layouts) - 1),
    ]
    for r in sec["rows"]:
        lines.append(
            f"| {r['model']} | {r['amp']} | {r['streams_per_rank']} | "
            + " | ".join(f"{r['tokens_per_s'][k]:,.0f}" for k in layouts)
            + " | "
            + " | ".join(f"{r['vs_twice_one'][k]:.3f}" for k in layouts[1:])
            + " |"
        )
    return "\n".join(lines) + "\n"


def _hostmem(sec: dict) -> str:
    names = list(sec["rows"][0]["settings"]) if sec["rows"] else []
    lines = [
        _machine(sec),
        "One process, 1 torch thread, fp32: `python -m pipeline train` with glibc's malloc "
        "defaults (`PIPELINE_KEEP_FREED_MEMORY=0`) and as it runs by default, freed blocks "
        "kept mapped (`pipeline/training/hostmem.py`), in alternating runs. tokens/s is the "
        f"trainer's `perf/tokens_per_s` (median over log intervals of {sec['log_every']} "
        f"steps, the first dropped; {sec['steps']} steps); faults/step is "
        "`perf/page_faults_per_step` of the last interval; peak RSS the process' peak "
        "resident memory (MiB); medians over runs.\n\n",
        "| model | streams | "
        + " | ".join(f"{n} tokens/s | faults/step | peak RSS" for n in names)
        + " | speed-up |",
        "|---|---:|" + "---:|" * (3 * len(names) + 1),
    ]
    for r in sec["rows"]:
        cells = [
            f"{m['tokens_per_s']:,.0f} | {m['page_faults_per_step']:,.0f} | {m['peak_rss_mib']:,.0f}"
            for m in (r["settings"][n] for n in names)
        ]
        lines.append(
            f"| {r['model']} | {r['streams']} | " + " | ".join(cells) + f" | {r['speedup']:.3f} |"
        )
    return "\n".join(lines) + "\n"


RENDER = {
    "parity": _parity,
    "throughput_native_bf16": _throughput,
    "throughput_no_native_bf16": _throughput,
    "ddp_native_bf16": _ddp,
    "ddp_no_native_bf16": _ddp,
    "hostmem": _hostmem,
    "throughput_cuda": _throughput,
}


def write_docs(results: dict, path: Path) -> None:
    """Replace each marked table that `results` holds. A page without a table's markers is
    an error naming them (nothing is appended at the page's end: add the pair where the table
    belongs, as in SKELETON); the results stay in their JSON file either way."""
    text = path.read_text(encoding="utf-8") if path.exists() else SKELETON
    for name, render in RENDER.items():
        if name not in results:
            continue
        begin, end = f"<!-- bench.run:{name} -->", f"<!-- /bench.run:{name} -->"
        if begin not in text or end not in text:
            raise SystemExit(
                f"{path}: no '{begin}' ... '{end}' pair for the {name} table; add it where "
                "the table belongs (bench/report.py's SKELETON shows where) and rerun "
                "python -m bench.report, or make bench"
            )
        body = render(results[name])
        block = f"{begin}\n{body}{end}"
        text = re.sub(
            re.escape(begin) + r".*?" + re.escape(end), lambda _m, b=block: b, text, flags=re.S
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def summary(results: dict) -> str:
    out = []
    for name, render in RENDER.items():
        if name in results:
            out.append(f"== {name}\n" + render(results[name]))
    return "\n".join(out)


def _headings(lines: list[str]):
    """(index, level, text) of each Markdown heading line (`## x`: level 2), fenced code
    blocks skipped."""
    fence = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            if line[level : level + 1] == " ":
                yield i, level, line.rstrip()


def replace_section(path: Path, head: str, block: str, parent: str | None = None) -> None:
    """Put `block` (starting with the `head` line) in place of the section `head` of `path`:
    from the line that is exactly `head` up to the next heading of its level or above (a
    `## ` section ends at the next `## `, a `### ` one at the next `### ` or `## `). When the
    section is not there yet, the block goes at the end of the section `parent` (a heading
    line) if that is there, else at the end of the file. A rerun replaces, never appends."""
    lines = path.read_text(encoding="utf-8").split("\n")
    new = block.strip("\n").split("\n")
    level = len(head) - len(head.lstrip("#"))
    heads = list(_headings(lines))

    def end_of(n: int, lv: int) -> int:  # the line after section heads[n] (level lv)
        return next((i for i, l2, _ in heads[n + 1 :] if l2 <= lv), len(lines))

    for n, (i, _, text) in enumerate(heads):
        if text == head.rstrip():
            end = end_of(n, level)
            lines[i:end] = new + ([""] if end < len(lines) else [])
            break
    else:
        at = next(
            (end_of(n, lv) for n, (_, lv, text) in enumerate(heads) if parent and text == parent),
            None,
        )
        if at is None or at == len(lines):
            while lines and not lines[-1].strip():
                lines.pop()
            lines += ["", *new]
        else:
            lines[at:at] = ([""] if lines[at - 1].strip() else []) + new + [""]
    text = "\n".join(lines)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def main() -> int:
    """Render bench/results.json into docs/benchmarks.md again (no benchmark runs)."""
    import json

    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "bench" / "results.json").read_text(encoding="utf-8"))
    write_docs(results, root / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
