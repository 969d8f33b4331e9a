"""The Weights & Biases sink (rank 0; wandb imported only when enabled).

Resume consistency: a resumed run restarts at its checkpoint's step, so the events logged
after that checkpoint are logged again. wandb history cannot be cut back (offline runs are
separate files joined at `wandb sync`; online, steps below the run's current step are
dropped), so while periodic checkpoints are on (`hold`), events wait here until `commit()`
is called right after `checkpoints/last.pt` is written: a kill during the save leaves them
unsent (the resume redoes their steps), a kill between the save and the send loses them from
wandb only (the resumed run re-sends them from metrics.jsonl: `replay`). Without periodic
checkpoints the only resume points are the final and preemption saves, after every event, so
events go straight through.

Checkpoints as artifacts (`logging.wandb.log_model`): `all` logs each periodic checkpoint as
a new version of the run's `model-<run id>` artifact (type `model`) with alias `latest`, and
each best.pt with alias `best`; `end` logs last.pt and best.pt when the run ends. The files
are copied into wandb's staging folder when logged (so pruning a step file later breaks
nothing), and that folder is under `run.dir/wandb-data/` unless WANDB_DATA_DIR says
otherwise: an offline run keeps them beside its checkpoints for `wandb sync`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from pipeline.config import Config, flatten, to_dict
from pipeline.tracking.metrics import read_jsonl

SUMMARY_KEYS = ("train/perplexity", "val/perplexity", "val/bpc", "train/loss", "val/loss")


def wandb_mode(requested: str) -> str:
    """`auto`: online with credentials, else offline (the main job never needs an account)."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def provenance(world_size: int) -> dict:
    """Where a run came from (versions, the git commit), for comparing runs."""
    return {
        "world_size": world_size,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "git_commit": git_commit(),
    }


class WandbSink:
    def __init__(self, run, hold: bool, log_model: str = "off"):
        self.run = run
        self.hold = hold
        self.log_model = log_model
        self.data_dir = ""
        self.pending: list[tuple[int, dict]] = []

    @classmethod
    def open(cls, cfg: Config, record) -> WandbSink | None:
        """The run's wandb run (resumed by id), or None when wandb is disabled."""
        w = cfg.logging.wandb
        mode = wandb_mode(w.mode)
        if mode == "disabled":
            return None
        import wandb

        # WANDB_DIR wins when set (clusters point it at scratch); else the run directory.
        root = Path(os.environ.get("WANDB_DIR") or Path(cfg.run.dir).resolve())
        root.mkdir(parents=True, exist_ok=True)  # wandb falls back to /tmp if it is missing
        tags = list(w.tags) or [
            cfg.model.kind,
            cfg.train.sampling,
            f"world{record.world_size}",
            f"amp-{record.precision}",
            record.device,
        ]
        config = flatten(to_dict(cfg))
        config.update(provenance(record.world_size), amp_used=record.precision)
        config.update(record.precision_choice)  # train.amp=auto: timings, kept or measured
        run = wandb.init(
            project=w.project,
            entity=w.entity or None,
            name=w.name or cfg.run.name,
            group=w.group or cfg.run.name,
            tags=tags,
            notes=w.notes or None,
            config=config,
            id=record.run_id,
            resume="allow",
            mode=mode,
            dir=str(root),
            settings=wandb.Settings(console="off", silent=True),
        )
        # x axis: the global step (wandb's _step) by default; characters seen as an option.
        run.define_metric("train/chars")
        run.define_metric("*", step_metric="train/chars", step_sync=True)
        sink = cls(run, hold=record.hold, log_model=w.log_model)
        # staged artifact files: beside the checkpoints, unless WANDB_DATA_DIR says otherwise
        sink.data_dir = os.environ.get("WANDB_DATA_DIR") or str(
            Path(cfg.run.dir).resolve() / "wandb-data"
        )
        return sink

    def replay(self, jsonl: Path, run_id: str) -> None:
        """Re-send the events up to the checkpoint that the killed attempt's wandb lost (its
        .wandb file is flushed only every 15 s; online, the file stream also lags)."""
        from pipeline.tracking.wandb_history import offline_last_step

        if self.run.offline:
            sync_dir = Path(self.run.settings.sync_dir)
            synced = offline_last_step(sync_dir.parent, run_id, exclude=sync_dir)
        else:
            synced = max(self.run.starting_step - 1, 0)
        for event in read_jsonl(jsonl):  # already cut back to the checkpoint's step
            if event["step"] > synced:
                self.log(event)
        self.commit()

    def log(self, event: dict) -> None:
        """An event as metrics.jsonl holds it: its numbers, and samples as a wandb.Table."""
        data = {
            k: v
            for k, v in event.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if "samples" in event:
            import wandb

            data["samples"] = wandb.Table(
                columns=["step", "prefix", "text"],
                data=[[event["step"], r["prefix"], r["text"]] for r in event["samples"]],
            )
        if not data:
            return
        self.pending.append((event["step"], data))
        if not self.hold:
            self.commit()

    def commit(self) -> None:
        """Send held events; call right after writing a resumable checkpoint."""
        if not self.pending:
            return
        last = len(self.pending) - 1
        for i, (step, data) in enumerate(self.pending):
            # Held: close the last row now (commit=True), so that a kill after the checkpoint
            # cannot lose the row of the checkpoint's own step.
            self.run.log(data, step=step, commit=True if self.hold and i == last else None)
        self.pending.clear()

    def summarize(self, values: dict) -> None:
        """Summary values that hold while the run lives (best/*: each time best.pt is written)."""
        for k, v in values.items():
            self.run.summary[k] = v

    def config_changed(self, values: dict) -> None:
        """Config keys a time-budget plan changed (train.schedule_steps, ...)."""
        self.run.config.update(values, allow_val_change=True)

    def checkpoint(self, path: Path, step: int, alias: str) -> None:
        """`path` as a new version of the run's model artifact, with `alias`."""
        import wandb

        art = wandb.Artifact(f"model-{self.run.id}", type="model", metadata={"step": step})
        before = os.environ.get("WANDB_DATA_DIR")
        os.environ["WANDB_DATA_DIR"] = self.data_dir  # wandb stages the copy there, now
        try:
            art.add_file(str(path), name="checkpoint.pt", skip_cache=True)
        finally:
            if before is None:
                del os.environ["WANDB_DATA_DIR"]
        self.run.log_artifact(art, aliases=[alias])

    def finish(self, summary: dict, last: dict) -> None:
        self.commit()
        for k, v in summary.items():
            self.run.summary[k] = v
        for k in SUMMARY_KEYS:
            if k in last:
                self.run.summary[k] = last[k]
        self.run.finish()
