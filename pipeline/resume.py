"""Where a run goes on from: train.resume (auto | never | a path), the checkpoint loaded into
the model, optimizer and scaler, and this rank's share of the saved position."""

from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt
from . import dist
from .config import Config, ConfigError
from .state import TrainState


def find(cfg: Config, run_dir: Path, is_main: bool, log) -> tuple[Path, dict] | None:
    """Collective (a barrier after train.resume=never's clean-up). The checkpoint
    train.resume names (auto: the newest that loads), or None."""
    mode = cfg.train.resume
    if is_main and mode == "never" and cfg.run.overwrite:
        for p in ckpt.candidates(run_dir) + [ckpt.checkpoint_dir(run_dir) / "best.pt"]:
            p.unlink(missing_ok=True)
    dist.barrier()
    if mode == "never":
        existing = ckpt.candidates(run_dir) + [p for p in [run_dir / "metrics.jsonl"] if p.exists()]
        if existing and not cfg.run.overwrite:
            raise ConfigError(
                f"run directory '{run_dir}' already holds a run "
                f"({existing[0].name}); with train.resume=never set "
                f"run.overwrite=true to replace it, or choose another run.dir"
            )
        return None
    if mode == "auto":
        return ckpt.load_latest_good(run_dir, warn=log)
    return Path(mode), ckpt.load(mode)


def load_into(saved: dict, model, optimizer, scaler) -> None:
    """The saved parameters, optimizer state and loss scale; the optimizer keeps THIS run's
    kernels (fused or not: the amp mode may differ from the saved run's)."""
    model.load_state_dict(saved["model"])
    fused = [group.get("fused") for group in optimizer.param_groups]
    optimizer.load_state_dict(saved["optimizer"])
    for group, f in zip(optimizer.param_groups, fused):
        group["fused"] = f
    if saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])


def position(saved: dict, path: Path, rank: int, streams, device) -> TrainState:
    """This rank's TrainState; the saved position must exist in today's data (data.* may
    change on resume, the number of minibatches an epoch may not shrink below it)."""
    state = TrainState.from_checkpoint(saved, rank, streams.b, device)
    random = saved["config"]["train"]["sampling"] == "random"
    if random and state.batch and saved.get("format", 1) < ckpt.RANDOM_ORDER_SINCE:
        raise ckpt.CheckpointError(
            f"checkpoint '{path}' (format {saved.get('format', 1)}) stopped inside epoch "
            f"{state.epoch} of random sampling, whose window order changed in format "
            f"{ckpt.RANDOM_ORDER_SINCE}: going on would repeat and skip windows; resume it with "
            f"the version that wrote it, or from a checkpoint at an epoch's end, or use "
            f"train.resume=never"
        )
    if state.batch >= streams.epoch_size:
        raise ckpt.CheckpointError(
            f"checkpoint '{path}' stopped after minibatch {state.batch} of epoch "
            f"{state.epoch}, but the training data now gives {streams.epoch_size} "
            f"minibatches an epoch: the corpus changed; use another run.dir or "
            f"train.resume=never"
        )
    return state
