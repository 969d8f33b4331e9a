"""Metrics: device-side accumulation, cross-rank reduction, and rank-0 sinks.

Every event goes to `metrics.jsonl` in the run directory (one JSON object per line with
`step`); wandb gets the same events when enabled (imported lazily, rank 0 only). Console
output is a tqdm bar on a TTY, else one plain line per log interval.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import dist

LN2 = math.log(2.0)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


class TrainAccumulator:
    """Sums kept on the device between log intervals (no host sync or host-to-device copy
    per step); token and step counts are known on the host and alike on every rank (each
    trains batch_size / world_size streams of num_steps)."""

    def __init__(self, device: torch.device):
        # loss*tokens, grad-norm sum (finite steps), clipped steps, skipped (non-finite) steps
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.tokens = 0
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int, norm: torch.Tensor, clip: float) -> None:
        finite = torch.isfinite(norm)
        clipped = (norm > clip) if clip > 0 else torch.zeros_like(finite)
        self.sums += torch.stack(
            [
                loss.double() * tokens,
                torch.where(finite, norm, 0).double(),
                clipped.double(),
                (~finite).double(),
            ]
        )
        self.tokens += tokens
        self.steps += 1

    def reduce(self, world_size: int) -> dict:
        """Collective: every rank calls it at the same step. The norm and the skip are the
        same on every rank (clipping sees the all-reduced gradients), so their sums are
        divided by the world size."""
        loss_tok, norm, clipped, skipped = dist.all_reduce_sum(self.sums).tolist()
        tokens, steps = self.tokens * world_size, self.steps
        norm, clipped, skipped = norm / world_size, clipped / world_size, skipped / world_size
        elapsed = time.perf_counter() - self.t0
        loss = loss_tok / max(tokens, 1)
        out = {
            "train/loss": loss,
            "train/perplexity": perplexity(loss),
            "train/bpc": loss / LN2,
            "opt/grad_norm": norm / max(steps - skipped, 1),
            "opt/clipped": clipped / max(steps, 1),
            "opt/nonfinite_steps": skipped,
            "perf/tokens_per_s": tokens / max(elapsed, 1e-9),
            "_tokens": tokens,
        }
        self.tokens = self.steps = 0
        self.sums.zero_()
        self.t0 = time.perf_counter()
        return out


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


class Progress:
    def __init__(self, mode: str, total: int, initial: int):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(
                ppl=f"{metrics['train/perplexity']:.2f}",
                tok_s=f"{metrics['perf/tokens_per_s']:.0f}",
                refresh=True,
            )
        elif self.mode == "lines":
            self.write(
                f"step {step} epoch {metrics.get('epoch', 0)}: train perplexity "
                f"{metrics['train/perplexity']:.3f}, loss {metrics['train/loss']:.4f}, "
                f"grad norm {metrics['opt/grad_norm']:.3g}, "
                f"{metrics['perf/tokens_per_s']:.0f} tokens/s"
            )

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def write(self, line: str) -> None:
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunLogger:
    """Rank-0 sinks: metrics.jsonl always, wandb when enabled. Other ranks get a no-op.

    Resume consistency: a resumed run restarts at its checkpoint's step, so events logged
    after that checkpoint are logged again. metrics.jsonl is truncated to the step. wandb
    history cannot be truncated (offline runs are separate files joined at `wandb sync`;
    online, steps below the run's current step are dropped), so while periodic checkpoints
    are on (`hold=True`), wandb events wait here until `commit()` is called right after
    `checkpoints/last.pt` is written: a kill during the save leaves them unsent (the resume
    redoes their steps), a kill between the save and the send loses them from wandb only
    (the resumed run re-sends them from metrics.jsonl). Without periodic checkpoints the
    only resume points are the final/preemption saves, after every event, so events go
    straight through. An elastic restart that found no checkpoint (`keep_history=True`)
    redoes the job from step 0 exactly as before: the history is kept and the steps it
    already holds are not logged twice.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg,
        cfg_dict: dict,
        world_size: int,
        device: torch.device,
        run_id: str,
        resume_step: int,
        enabled: bool,
        hold: bool = False,
        keep_history: bool = False,
        amp: str = "",
    ):
        self.enabled = enabled
        self.wandb = None
        self.hold = hold
        self.pending: list[tuple[int, dict]] = []
        self.last: dict = {}
        self.logged_through = 0  # steps the kept history already holds
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        if keep_history and self.path.exists():
            truncate_jsonl(self.path, math.inf)  # drops only a torn last line
            self.logged_through = max((e["step"] for e in read_jsonl(self.path)), default=0)
        else:
            truncate_jsonl(self.path, resume_step)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._init_wandb(cfg, cfg_dict, world_size, device, run_id, amp)
        if self.wandb is not None and max(resume_step, self.logged_through) > 0:
            self._replay(run_id)

    def _init_wandb(self, cfg, cfg_dict, world_size, device, run_id, amp_used):
        from .config import flatten

        w = cfg.logging.wandb
        mode = wandb_mode(w.mode)
        if mode == "disabled":
            return
        import wandb

        from .provenance import provenance

        # WANDB_DIR wins when set (clusters point it at scratch); else the run directory.
        root = Path(os.environ.get("WANDB_DIR") or Path(cfg.run.dir).resolve())
        root.mkdir(parents=True, exist_ok=True)  # wandb falls back to /tmp if it is missing
        amp = amp_used or cfg_dict["train"]["amp"]  # the precision used (auto resolved)
        tags = list(w.tags) or [
            cfg.model.kind,
            cfg.train.sampling,
            f"world{world_size}",
            f"amp-{amp}",
            device.type,
        ]
        config = flatten(cfg_dict)
        config.update(provenance(world_size), amp_used=amp)
        self.wandb = wandb.init(
            project=w.project,
            entity=w.entity or None,
            name=w.name or cfg.run.name,
            group=w.group or cfg.run.name,
            tags=tags,
            notes=w.notes or None,
            config=config,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(root),
            settings=wandb.Settings(console="off", silent=True),
        )
        # x axis: the global step (wandb's _step) by default; characters seen as an option.
        self.wandb.define_metric("train/chars")
        self.wandb.define_metric("*", step_metric="train/chars", step_sync=True)

    def _replay(self, run_id: str) -> None:
        """Re-send the events up to the checkpoint that the killed attempt's wandb lost (its
        .wandb file is flushed only every 15 s; online, the file stream also lags)."""
        from .wandb_history import offline_last_step

        if self.wandb.offline:
            sync_dir = Path(self.wandb.settings.sync_dir)
            synced = offline_last_step(sync_dir.parent, run_id, exclude=sync_dir)
        else:
            synced = max(self.wandb.starting_step - 1, 0)
        for event in read_jsonl(self.path):  # already truncated to the checkpoint's step
            if event["step"] > synced:
                self._to_wandb(event["step"], self._wandb_values(event))
        self.commit()

    def _wandb_values(self, event: dict) -> dict:
        out = {
            k: v
            for k, v in event.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if "samples" in event:
            import wandb

            out["samples"] = wandb.Table(
                columns=["step", "prefix", "text"],
                data=[[event["step"], r["prefix"], r["text"]] for r in event["samples"]],
            )
        return out

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled or step <= self.logged_through:
            return
        event = {"step": step, **{k: v for k, v in metrics.items() if not k.startswith("_")}}
        self.last.update(event)
        self._append((json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8"))
        if self.wandb is not None:
            self._to_wandb(step, self._wandb_values(event))

    def _append(self, line: bytes) -> None:
        """One whole line or none: a write cut short (a full disk) is taken back, so
        metrics.jsonl stays valid JSON lines."""
        size = os.fstat(self.fd).st_size
        try:
            done = 0
            while done < len(line):
                done += os.write(self.fd, line[done:])
        except OSError as err:
            os.ftruncate(self.fd, size)
            from .checkpoint import DiskFull

            raise DiskFull(
                f"disk full: appending to '{self.path}' failed ({err.strerror or err}); "
                f"the file keeps every whole line written before"
            ) from None

    def samples(self, step: int, rows: list[tuple[str, str]]) -> None:
        """Generated text at an evaluation: a wandb.Table, and a list in metrics.jsonl."""
        self.log(step, {"samples": [{"prefix": p, "text": t} for p, t in rows]})

    def _to_wandb(self, step: int, data: dict) -> None:
        if self.wandb is None or not data:
            return
        self.pending.append((step, data))
        if not self.hold:
            self.commit()

    def commit(self) -> None:
        """Send held events to wandb; call right after writing a resumable checkpoint."""
        if self.wandb is None or not self.pending:
            return
        last = len(self.pending) - 1
        for i, (step, data) in enumerate(self.pending):
            # Held: close the last row now (commit=True), so that a kill after the checkpoint
            # cannot lose the row of the checkpoint's own step.
            self.wandb.log(data, step=step, commit=True if self.hold and i == last else None)
        self.pending.clear()

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        os.close(self.fd)
        if self.wandb is not None:
            self.commit()
            for k, v in summary.items():
                self.wandb.summary[k] = v
            for k in ("train/perplexity", "val/perplexity", "val/bpc", "train/loss", "val/loss"):
                if k in self.last:
                    self.wandb.summary[k] = self.last[k]
            self.wandb.finish()


def truncate_jsonl(path: Path, resume_step: int) -> None:
    """On resume, drop events after the checkpoint's step: they are logged again, and the
    history stays strictly increasing without duplicates."""
    if not path.exists():
        return
    if resume_step <= 0:
        path.unlink()
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= resume_step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a killed writer
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
    return out
