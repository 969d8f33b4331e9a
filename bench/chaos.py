"""A storm of faults in one 2-rank job, and the result bit-identical to the undisturbed run.

    python -m bench.chaos                       # 20 faults, seed 0
    python -m bench.chaos --faults 6 --seed 3   # a failing seed reproduces by its number
    python -m bench.chaos --write               # and its table in docs/benchmarks.md

One job, `torchrun --standalone --nproc_per_node=2 --max-restarts=N+2`, meets N faults drawn
from a seed: SIGKILL of either rank, SIGTERM or SIGUSR1 preemption of either rank, a
transient ENOSPC or EIO at a checkpoint write, a torn checkpoint (rank 0 killed halfway
through writing the file last.pt is to name), a kill during start-up right after the
checkpoint was read. One fault to an attempt (PIPELINE_FAULTS rules name it: `@ATTEMPT`),
each at a step the attempt reaches: the schedule knows where every attempt resumes, and
checks it. The model has dropout and weight drop; periodic checkpoints; every step logged;
wandb offline. At the end, against the same config run without faults:

- the final parameters and optimizer state are bit-identical;
- metrics.jsonl holds each step's train event exactly once, in order, with the same loss,
  and the same validation events; the offline wandb history (every attempt's .wandb file)
  holds the same steps once each, in order, with the same losses;
- best.pt is the undisturbed run's (step, loss, parameters);
- no temporary file is left and every checkpoint on disk loads.

It prints the schedule (attempt, fault, rank, step, where the attempt resumed), each
attempt's exit statuses (a wrapper around each worker records them: `worker` below), the
wall time against the undisturbed run and the first difference if any; exit status 0 when
everything holds, 1 otherwise (the run directories are then kept).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
WRITES = ("enospc", "eio", "torn")  # at the write of a periodic checkpoint, rank 0 (the writer)
PREEMPT = ("sigterm", "sigusr1")
KINDS = ("sigkill", *PREEMPT, *WRITES, "resume_kill")
EVERY = 4  # train.checkpoint_every
EVAL_EVERY = 6  # train.eval_every
WINDOW = 10  # a fault falls within this many steps of where its attempt resumed


def config(steps: int, run_dir: Path) -> list[str]:
    """A small 2-layer LSTM with dropout and weight drop on a slice of the built-in corpus;
    every step logged, a stop check every step, periodic checkpoints, wandb offline."""
    return [
        "data.max_chars=4000",
        "data.newlines=space",
        "data.valid_fraction=0.1",
        "model.kind=lstm",
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.dropout=0.3",
        "model.weight_drop=0.2",
        "train.batch_size=4",
        "train.num_steps=8",
        "train.sampling=consecutive",
        "train.optimizer=adamw",
        "train.lr=0.01",
        "train.clip=1.0",
        "train.epochs=1000",
        f"train.max_steps={steps}",
        f"train.checkpoint_every={EVERY}",
        "train.keep_checkpoints=2",
        "train.log_every=1",
        f"train.eval_every={EVAL_EVERY}",
        "train.signal_check_every=1",
        "train.threads=1",
        "train.dist_timeout=60",
        "generate.prefixes=[分开]",
        "logging.wandb.mode=offline",
        "logging.progress=off",
        f"run.dir={run_dir}",
    ]


# ---------------------------------------------------------------- the schedule


@dataclass
class Fault:
    attempt: int
    kind: str
    rank: int
    step: int  # the step it fires at (0 for resume_kill: start-up)
    resumes: int  # the step this attempt resumes from (0: from scratch)

    def rule(self) -> str:
        return f"{self.kind}:{self.rank}:{self.step}@{self.attempt}"


def next_resume(kind: str, step: int, resumed: int) -> int:
    """Where the attempt after this fault resumes: last.pt's step."""
    if kind == "resume_kill":
        return resumed
    if kind in PREEMPT:  # the stop check after that step (every step) saves it
        return step
    last_periodic = EVERY * ((step - 1) // EVERY)  # before the killed step / the failed write
    return max(resumed, last_periodic)


def schedule(n: int, seed: int, steps: int) -> list[Fault]:
    """n faults, one to an attempt, each at a step its attempt reaches; the kinds in seeded
    blocks that hold each kind once (20 faults: each kind 2 or 3 times). Preemptions keep off
    the last step (the run is done there); write faults fall on a periodic checkpoint."""
    rng = random.Random(seed)
    kinds: list[str] = []
    while len(kinds) < n:  # every kind once in each block of len(KINDS), in a seeded order
        kinds += rng.sample(KINDS, len(KINDS))
    faults, resumed = [], 0
    for attempt, kind in zip(range(n), kinds):
        top = min(resumed + WINDOW, steps)
        if kind in WRITES:
            options = [s for s in range(resumed + 1, top + 1) if s % EVERY == 0]
        elif kind in PREEMPT:
            options = list(range(resumed + 1, top))
        elif kind == "sigkill":
            options = list(range(resumed + 1, top + 1))
        else:
            options = [0]
        if not options:
            kind, options = "resume_kill", [0]
        step = rng.choice(options)
        rank = 0 if kind in WRITES else rng.randrange(2)
        faults.append(Fault(attempt, kind, rank, step, resumed))
        resumed = next_resume(kind, step, resumed)
    return faults


def steps_for(n: int) -> int:
    """Room for n faults (an attempt gains about 2.5 steps on average: write faults and kills
    go back to the last periodic checkpoint), then a stretch without faults."""
    return max(24, EVERY * round(1.25 * n))


# ---------------------------------------------------------------- one job


def worker(exits: str, args: list[str]) -> None:
    """What torchrun starts for each rank: `python -m pipeline ARGS` as a child (it dies with
    this process), the agent's signals forwarded to it, its exit status appended to `exits`
    (a JSON line: attempt, rank, status), and the same status returned."""

    def die_with_parent():
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    began = time.monotonic()
    child = subprocess.Popen([sys.executable, "-m", "pipeline", *args], preexec_fn=die_with_parent)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    code = child.wait()
    line = {
        "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        "rank": int(os.environ.get("RANK", 0)),
        "status": code,
        "seconds": round(time.monotonic() - began, 2),
    }
    with open(exits, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    os._exit(code if code >= 0 else 128 - code)


@dataclass
class Job:
    run_dir: Path
    status: int  # torchrun's
    seconds: float
    cpu_seconds: float  # of torchrun and every worker (user + system)
    load: tuple[float, float]  # the machine's 1-minute load average at the start and the end
    exits: list[dict]  # the workers' records
    log: str


def run_job(root: Path, name: str, steps: int, faults: list[Fault], timeout: float) -> Job:
    run_dir, exits = root / name, root / f"{name}.exits"
    env = dict(os.environ)
    env.update(
        PIPELINE_FAULTS=",".join(f.rule() for f in faults),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        WANDB_DIR=str(root / f"{name}.wandb"),
        WANDB_SILENT="true",
    )
    env.setdefault("PIPELINE_CACHE_DIR", str(root / "cache"))
    (root / f"{name}.wandb").mkdir(parents=True, exist_ok=True)
    cmd = ["timeout", "-k", "10", str(int(timeout)), TORCHRUN, "--standalone"]
    cmd += ["--nproc_per_node=2", f"--max-restarts={len(faults) + 2}", "--monitor-interval=0.1"]
    cmd += ["-m", "bench.chaos", "worker", str(exits), "train", *config(steps, run_dir)]
    began, cpu, load = time.monotonic(), _children_cpu(), os.getloadavg()[0]
    with open(root / f"{name}.log", "w", encoding="utf-8") as log:
        status = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds, cpu = time.monotonic() - began, _children_cpu() - cpu
    records = []
    if exits.exists():
        records = [json.loads(x) for x in exits.read_text(encoding="utf-8").splitlines()]
    text = (root / f"{name}.log").read_text(encoding="utf-8", errors="replace")
    return Job(run_dir, status.returncode, seconds, cpu, (load, os.getloadavg()[0]), records, text)


def _children_cpu() -> float:
    """CPU seconds of the reaped descendants (torchrun reaps its workers, we reap torchrun)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- the checks


def wandb_rows(wandb_dir: Path) -> list[tuple[int, dict]]:
    """(step, values) of every history row of every attempt's .wandb file, attempts in the
    order they started (one wandb run id for the whole job)."""
    from pipeline.tracking.wandb_history import read_records

    def started(path: Path) -> str:
        found = re.search(r"\d{8}_\d{6}", path.parent.name)
        return found.group(0) if found else ""

    rows = []
    for path in sorted(Path(wandb_dir).rglob("run-*.wandb"), key=started):
        for record in read_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            values = {}
            for item in record.history.item:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            rows.append((int(values.pop("_step")), values))
    return rows


def differences(storm: Path, straight: Path, wandb_dir: Path) -> list[str]:
    """What differs between the storm's run directory and the undisturbed one (empty: none),
    the first difference of each check."""
    import torch

    from pipeline.run import checkpoint as ckpt

    found = []

    def state(run_dir: Path, name: str) -> dict | None:
        path = run_dir / "checkpoints" / name
        return torch.load(path, weights_only=True) if path.exists() else None

    a, b = state(straight, "last.pt"), state(storm, "last.pt")
    if b is None:
        return ["the storm left no checkpoints/last.pt"]
    if a["step"] != b["step"]:
        found.append(f"last.pt is step {b['step']}, the undisturbed run's {a['step']}")
    for name, t in ckpt.tensors({"model": a["model"], "optimizer": a["optimizer"]}):
        other = dict(ckpt.tensors({"model": b["model"], "optimizer": b["optimizer"]})).get(name)
        if other is None or not torch.equal(t, other):
            found.append(f"final {name} differs from the undisturbed run's")
            break

    def events(run_dir: Path, key: str) -> list[tuple[int, float]]:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return [(e["step"], e[key]) for e in map(json.loads, lines) if key in e]

    for key in ("train/loss", "val/loss"):
        mine, theirs = events(storm, key), events(straight, key)
        if mine != theirs:
            at = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), None)
            at = min(len(mine), len(theirs)) if at is None else at
            mine_at = mine[at] if at < len(mine) else "nothing"
            theirs_at = theirs[at] if at < len(theirs) else "nothing"
            found.append(
                f"metrics.jsonl {key}: event {at + 1} is {mine_at}, undisturbed {theirs_at} "
                f"({len(mine)} vs {len(theirs)} events)"
            )
    train_steps = [s for s, _ in events(storm, "train/loss")]
    if train_steps != list(range(1, b["step"] + 1)):
        found.append(f"metrics.jsonl train steps are not 1..{b['step']} once each in order")

    rows = wandb_rows(wandb_dir)
    steps = [s for s, _ in rows]
    if steps != sorted(set(steps)):
        dup = next(s for i, s in enumerate(steps) if s in steps[:i] or s < max(steps[:i] or [0]))
        found.append(f"wandb history: step {dup} out of order or twice")
    logged = {s: v for s, v in rows}
    for key in ("train/loss", "val/loss"):
        mine = [(s, v[key]) for s, v in rows if key in v]
        if mine != events(storm, key):
            found.append(f"wandb history {key} disagrees with metrics.jsonl")
    if sorted(logged) != sorted({s for s, _ in events(storm, "train/loss")}):
        found.append("wandb history steps are not metrics.jsonl's steps")

    best, best_straight = state(storm, "best.pt"), state(straight, "best.pt")
    if best_straight is not None:
        if best is None:
            found.append("no best.pt")
        elif (best["step"], best["best_val_loss"]) != (
            best_straight["step"],
            best_straight["best_val_loss"],
        ) or any(not torch.equal(t, best["model"][k]) for k, t in best_straight["model"].items()):
            found.append(
                f"best.pt is step {best['step']} (val loss {best['best_val_loss']}), the "
                f"undisturbed run's step {best_straight['step']} ({best_straight['best_val_loss']})"
            )

    left = [str(p.relative_to(storm)) for p in storm.rglob("*") if p.name.endswith(".tmp")]
    if left:
        found.append(f"temporary files left: {left}")
    for path in sorted((storm / "checkpoints").glob("*.pt")):
        try:
            ckpt.load(path)
        except ckpt.CheckpointError as err:
            found.append(str(err))
    return found


def resumes(log: str, run_dir: Path) -> list[int]:
    """The steps the attempts resumed from, in order (rank 0 prints one line each)."""
    where = re.escape(str(run_dir / "checkpoints"))
    return [int(m) for m in re.findall(rf"resumed from '{where}/[^']+' at step (\d+) ", log)]


def check_attempts(faults: list[Fault], job: Job) -> list[str]:
    """Each fault fired where planned: every attempt resumed at its planned step, and the
    job ended in attempt N with both ranks' status 0."""
    found = []
    planned = [f.resumes for f in faults] + [next_resume_after(faults)]
    expected = [r for r in planned if r > 0]
    got = resumes(job.log, job.run_dir)
    if got != expected:
        found.append(f"attempts resumed at steps {got}, planned {expected}")
    last = [e for e in job.exits if e["attempt"] == len(faults)]
    if sorted(e["status"] for e in last) != [0, 0]:
        found.append(f"attempt {len(faults)} (no fault) ended with {last}")
    return found


def next_resume_after(faults: list[Fault]) -> int:
    if not faults:
        return 0
    f = faults[-1]
    return next_resume(f.kind, f.step, f.resumes)


# ---------------------------------------------------------------- the report


def statuses(job: Job, attempt: int) -> str:
    by_rank = {e["rank"]: e["status"] for e in job.exits if e["attempt"] == attempt}
    return ", ".join(str(by_rank.get(r, "killed by the agent")) for r in (0, 1))


def table(faults: list[Fault], job: Job, seed: int) -> str:
    lines = [
        f"chaos seed {seed}: {len(faults)} faults (PIPELINE_FAULTS rules KIND:RANK:STEP@ATTEMPT)",
        "attempt  fault        rank  step  resumed from  exit status (rank 0, rank 1)",
    ]
    for f in faults:
        step = "start" if f.kind == "resume_kill" else str(f.step)
        lines.append(
            f"{f.attempt:>7}  {f.kind:<11}  {f.rank:>4}  {step:>5}  {f.resumes:>12}  "
            f"{statuses(job, f.attempt)}"
        )
    n = len(faults)
    lines.append(f"{n:>7}  {'(none)':<11}  {'':>4}  {'':>5}  {next_resume_after(faults):>12}  "
                 f"{statuses(job, n)}")  # fmt: skip
    return "\n".join(lines)


def markdown(result: dict) -> str:
    kinds = {k: sum(f["kind"] == k for f in result["faults"]) for k in KINDS}
    rows = "\n".join(f"| {k} | {v} |" for k, v in kinds.items())
    same = "bit-identical" if result["passed"] else "DIFFERENT"
    return f"""## Chaos

`python -m bench.chaos --faults {result["n"]} --seed {result["seed"]}` ({result["date"]},
{result["machine"]}): one 2-rank `torchrun --max-restarts` job of {result["steps"]} steps
(2-layer LSTM 32, dropout 0.3, weight drop 0.2, a checkpoint every {EVERY} steps, every step
logged, wandb offline) under {result["n"]} faults, one to an attempt, against the same config
without faults. Result: **{same}** (final parameters and optimizer state, metrics.jsonl's
train and validation events, the wandb history, best.pt; no temporary file; every checkpoint
loads). What it covers and what it cannot: [faults.md, "The chaos soak"](faults.md).

| fault | count |
|---|---|
{rows}

| | undisturbed | storm |
|---|---|---|
| attempts | 1 | {result["attempts"]} |
| wall time | {result["straight_s"]:.0f} s | {result["storm_s"]:.0f} s |
| overhead | | +{result["storm_s"] - result["straight_s"]:.0f} s, \
{(result["storm_s"] - result["straight_s"]) / max(result["n"], 1):.1f} s a fault |
| CPU time (all processes) | {result["straight_cpu"]:.0f} s | {result["storm_cpu"]:.0f} s |

Wall times are indicative: the machine was shared with other work (load average
{result["load"][0]:.1f} at the storm's start, {result["load"][1]:.1f} at its end, on {os.cpu_count()} cores). The CPU time does not depend on that load: on an idle 2-core machine
the storm's wall time is about its CPU time over 2 (each attempt's two workers start in
parallel). The overhead of a fault is mostly a restart: the agent notices the failure, stops
the other rank, and two new workers import torch, read the prepared data, open wandb and
resume.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        worker(argv[1], argv[2:])
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--faults", type=int, default=20, help="faults in the storm (default 20)")
    p.add_argument("--seed", type=int, default=0, help="the schedule's seed (default 0)")
    p.add_argument("--keep", default="", help="keep the run directories in this folder")
    p.add_argument("--write", action="store_true", help="put the table in docs/benchmarks.md")
    p.add_argument("--timeout", type=float, default=900, help="seconds for the storm's job")
    args = p.parse_args(argv)
    for var, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(var, value)
    os.environ.pop("WANDB_API_KEY", None)

    steps = steps_for(args.faults)
    faults = schedule(args.faults, args.seed, steps)
    root = Path(args.keep or tempfile.mkdtemp(prefix="chaos-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    print(f"chaos: seed {args.seed}, {args.faults} faults, {steps} steps; files in {root}")
    print("PIPELINE_FAULTS=" + ",".join(f.rule() for f in faults), flush=True)

    straight = run_job(root, "straight", steps, [], 300)
    if straight.status != 0:
        print(straight.log[-4000:])
        print(f"the undisturbed run failed (torchrun exit {straight.status}); files in {root}")
        return 1
    storm = run_job(root, "storm", steps, faults, args.timeout)
    print(table(faults, storm, args.seed))
    print(
        f"wall time: undisturbed {straight.seconds:.1f} s, storm {storm.seconds:.1f} s "
        f"(+{storm.seconds - straight.seconds:.1f} s for {len(faults)} faults); CPU time "
        f"{straight.cpu_seconds:.0f} s and {storm.cpu_seconds:.0f} s; load average "
        f"{storm.load[0]:.1f} to {storm.load[1]:.1f} on {os.cpu_count()} cores; torchrun "
        f"exit {storm.status}"
    )
    found = []
    if storm.status != 0:
        found.append(f"the storm's torchrun exited {storm.status}")
    found += check_attempts(faults, storm)
    found += differences(storm.run_dir, straight.run_dir, root / "storm.wandb")
    for line in found:
        print(f"DIFFERENCE: {line}")
    passed = not found
    print(
        f"chaos seed {args.seed}: "
        + ("PASS: bit-identical to the undisturbed run" if passed else f"FAIL; files in {root}")
    )
    if args.write:
        import platform

        from bench.report import replace_section

        result = {
            "n": args.faults,
            "seed": args.seed,
            "steps": steps,
            "faults": [asdict(f) for f in faults],
            "attempts": len({e["attempt"] for e in storm.exits}),
            "straight_s": straight.seconds,
            "storm_s": storm.seconds,
            "straight_cpu": straight.cpu_seconds,
            "storm_cpu": storm.cpu_seconds,
            "load": storm.load,
            "passed": passed,
            "machine": f"{os.cpu_count()} cores ({platform.machine()})",
            "date": time.strftime("%Y-%m-%d"),
        }
        text = markdown(result) + "\n```\n" + table(faults, storm, args.seed) + "\n```\n"
        replace_section(ROOT / "docs" / "benchmarks.md", "## Chaos", text)
    if passed and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
