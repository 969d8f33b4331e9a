"""Data-path benchmark for Hugging Face corpora (issue 7): preparation, memory, step speed.

    .venv/bin/python bench/data_bench.py                 # about 5 minutes on 2 idle cores
    .venv/bin/python bench/data_bench.py --quick         # smoke test (numbers meaningless)

1. Preparation of $PIPELINE_DATA_DIR/poetry (20M characters): the first `load_dataset`
   (parquet -> Arrow) plus tokenization, tokenization alone with data.num_proc 1 and 2, and
   a reuse of the cache; characters/s and the peak resident memory of the preparing process.
2. Peak resident memory per rank while 2 torchrun ranks train the same model on songci
   (2.8M characters) and on poetry (20M): VmHWM, and the private (RssAnon) and file-backed
   (RssFile: pages of the memory-mapped ids) parts at the end. Prepared beforehand.
3. Training tokens/s on poetry (memory-mapped, batches sliced per step) vs jaychou (in memory)
   for the same model, the vocabulary capped to jaychou's size so the output layer is the
   same: one process, variants alternating in rounds so that load from other processes hits
   all alike; medians over rounds. Plus the batch fetch alone (streams.batch) per variant.

Everything runs in a temporary HF_HOME and prepared-data cache. Prints markdown tables and
writes bench/data_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PIPELINE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
RESULTS = ROOT / "bench" / "data_results.json"
QUIET = ["logging.wandb.mode=disabled", "logging.progress=off", "generate.prefixes=[]"]


# ---------------------------------------------------------------- the probe (child processes)


def proc_status() -> dict:
    """This process' memory from /proc/self/status, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def probe(out_dir: str, argv: list[str]) -> int:
    """`python -m pipeline ARGV` in this process, then its rank's memory to OUT/rank<r>.json."""
    from pipeline.__main__ import main

    t0 = time.perf_counter()
    rc = main(argv)
    status = {"seconds": time.perf_counter() - t0, "rc": rc, **proc_status()}
    rank = os.environ.get("RANK", "0")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(status))
    return rc


def run_probe(out: Path, argv: list[str], env: dict, nproc: int = 0) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    launcher = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc else [PY]
    cmd = ["timeout", "-k", "10", "1200", *launcher, __file__, "--probe", str(out), "--", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


# ---------------------------------------------------------------- 1. preparation


def prepared_meta(cache: Path) -> dict:
    (folder,) = (cache / "hf").iterdir()
    return json.loads((folder / "meta.json").read_text(encoding="utf-8"))


def bench_prepare(work: Path, env: dict, extra: list[str]) -> dict:
    rows = {}
    base = ["prepare", "--config", "configs/poetry.yaml", *extra]
    for label, num_proc, cache in [
        ("first load (parquet -> Arrow) + tokenize, num_proc 1", 1, "c1"),
        ("tokenize, num_proc 2", 2, "c2"),
        ("reuse the cache (sha256 check, no tokenization)", 1, "c1"),
    ]:
        (st,) = run_probe(
            work / f"prep-{cache}-{num_proc}-{len(rows)}",
            [*base, f"data.num_proc={num_proc}", f"data.cache_dir={work / cache}"],
            env,
        )
        meta = prepared_meta(work / cache)
        chars = sum(s["length"] for s in meta["splits"].values())
        row = {"seconds_in_process": st["seconds"], "peak_rss_mib": st["VmHWM"], "chars": chars}
        if "reuse" not in label:
            row.update(
                tokenize_seconds=meta["build"]["seconds"], chars_per_s=meta["build"]["chars_per_s"]
            )
        rows[label] = row
        print(f"prepare: {label}: {row}", flush=True)
    rows["vocab"] = len(meta["vocab"])
    return rows


# ---------------------------------------------------------------- 2. memory per rank

# The model both measurements train: a 2-layer LSTM, batch 32 x 64, consecutive streams.
LSTM_256 = [
    "model.kind=lstm",
    "model.hidden_size=256",
    "model.embedding_size=128",
    "model.num_layers=2",
    "model.tie_weights=false",  # the GPU recipes tie (embedding = hidden); this model does not
    "train.batch_size=32",
    "train.num_steps=64",
    "train.sampling=consecutive",
]


def bench_memory(work: Path, env: dict, steps: int, extra: list[str]) -> dict:
    common = [
        *LSTM_256,
        f"train.max_steps={steps}",
        "train.amp=off",
        "train.time_limit=0",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.log_every=0",
        "data.max_vocab=4000",
        "data.valid_split=''",
        "data.test_split=''",
        "data.num_proc=2",
        f"data.cache_dir={work / 'cache-mem'}",
        *QUIET,
        *extra,
    ]
    rows = {}
    for name in ("songci", "poetry"):
        args = ["--config", f"configs/{name}.yaml", *common]
        run_probe(work / f"mem-prep-{name}", ["prepare", *args], env)  # not part of the numbers
        ranks = run_probe(
            work / f"mem-{name}",
            ["train", *args, f"run.dir={work / ('run-' + name)}"],
            env,
            nproc=2,
        )
        rows[name] = [{k: round(r[k], 1) for k in ("VmHWM", "RssAnon", "RssFile")} for r in ranks]
        print(f"memory: {name}: {rows[name]}", flush=True)
    return rows


# ---------------------------------------------------------------- 3. step speed


class Variant:
    """pipeline.train's step body on one corpus, in this process (rounds alternate)."""

    def __init__(self, corpus, model_cfg, tcfg):
        import torch

        from pipeline.amp import Amp
        from pipeline.metrics import TrainAccumulator
        from pipeline.model import build_model
        from pipeline.optim import build_optimizer
        from pipeline.streams import make_train_streams

        self.t = tcfg
        self.streams = make_train_streams(
            corpus.splits["train"],
            tcfg.sampling,
            tcfg.batch_size,
            tcfg.num_steps,
            0,
            1,
            torch.device("cpu"),
            tcfg.seed,
        )
        torch.manual_seed(0)
        self.model = build_model(model_cfg, len(corpus.vocab))
        self.params = list(self.model.parameters())
        self.opt = build_optimizer(tcfg, self.model)
        self.amp = Amp(tcfg.amp, torch.device("cpu"))
        self.acc = TrainAccumulator(torch.device("cpu"))
        self.i, self.hidden = 0, None

    def step(self) -> None:
        from pipeline.model import detach_state
        from pipeline.step import train_step

        s = self.streams
        self.hidden = (
            self.model.init_state(s.b, "cpu") if self.i == 0 else detach_state(self.hidden)
        )
        x, y = s.batch(0, self.i)
        loss, norm, self.hidden = train_step(
            self.model, self.params, x, y, self.hidden, self.opt, self.amp, self.t.clip
        )
        self.acc.add(loss, x.numel(), norm, self.t.clip)
        self.i = (self.i + 1) % s.epoch_size

    def fetch_us(self, n: int) -> float:
        """Microseconds per streams.batch call (the data path alone), over n minibatches."""
        t0 = time.perf_counter()
        for i in range(n):
            self.streams.batch(0, i % self.streams.epoch_size)
        return (time.perf_counter() - t0) / n * 1e6


def bench_speed(work: Path, rounds: int, steps: int, threads: int, extra: list[str]) -> dict:
    import numpy as np
    import torch

    from pipeline import config as config_mod
    from pipeline.corpus import load_corpus
    from pipeline.data import Corpus

    torch.set_num_threads(threads)
    model = [
        *LSTM_256,
        "train.optimizer=adamw",
        "train.lr=0.002",
        "train.clip=1.0",
        "train.amp=off",
    ]
    jay_cfg = config_mod.load(str(ROOT / "configs/jaychou.yaml"), model)
    jay = load_corpus(jay_cfg.data)
    poetry_cfg = config_mod.load(
        str(ROOT / "configs/poetry.yaml"),
        [
            *model,
            f"data.max_vocab={len(jay.vocab)}",
            "data.num_proc=2",
            f"data.cache_dir={work / 'cache-speed'}",
            *extra,
        ],
    )
    poetry = load_corpus(poetry_cfg.data)
    assert len(poetry.vocab) == len(jay.vocab)
    in_ram = Corpus(poetry.vocab, {"train": np.array(poetry.splits["train"])})
    variants = {
        "jaychou (in memory)": Variant(jay, jay_cfg.model, jay_cfg.train),
        "poetry (memory-mapped)": Variant(poetry, poetry_cfg.model, poetry_cfg.train),
        "poetry (copied into memory)": Variant(in_ram, poetry_cfg.model, poetry_cfg.train),
    }
    for v in variants.values():  # warm-up: allocator, oneDNN primitives
        for _ in range(3):
            v.step()
        v.acc.reduce(1)
    tok_s = {n: [] for n in variants}
    tok_cpu_s = {n: [] for n in variants}
    for _ in range(rounds):
        for name, v in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                v.step()
            out = v.acc.reduce(1)  # the host sync
            tok_s[name].append(out["_tokens"] / (time.perf_counter() - t0))
            tok_cpu_s[name].append(out["_tokens"] / (time.process_time() - c0))
    rows = {}
    for name, v in variants.items():
        rows[name] = {
            "tokens_per_s_median": round(statistics.median(tok_s[name])),
            "tokens_per_cpu_s_median": round(statistics.median(tok_cpu_s[name])),
            "rounds": [round(x) for x in tok_s[name]],
            "batch_fetch_us": round(v.fetch_us(200), 1),
            "lazy": v.streams.lazy,
        }
        print(f"speed: {name}: {rows[name]}", flush=True)
    return {"vocab": len(jay.vocab), "threads": threads, "rows": rows}


# ---------------------------------------------------------------- report


def markdown(res: dict) -> str:
    lines = [
        "### Preparation of poetry (Hugging Face datasets -> memory-mapped ids)",
        "",
        "| step | seconds (tokenize) | seconds (in process) | characters/s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in res["prepare"].items():
        if label != "vocab":
            cps = f"{r['chars_per_s']:,}" if "chars_per_s" in r else "-"
            lines.append(
                f"| {label} | {r.get('tokenize_seconds', '-')} | "
                f"{r['seconds_in_process']:.1f} | {cps} | {r['peak_rss_mib']:.0f} |"
            )
    lines += [
        "",
        "### Resident memory per rank, 2 ranks training the same model (MiB)",
        "",
        "| corpus | rank | peak (VmHWM) | private (RssAnon) | mapped ids etc. (RssFile) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ranks in res["memory"].items():
        for r, m in enumerate(ranks):
            lines.append(
                f"| {name} | {r} | {m['VmHWM']:.0f} | {m['RssAnon']:.0f} | {m['RssFile']:.0f} |"
            )
    sp = res["speed"]
    lines += [
        "",
        f"### Training tokens/s, same model (vocabulary {sp['vocab']}), one process, "
        f"torch threads: {sp['threads']}",
        "",
        "| corpus | tokens/s (wall, median) | tokens per CPU-second (median) | batch fetch µs |",
        "|---|---:|---:|---:|",
    ]
    for name, r in sp["rows"].items():
        lines.append(
            f"| {name} | {r['tokens_per_s_median']:,} | {r['tokens_per_cpu_s_median']:,} "
            f"| {r['batch_fetch_us']} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--probe":
        sys.exit(probe(sys.argv[2], sys.argv[4:]))
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=30, help="training steps of the memory runs")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--round-steps", type=int, default=8)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the speed part "
        "(1: CPU-seconds then measure the work, whatever else runs on the machine)",
    )
    p.add_argument(
        "--parts",
        default="prepare,memory,speed",
        help="comma-separated; results merge into bench/data_results.json",
    )
    args = p.parse_args()
    extra = ["data.max_chars=200000"] if args.quick else []
    if args.quick:
        args.steps, args.rounds, args.round_steps = 4, 2, 2
    with tempfile.TemporaryDirectory(prefix="data_bench.") as tmp:
        work = Path(tmp)
        os.environ["HF_HOME"] = str(work / "hf")
        os.environ["PIPELINE_CACHE_DIR"] = str(work / "cache")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        parts = args.parts.split(",")
        res = json.loads(RESULTS.read_text()) if RESULTS.exists() and not args.quick else {}
        if "prepare" in parts:
            res["prepare"] = bench_prepare(work, env, extra)
        if "memory" in parts:
            res["memory"] = bench_memory(work, env, args.steps, extra)
        if "speed" in parts:
            res["speed"] = bench_speed(work, args.rounds, args.round_steps, args.threads, extra)
    res["load_average"] = os.getloadavg()
    res["cpus"] = os.cpu_count()
    if not args.quick:
        RESULTS.write_text(json.dumps(res, indent=1))
    if all(k in res for k in ("prepare", "memory", "speed")):
        print(markdown(res))
    print(f"\nload average at the end: {res['load_average']}")


if __name__ == "__main__":
    main()
