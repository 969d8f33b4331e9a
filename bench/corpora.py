"""Large corpora on flat memory: synthetic lyric-like corpora of growing size, prepared and
trained on, with each process's peak memory split into what it allocates (RssAnon) and the
file pages it maps (RssFile).

    python -m bench.corpora --sizes 2e7 2e8            # writes its section of docs/benchmarks.md
    python -m bench.corpora --sizes 2e7 2e8 2e9 --work /scratch/corpora

For each size: a local parquet dataset (Zipf-drawn CJK characters in 2000-character
documents, 1% of them for validation; generated once under --work), then
- preparation with data.num_proc 1 and 2 (a fresh cache each): characters/s, peak memory of
  the preparing process and of its workers; beside it the raw read rate (pyarrow reading the
  text column and encoding it, nothing else: the physical limit of a pass over the source);
- a start of a job on the prepared corpus (process start to the first step's line, the
  median of three) and 20 training steps with each sampling: peak memory of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
HEAD = "## Large corpora"
DOC_CHARS = 2000


def generate(folder: Path, chars: int, seed: int = 0) -> Path:
    """A dataset folder with data/train-*.parquet and data/validation-*.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "done.json"
    if done.exists():
        return folder
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    alphabet = np.arange(0x4E00, 0x4E00 + 6000, dtype=np.uint32)  # common CJK block
    docs = max(2, chars // DOC_CHARS)
    n_valid = max(1, docs // 100)
    per_file = 50_000  # documents a parquet file
    written = {"train": 0, "validation": 0}
    for split, count in (("validation", n_valid), ("train", docs - n_valid)):
        for k, lo in enumerate(range(0, count, per_file)):
            n = min(per_file, count - lo)
            ranks = np.minimum(rng.zipf(1.3, size=n * DOC_CHARS), len(alphabet)) - 1
            cps = alphabet[ranks].astype(np.uint32)
            text = cps.tobytes().decode("utf-32-le")
            col = [text[j * DOC_CHARS : (j + 1) * DOC_CHARS] for j in range(n)]
            pq.write_table(pa.table({"text": col}), folder / "data" / f"{split}-{k:05d}.parquet")
            written[split] += n
    done.write_text(json.dumps(written))
    return folder


class Peak:
    """Samples RssAnon and RssFile of a process tree every 20 ms: the peak of each process."""

    def __init__(self, pid: int):
        self.pid, self.peaks, self.stop = pid, {}, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _tree(self) -> list[int]:
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                kids = []
            todo += [int(k) for k in kids]
        return out

    def _run(self):
        while not self.stop:
            for pid in self._tree():
                try:
                    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
                except OSError:
                    continue
                v = {ln.split(":")[0]: int(ln.split()[1]) for ln in lines if ln.startswith("Rss")}
                anon, mapped = v.get("RssAnon", 0) / 1024, v.get("RssFile", 0) / 1024
                a, f = self.peaks.get(pid, (0.0, 0.0))
                self.peaks[pid] = (max(a, anon), max(f, mapped))
            time.sleep(0.02)

    def done(self) -> dict:
        self.stop = True
        self.thread.join()
        main = self.peaks.get(self.pid, (0.0, 0.0))
        workers = [v for k, v in self.peaks.items() if k != self.pid]
        return {
            "anon_mb": round(main[0]),
            "file_mb": round(main[1]),
            "worker_anon_mb": round(max((w[0] for w in workers), default=0.0)),
        }


def run(cmd: list[str], env: dict) -> tuple[dict, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = Peak(proc.pid)
    out = proc.communicate()[0]
    mem = peak.done()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return mem, out, time.perf_counter() - t0


def raw_read_rate(folder: Path) -> float:
    """Characters/s of reading the text column and encoding it (what any pass must do), the
    better of two passes (the first may read the files from disk)."""
    import pyarrow.parquet as pq

    best = 0.0
    for _ in range(2):
        t0, chars = time.perf_counter(), 0
        for f in sorted((folder / "data").glob("*.parquet")):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1000, columns=["text"]):
                text = "".join(batch.column(0).to_pylist())
                np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
                chars += len(text)
        best = max(best, chars / (time.perf_counter() - t0))
    return best


def measure(size: float, work: Path) -> dict:
    chars = int(size)
    folder = generate(work / f"synth-{chars:.0e}".replace("+", ""), chars)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env["HF_HOME"] = str(work / "hf_home")
    data = [
        "data.source=hf",
        f"data.path={folder}",
        "data.test_split=''",
        "data.newlines=keep",
    ]
    py = [sys.executable, "-m", "pipeline"]
    # the dataset's own Arrow cache is built once, outside the timings (load_dataset's job)
    run(
        [*py, "prepare", "--config", "configs/songci.yaml", *data, f"data.cache_dir={work}/warm"],
        env,
    )
    out = {"chars": chars, "raw_chars_per_s": round(raw_read_rate(folder))}
    for nproc in (1, 2):
        cache = work / f"cache-{chars}-{nproc}"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        args = [*py, "prepare", "--config", "configs/songci.yaml", *data]
        mem, log, _ = run([*args, f"data.cache_dir={cache}", f"data.num_proc={nproc}"], env)
        rate = int(log.split("characters/s")[0].rsplit("(", 1)[1].replace(",", ""))
        out[f"prepare_{nproc}"] = {"chars_per_s": rate, **mem}
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone"]
    for sampling in ("random", "consecutive"):
        for nproc in (1, 2):
            launch = py if nproc == 1 else [*torchrun, "--nproc_per_node=2", "-m", "pipeline"]
            args = [*launch, "train", "--config", "configs/songci.yaml", *data]
            args += [f"data.cache_dir={work}/cache-{chars}-1", f"train.sampling={sampling}"]
            args += ["train.max_steps=20", "train.log_every=10", "eval.max_chars=20000"]
            args += ["model.hidden_size=128", "model.num_layers=1", "model.embedding_size=0"]
            args += ["train.batch_size=32", "train.amp=off", "train.device=cpu"]
            args += [f"run.dir={work}/run-{chars}-{sampling}", "train.resume=never"]
            args += ["run.overwrite=true", "logging.progress=lines", "generate.prefixes=[]"]
            mem, log, wall = run(args, env)
            if nproc == 2:  # the agent holds no data: the ranks' peaks are what counts
                mem = {"anon_mb": mem["worker_anon_mb"], "file_mb": None}
            out[f"train_{sampling}" + ("_2" if nproc == 2 else "")] = {
                **mem,
                "wall_s": round(wall, 1),
            }
    # start-up: process start to the first step's line (a job on the prepared corpus)
    args = [
        *py,
        "train",
        "--config",
        "configs/songci.yaml",
        *data,
        f"data.cache_dir={work}/cache-{chars}-1",
    ]
    args += ["train.max_steps=1", "train.log_every=1", "model.hidden_size=32", "model.num_layers=1"]
    args += ["model.embedding_size=0", "train.device=cpu", f"run.dir={work}/start-{chars}"]
    args += ["train.resume=never", "run.overwrite=true", "logging.progress=lines"]
    args += ["eval.max_chars=1000", "generate.prefixes=[]", "train.threads=2", "train.amp=off"]
    starts = []
    for _ in range(3):  # the median of three
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("step 1 "):
                starts.append(time.perf_counter() - t0)
        proc.wait()
    out["startup_s"] = round(sorted(starts)[len(starts) // 2], 2)
    return out


def table(results: list[dict]) -> str:
    rows = [
        "| characters | raw read (chars/s) | prepare, 1 process: chars/s, RssAnon / RssFile MB "
        "| prepare, 2 processes: chars/s, RssAnon (worker) MB | train random, 1 process: "
        "RssAnon / RssFile MB (2 ranks: RssAnon a rank) | train consecutive, likewise "
        "| start-up s |",
        "|---:|---:|---|---|---|---|---:|",
    ]
    for r in results:
        p1, p2 = r["prepare_1"], r["prepare_2"]
        train = [
            f"{r[k]['anon_mb']} / {r[k]['file_mb']} ({r[k + '_2']['anon_mb']})"
            for k in ("train_random", "train_consecutive")
        ]
        rows.append(
            f"| {r['chars']:.0e} | {r['raw_chars_per_s']:,} | {p1['chars_per_s']:,}: "
            f"{p1['anon_mb']} / {p1['file_mb']} | {p2['chars_per_s']:,}: {p2['anon_mb']} "
            f"({p2['worker_anon_mb']}) | {train[0]} | {train[1]} | {r.get('startup_s', '?')} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[2e7, 2e8])
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "corpora"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        results.append(measure(size, work))
        print(json.dumps(results[-1]), flush=True)
    from bench.report import replace_section
    from bench.run import machine

    m = machine()
    bf16 = "native bf16" if m["avx512_bf16"] or m["amx"] else "no native bf16"
    machine_line = f"{m['cpu']}, {m['cores']} cores, {bf16}, torch {m['torch']}"
    block = (
        f"{HEAD}\n\nCommand: `python -m bench.corpora --sizes "
        f"{' '.join(f'{s:.0e}' for s in args.sizes)}` ({time.strftime('%Y-%m-%d')}; "
        f"{machine_line}). Peak memory of the process (and of its preparation workers), "
        f"sampled every 20 ms: RssAnon is what it allocates, RssFile the file pages it maps "
        f"(the memory-mapped corpus; the kernel reclaims them).\n\n{table(results)}\n"
    )
    print(block)
    if not args.no_write:
        replace_section(DOC, HEAD, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
