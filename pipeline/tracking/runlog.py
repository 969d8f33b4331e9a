"""The run's record and its sinks: metrics.jsonl, wandb and the console, fed one event at a
time by the trainer (rank 0 writes; on other ranks every sink is off)."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pipeline import dist
from pipeline.config import Config
from pipeline.model.loss import LN2, perplexity
from pipeline.tracking.metrics import JsonlSink
from pipeline.tracking.progress import Progress
from pipeline.tracking.wandb_sink import WandbSink


@dataclass(frozen=True)
class RunRecord:
    """What the sinks know of the run, decided once at start-up."""

    run_id: str  # the wandb run: one id for every attempt and resume of the job
    world_size: int
    device: str  # cpu | cuda
    precision: str  # the precision actually used (train.amp=auto resolved on this machine)
    precision_choice: dict  # how train.amp resolved (pipeline.training.autoamp.Choice.summary)
    resume_step: int  # the step the run goes on from (0: a fresh start)
    restarted: bool  # an elastic restart of the job
    hold: bool  # periodic checkpoints: wandb events wait for the next one

    @property
    def keep_history(self) -> bool:
        """An elastic restart that found no checkpoint redoes the job from step 0."""
        return self.restarted and self.resume_step == 0


def run_id_for(saved_id: str, run_dir: Path, restarted: bool, is_main: bool) -> str:
    """Collective. The wandb run of this job: the checkpoint's; after an elastic restart that
    found no checkpoint, the one the first attempt wrote to run.dir/run.json; else
    WANDB_RUN_ID (set by `wandb agent` for a sweep's trial) or a new one."""
    path = run_dir / "run.json"
    run_id = saved_id
    if not run_id and restarted and path.is_file():
        run_id = json.loads(path.read_text(encoding="utf-8")).get("wandb_run_id", "")
    if not run_id:
        run_id = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)
    run_id = dist.broadcast_object(run_id)
    if is_main:
        path.write_text(json.dumps({"wandb_run_id": run_id}) + "\n", encoding="utf-8")
    return run_id


class RunLog:
    """The trainer's one handle on the sinks."""

    def __init__(self, cfg: Config, record: RunRecord, is_main: bool, total_steps: int):
        self.record, self.is_main = record, is_main
        self.cdir = Path(cfg.run.dir) / "checkpoints"
        self.last: dict = {}  # the latest value of every key, for the wandb summary
        self.jsonl = self.wandb = None
        if is_main:
            path = Path(cfg.run.dir) / "metrics.jsonl"
            self.jsonl = JsonlSink(path, record.resume_step, record.keep_history)
            self.wandb = WandbSink.open(cfg, record)
            if self.wandb and max(record.resume_step, self.jsonl.logged_through) > 0:
                self.wandb.replay(path, record.run_id)
        mode = cfg.logging.progress if is_main else "off"
        self.console = Progress(mode, total_steps, record.resume_step)

    def log(self, step: int, metrics: dict) -> None:
        """An event: keys starting with `_` stay out; steps the kept history holds are skipped."""
        if not self.is_main or step <= self.jsonl.logged_through:
            return
        event = {"step": step, **{k: v for k, v in metrics.items() if not k.startswith("_")}}
        self.last.update(event)
        self.jsonl.write(event)
        if self.wandb:
            self.wandb.log(event)

    def train(self, step: int, metrics: dict) -> None:
        self.log(step, metrics)
        self.console.update(step, metrics)

    def samples(self, step: int, rows: list[tuple[str, str]]) -> None:
        """Generated text at an evaluation: a list in metrics.jsonl, a wandb.Table."""
        for _, text in rows:
            self.console.write(f" - {text}")
        self.log(step, {"samples": [{"prefix": p, "text": t} for p, t in rows]})

    def best(self, loss: float) -> None:
        """best.pt was written: the wandb summary's best/* follow at once (a killed sweep
        trial keeps its best value)."""
        if self.wandb:
            self.wandb.summarize(best_summary(loss))

    def config_changed(self, train_keys: dict) -> None:
        if self.wandb:
            self.wandb.config_changed({f"train.{k}": v for k, v in train_keys.items()})

    def saved(self, path: Path, step: int) -> None:
        """A checkpoint was written: with log_model=all, a new artifact version."""
        if self.wandb and self.wandb.log_model == "all":
            self.wandb.checkpoint(path, step, "best" if path.name == "best.pt" else "latest")

    def commit(self) -> None:
        """wandb gets the events up to this resumable point (right after last.pt)."""
        if self.wandb:
            self.wandb.commit()

    def finish(self, summary: dict) -> None:
        if not self.is_main:
            return
        self.jsonl.close()
        if self.wandb:
            if self.wandb.log_model == "end":
                for name, alias in (("last.pt", "latest"), ("best.pt", "best")):
                    if (self.cdir / name).is_file():
                        self.wandb.checkpoint(self.cdir / name, summary["final/step"], alias)
            self.wandb.finish(summary, self.last)


def best_summary(loss: float) -> dict:
    """best/val_loss, best/val_perplexity, best/val_bpc of a validation loss."""
    return {
        "best/val_loss": loss,
        "best/val_perplexity": perplexity(loss),
        "best/val_bpc": loss / LN2,
    }
