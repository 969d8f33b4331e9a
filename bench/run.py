"""Benchmarks against the chapter's code: throughput, DDP weak scaling, seed parity.

    make bench                                   # = python -m bench.run: throughput + DDP
    python -m bench.run --quick                  # smoke test (seconds, numbers meaningless)
    python -m bench.run --parity                 # the three seed configs, 250 epochs, fp32+bf16
    python -m bench.run --compile                # add torch.compile rows

Throughput variants run in ONE process, in alternating rounds (every round visits every
variant for the same number of minibatches), so that load from other processes on the machine
hits all of them alike; we report per-variant medians over rounds and ratios to the seed
reference. Each variant keeps training across rounds (no restart cost in the numbers).
Tokens/s is given twice: wall clock (what a user waits for) and per CPU-second of this
process (process_time; robust when other jobs share the cores, since time spent waiting for
a core is not counted). Results go to bench/results.json (sections merged, so --parity does
not erase the throughput numbers) and to the marked tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PIPELINE_DATA_DIR", str(ROOT.parent / "shared" / "data"))

from bench import peak, report  # noqa: E402
from bench.seed_reference import SeedTrainer  # noqa: E402
from pipeline import config as config_mod  # noqa: E402
from pipeline.data.corpus import load_corpus  # noqa: E402
from pipeline.data.streams import make_train_streams  # noqa: E402
from pipeline.model.rnn import build_model, detach_state  # noqa: E402
from pipeline.tracking.flops import tail_shares, train_flops_per_token  # noqa: E402
from pipeline.tracking.metrics import TrainAccumulator, read_jsonl  # noqa: E402
from pipeline.training import hostmem  # noqa: E402
from pipeline.training.optim import build_optimizer, lr_at  # noqa: E402
from pipeline.training.precision import Amp, cpu_has_native_bf16  # noqa: E402
from pipeline.training.step import train_step  # noqa: E402

RESULTS = ROOT / "bench" / "results.json"
DOCS = ROOT / "docs" / "benchmarks.md"
CHAPTER_PPL = {"seed_scratch_random": 1.32, "seed_scratch_consecutive": 1.18, "seed_concise": 1.03}


# ---------------------------------------------------------------- variants


class PipelineVariant:
    """The body of pipeline.training.trainer's loop (state carry, lr, train_step, device-side metrics),
    in-process on one config, so rounds can alternate with other variants."""

    def __init__(self, config: str, overrides: list[str], device: str = "cpu"):
        cfg = config_mod.load(str(ROOT / config), overrides)
        self.tcfg = t = cfg.train
        self.device = torch.device(device)
        corpus = load_corpus(cfg.data)
        self.streams = make_train_streams(
            corpus.splits["train"], t.sampling, t.batch_size, t.num_steps, 0, 1, self.device, t.seed
        )
        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model, len(corpus.vocab)).to(self.device)
        self.params = list(self.model.parameters())
        self.train_model = torch.compile(self.model) if t.compile else self.model
        self.amp = Amp(t.amp, self.device)
        self.optimizer = build_optimizer(t, self.model)
        self.acc = TrainAccumulator(self.device)
        self.i, self.step_no, self.hidden = 0, 0, None
        self.flops_per_token = train_flops_per_token(
            self.model, tail_shares(self.model, self.streams)
        )
        self.dtype = "fp32" if self.amp.mode == "off" else self.amp.mode

    def step(self) -> int:
        s, t = self.streams, self.tcfg
        if self.i == 0 or t.sampling == "random":
            self.hidden = self.model.init_state(s.b, self.device)
        else:
            self.hidden = detach_state(self.hidden)
        x_BT, y_BT = s.batch(0, self.i)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(t, self.step_no, 10**9)
        loss, norm, self.hidden = train_step(
            self.train_model, self.params, x_BT, y_BT, self.hidden, self.optimizer, self.amp, t.clip
        )
        self.acc.add(loss, x_BT.numel(), norm, t.clip)
        self.i = (self.i + 1) % s.epoch_size
        self.step_no += 1
        return x_BT.numel()

    def sync(self) -> dict:
        return self.acc.reduce(1)  # the log-interval read: the only host sync


class SeedVariant:
    dtype = "fp32"

    def __init__(self, device: str = "cpu"):
        self.trainer = SeedTrainer(device)
        # the same model as rnn_scratch, counted alike (its one-hot product is extra work the
        # count leaves out, as it leaves out the gather that replaces it)
        h, v = self.trainer.num_hiddens, self.trainer.vocab_size
        self.flops_per_token = 6.0 * (h * h + h * v)

    def step(self) -> int:
        return self.trainer.step()

    def sync(self) -> dict:
        return {}


SCRATCH = "configs/seed_scratch_consecutive.yaml"
CONCISE = "configs/seed_concise.yaml"


def variants(args) -> dict:
    rows = {"seed reference (chapter loop, fp32)": SeedVariant}
    amps = args.amps
    for amp in amps:
        name = "fp32" if amp == "off" else amp
        rows[f"rnn_scratch {name}"] = (SCRATCH, [f"train.amp={amp}"])
        if args.compile:
            rows[f"rnn_scratch {name} compiled"] = (
                SCRATCH,
                [f"train.amp={amp}", "train.compile=true"],
            )
    for kind in ("rnn", "gru", "lstm"):
        for amp in amps:
            rows[f"{kind} {'fp32' if amp == 'off' else amp}"] = (
                CONCISE,
                [f"model.kind={kind}", f"train.amp={amp}"],
            )
    return rows


def build(spec, device: str):
    return spec(device) if callable(spec) else PipelineVariant(*spec, device=device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def throughput(args) -> dict:
    torch.set_num_threads(args.threads)
    peaks = {} if args.device == "cuda" else peak.measure(args.threads)  # GFLOP/s, same run
    specs = variants(args)
    runners = {}
    for name, spec in specs.items():
        runners[name] = build(spec, args.device)
        for _ in range(args.warmup):  # first calls: allocator, oneDNN primitives, compile
            runners[name].step()
        runners[name].sync()
    wall = {n: [] for n in runners}
    cpu = {n: [] for n in runners}
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            run = runners[name]
            _sync(args.device)
            w0, c0, tokens = time.perf_counter(), time.process_time(), 0
            for _ in range(args.steps):
                tokens += run.step()
            run.sync()
            _sync(args.device)
            wall[name].append(tokens / (time.perf_counter() - w0))
            cpu[name].append(tokens / (time.process_time() - c0))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    seed = next(iter(runners))
    med_w = {n: statistics.median(v) for n, v in wall.items()}
    med_c = {n: statistics.median(v) for n, v in cpu.items()}
    rows = [
        {
            "variant": n,
            "tokens_per_s": med_w[n],
            "tokens_per_cpu_s": med_c[n],
            "ratio_vs_seed": med_w[n] / med_w[seed],
            "cpu_ratio_vs_seed": med_c[n] / med_c[seed],
            "rounds_tokens_per_s": wall[n],
            "dtype": runners[n].dtype,
            "gflops": med_w[n] * runners[n].flops_per_token / 1e9,
        }
        for n in runners
    ]
    for row in rows:
        if row["dtype"] in peaks:
            row["of_peak"] = row["gflops"] / peaks[row["dtype"]]
    return {
        "peak_gflops": peaks,
        "device": args.device,
        "threads": args.threads,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "tokens_per_step": 32 * 35,
        "rows": rows,
    }


# ---------------------------------------------------------------- DDP weak scaling

MAIN_JOB = "configs/jaychou.yaml"
# name -> (config, overrides, streams per rank): the chapter's model on the whole corpus, and
# the main job's LSTM (dropout 0.5, AdamW) with its global batch on every rank
DDP_MODELS = {
    "rnn_scratch": (SCRATCH, ["data.max_chars=0"], 32),
    "lstm (main job)": (MAIN_JOB, [], 16),
}
# what runs side by side: one process; two independent processes on the same cores (the
# machine's own limit for two of anything); two ranks, each gradient sync
DDP_LAYOUTS = ("1 process", "2 independent", "2 ranks shm", "2 ranks ddp")


def _train_cmd(config: str, overrides: list[str], run_dir: Path, streams: int, args, amp: str):
    return [
        "-m",
        "pipeline",
        "train",
        "--config",
        config,
        *overrides,
        f"run.dir={run_dir}",
        "train.resume=never",
        "run.overwrite=true",
        f"train.batch_size={streams}",
        f"train.max_steps={args.ddp_steps}",
        "train.epochs=100000",
        "train.eval_every=1000000",  # no validation inside the timed intervals
        "train.checkpoint_every=0",
        f"train.log_every={args.ddp_log_every}",
        "train.threads=1",
        f"train.amp={amp}",
        "eval.max_chars=2000",
        "generate.prefixes=[]",
        "logging.progress=off",
        "logging.wandb.mode=disabled",
    ]


def _interval_rate(run_dir: Path) -> float:
    """The trainer's global `perf/tokens_per_s`: median over log intervals, the first (which
    holds the warm-up) dropped."""
    rates = [
        e["perf/tokens_per_s"]
        for e in read_jsonl(run_dir / "metrics.jsonl")
        if "perf/tokens_per_s" in e
    ]
    return statistics.median(rates[1:] or rates)


def layout_tokens_per_s(layout: str, model: str, amp: str, args, tmp: Path) -> float:
    """Global tokens/s of one layout: torchrun for ranks, plain processes otherwise (two
    started together for `2 independent`, their rates summed)."""
    config, overrides, per_rank = DDP_MODELS[model]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    jobs = []
    if layout.startswith("2 ranks"):
        sync = layout.split()[-1]
        run_dir = tmp / "ranks"
        cmd = [torchrun, "--standalone", "--nproc_per_node=2"]
        cmd += _train_cmd(config, overrides, run_dir, 2 * per_rank, args, amp)
        jobs.append((cmd + [f"dist.grad_sync={sync}"], run_dir))
    else:
        for i in range(1 if layout == "1 process" else 2):
            run_dir = tmp / f"proc{i}"
            jobs.append(
                (
                    [sys.executable, *_train_cmd(config, overrides, run_dir, per_rank, args, amp)],
                    run_dir,
                )
            )
    procs = [
        subprocess.Popen(["timeout", "-k", "10", "900", *cmd], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for cmd, _ in jobs
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{layout} {model} failed ({proc.returncode}):\n{err[-3000:]}")
    return sum(_interval_rate(run_dir) for _, run_dir in jobs)


def ddp_scaling(args) -> dict:
    """Per model and precision, every layout in alternating rounds; medians."""
    out = {"steps": args.ddp_steps, "log_every": args.ddp_log_every, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for model in DDP_MODELS:
            for amp in args.amps:
                rates = {layout: [] for layout in DDP_LAYOUTS}
                for r in range(args.ddp_rounds):
                    order = DDP_LAYOUTS if r % 2 == 0 else tuple(reversed(DDP_LAYOUTS))
                    for layout in order:
                        rate = layout_tokens_per_s(layout, model, amp, args, Path(tmp))
                        rates[layout].append(rate)
                med = {layout: statistics.median(v) for layout, v in rates.items()}
                one = med["1 process"]
                out["rows"].append(
                    {
                        "model": model,
                        "amp": "fp32" if amp == "off" else amp,
                        "streams_per_rank": DDP_MODELS[model][2],
                        "tokens_per_s": med,
                        "vs_twice_one": {
                            k: v / (2 * one) for k, v in med.items() if k != "1 process"
                        },
                        "rounds": rates,
                    }
                )
                print(
                    f"DDP {model} {amp}: "
                    + ", ".join(f"{k} {v:,.0f}" for k, v in med.items())
                    + " tokens/s",
                    flush=True,
                )
    return out


# ---------------------------------------------------------------- host memory between steps

# name -> (config, overrides, streams): models whose steps free blocks of many MB
HOSTMEM_MODELS = {
    "rnn_scratch, whole corpus": (SCRATCH, ["data.max_chars=0"], 32),
    "lstm (main job)": (MAIN_JOB, [], 16),
    "songci_cpu": ("configs/songci_cpu.yaml", [], 128),
}
HOSTMEM_SETTINGS = {"glibc defaults": "0", "freed memory kept": "1"}  # PIPELINE_KEEP_FREED_MEMORY


def _one_process(config, overrides, streams, args, keep: str, run_dir: Path) -> dict:
    cmd = [sys.executable, *_train_cmd(config, overrides, run_dir, streams, args, "off")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_KEEP_FREED_MEMORY": keep}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(["timeout", "-k", "10", "900", *cmd], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)  # the process' own peak resident memory
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{config} failed ({proc.returncode}):\n{err.read()[-3000:]}")
    events = [e for e in read_jsonl(run_dir / "metrics.jsonl") if "perf/page_faults_per_step" in e]
    return {
        "tokens_per_s": _interval_rate(run_dir),
        "page_faults_per_step": events[-1]["perf/page_faults_per_step"],
        "peak_rss_mib": usage.ru_maxrss / 1024,
    }


def host_memory(args) -> dict:
    """One process per run, glibc's defaults against `python -m pipeline`'s (freed blocks
    kept mapped), alternating; medians over rounds."""
    out = {"steps": args.ddp_steps, "log_every": args.ddp_log_every, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for model, (config, overrides, streams) in HOSTMEM_MODELS.items():
            runs = {name: [] for name in HOSTMEM_SETTINGS}
            for r in range(args.hostmem_rounds):
                order = list(HOSTMEM_SETTINGS)[:: 1 if r % 2 == 0 else -1]
                for name in order:
                    keep = HOSTMEM_SETTINGS[name]
                    runs[name].append(
                        _one_process(config, overrides, streams, args, keep, Path(tmp) / "run")
                    )
            med = {
                name: {k: statistics.median(x[k] for x in v) for k in v[0]}
                for name, v in runs.items()
            }
            kept, glibc = med["freed memory kept"], med["glibc defaults"]
            out["rows"].append(
                {
                    "model": model,
                    "streams": streams,
                    "settings": med,
                    "speedup": kept["tokens_per_s"] / glibc["tokens_per_s"],
                    "rounds": runs,
                }
            )
            print(f"host memory {model}: " + ", ".join(f"{k} {v}" for k, v in med.items()))
    return out


# ---------------------------------------------------------------- seed parity


def _parity_pair(name: str, seed: int, epochs: int, tmp: Path) -> dict:
    """fp32 and bf16 of one config and seed run side by side (1 thread each): amp ->
    (final epoch's training perplexity, epochs, seconds)."""
    procs = {}
    for amp in ("off", "bf16"):
        run_dir = tmp / f"{name}_{seed}_{amp}"
        cmd = [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            "--config",
            f"configs/{name}.yaml",
            f"run.dir={run_dir}",
            "train.resume=never",
            "run.overwrite=true",
            f"train.epochs={epochs}",
            f"train.amp={amp}",
            f"train.seed={seed}",
            "train.threads=1",
            "logging.progress=off",
            "generate.prefixes=[]",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        log = open(f"{run_dir}.log", "w")  # a file, not a pipe: polling cannot block
        procs[amp] = (
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
            run_dir,
            time.perf_counter(),
        )
        log.close()
    ppl, ended = {}, {}
    while len(ended) < len(procs):  # poll, so each run's own duration is recorded
        for amp, (proc, _, t0) in procs.items():
            if amp not in ended and proc.poll() is not None:
                ended[amp] = time.perf_counter() - t0
        time.sleep(0.2)
    for amp, (proc, run_dir, _) in procs.items():
        text = Path(f"{run_dir}.log").read_text(errors="replace")
        if proc.returncode:
            raise RuntimeError(f"{name} amp={amp} seed={seed} failed:\n{text[-3000:]}")
        events = [e for e in read_jsonl(run_dir / "metrics.jsonl") if "train/perplexity" in e]
        ppl[amp] = (events[-1]["train/perplexity"], events[-1]["epoch"], ended[amp])
    return ppl


def parity(args) -> dict:
    """Per config and seed, fp32 and bf16 side by side; means over the seeds."""
    epochs = args.parity_epochs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in CHAPTER_PPL:
            runs = {seed: _parity_pair(name, seed, epochs, Path(tmp)) for seed in args.parity_seeds}
            fp32 = statistics.mean(r["off"][0] for r in runs.values())
            bf16 = statistics.mean(r["bf16"][0] for r in runs.values())
            rows.append(
                {
                    "config": name,
                    "epochs": runs[args.parity_seeds[0]]["off"][1],
                    "chapter": CHAPTER_PPL[name],
                    "fp32": fp32,
                    "bf16": bf16,
                    "fp32_vs_chapter": fp32 / CHAPTER_PPL[name],
                    "bf16_vs_fp32": bf16 / fp32,
                    "seconds_fp32": statistics.mean(r["off"][2] for r in runs.values()),
                    "seconds_bf16": statistics.mean(r["bf16"][2] for r in runs.values()),
                    "per_seed": [
                        {"seed": seed, "fp32": r["off"][0], "bf16": r["bf16"][0]}
                        for seed, r in runs.items()
                    ],
                }
            )
            print(
                f"{name}: fp32 {fp32:.3f}, bf16 {bf16:.3f} (chapter {CHAPTER_PPL[name]}; "
                f"seeds {args.parity_seeds})",
                flush=True,
            )
    return {"epochs": epochs, "threads_per_run": 1, "seeds": args.parity_seeds, "rows": rows}


# ---------------------------------------------------------------- main


def machine() -> dict:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    info = {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags,
        "load_average_at_start": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info.update(
            gpu=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="throughput, DDP scaling and seed parity")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (numbers meaningless)")
    ap.add_argument("--parity", action="store_true", help="only the seed-parity runs")
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows")
    ap.add_argument("--no-ddp", action="store_true")
    ap.add_argument("--no-hostmem", action="store_true", help="skip the host-memory rows")
    ap.add_argument(
        "--bf16",
        choices=["auto", "yes", "no"],
        default="auto",
        help="bf16 rows: auto = where the CPU has native bf16 (emulated bf16 runs ~50x slower)",
    )
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=8, help="minibatches per variant per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="throughput rows only (cuda adds fp16 rows)",
    )
    ap.add_argument("--ddp-rounds", type=int, default=5)
    ap.add_argument("--hostmem-rounds", type=int, default=3)
    ap.add_argument("--ddp-steps", type=int, default=120)
    ap.add_argument("--ddp-log-every", type=int, default=20)
    ap.add_argument("--parity-epochs", type=int, default=250)
    ap.add_argument(
        "--parity-seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[0],
        help="train.seed values, comma-separated; the table shows means over them",
    )
    ap.add_argument("--results", help="default bench/results.json (--quick: bench/out/)")
    ap.add_argument("--docs", help="default docs/benchmarks.md (--quick: bench/out/)")
    args = ap.parse_args(argv)
    hostmem.keep_freed_memory()  # as `python -m pipeline` does for the whole process
    bf16 = args.bf16 == "yes" or (
        args.bf16 == "auto" and (args.device == "cuda" or cpu_has_native_bf16())
    )
    args.amps = ("off", "bf16") if bf16 else ("off",)
    if args.device == "cuda":
        args.amps += ("fp16",)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 1, 1
        args.ddp_rounds, args.ddp_steps, args.ddp_log_every = 1, 4, 2
        args.hostmem_rounds = 1
        args.parity_epochs = 2
    out = ROOT / "bench" / "out"  # a smoke run never overwrites the recorded numbers
    args.results = args.results or str(out / "results_quick.json" if args.quick else RESULTS)
    args.docs = args.docs or str(out / "benchmarks_quick.md" if args.quick else DOCS)

    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    section = {
        "machine": machine(),
        "command": command.strip(),
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if args.parity:
        results["parity"] = {**section, **parity(args)}
    else:
        # one table per kind of CPU: with native bf16 (AMX or AVX512-BF16) and without
        kind = "native_bf16" if cpu_has_native_bf16() else "no_native_bf16"
        key = f"throughput_{kind}" if args.device == "cpu" else "throughput_cuda"
        results[key] = {**section, **throughput(args)}
        if not args.no_ddp:
            results[f"ddp_{kind}"] = {**section, **ddp_scaling(args)}
        if not args.no_hostmem and args.device == "cpu":
            results["hostmem"] = {**section, **host_memory(args)}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    report.write_docs(results, Path(args.docs))
    print(report.summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
