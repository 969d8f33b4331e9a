"""Where a run goes on from: train.resume (auto | never | a path), the checkpoint loaded into
the model, optimizer and scaler, and this rank's share of the saved position."""

from __future__ import annotations

from pathlib import Path

from pipeline import dist
from pipeline.config import Config, ConfigError
from pipeline.run import checkpoint as ckpt
from pipeline.training import optim as optim_mod
from pipeline.training.state import TrainState


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


# Optimizers whose state (moments, step counts) carries over between them.
STATE_FAMILY = {"sgd": "sgd", "adam": "adam", "adamw": "adam"}
# train.* keys that shape the optimizer besides its kind (lr follows the schedule each step).
OPTIMIZER_KEYS = ("weight_decay", "weight_decay_params", "betas")
LEGACY = {"weight_decay_params": "all"}  # what checkpoints from before a key did


def check_agreed(found: tuple[Path, dict] | None, run_dir: Path) -> None:
    """Collective: every rank goes on from the same checkpoint file and step (each rank
    loads it itself), else ConfigError (exit 2) naming the ranks and the run directory."""
    mine = (str(found[0]), found[1]["step"]) if found else (None, 0)
    views = dist.all_gather_object(mine)
    if len(set(views)) > 1:
        said = "; ".join(
            f"rank {r}: {f'{p} at step {s}' if p else 'no checkpoint'}"
            for r, (p, s) in enumerate(views)
        )
        raise ConfigError(
            f"ranks disagree on the checkpoint to resume in run directory '{run_dir}' ({said}); "
            f"every rank must read the same run.dir and train.resume"
        )


def load_into(saved: dict, model, optimizer, scaler, tcfg, log) -> None:
    """The saved parameters, optimizer state and loss scale, into THIS run's objects: the
    optimizer keeps this run's settings (train.weight_decay, betas, its kernels: fused or not,
    the amp mode may differ) and takes the saved moments where its kind keeps them; every
    change is said in one line."""
    model.load_state_dict(saved["model"])
    was = {**LEGACY, **saved["config"]["train"]}
    if STATE_FAMILY[was["optimizer"]] != STATE_FAMILY[tcfg.optimizer]:
        log(
            f"warning: the checkpoint was trained with train.optimizer={was['optimizer']}, this "
            f"run uses {tcfg.optimizer}: its state (moments) cannot carry over, so the "
            f"{tcfg.optimizer} optimizer starts fresh from the saved parameters"
        )
    else:
        order = optim_mod.param_groups(model, was["weight_decay"], was["weight_decay_params"])
        optimizer.load_state_dict(relaid(saved["optimizer"], order, optimizer))
        changed = [
            f"train.{k}={getattr(tcfg, k)!r} (was {was[k]!r})"
            for k in ("optimizer", *OPTIMIZER_KEYS)
            if _plain(was.get(k)) != _plain(getattr(tcfg, k))
        ]
        if changed:
            log(f"resume: applying {', '.join(changed)}; the saved moments carry over")
    if saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def relaid(saved_opt: dict, saved_groups: list[dict], optimizer) -> dict:
    """A saved optimizer state laid out for `optimizer`: each parameter's state found by the
    parameter itself (`saved_groups`: the saved run's groups, in its numbering), numbered
    and grouped as `optimizer` numbers them, under `optimizer`'s own settings. Loading it
    then puts every tensor on its parameter's device, step counts included, as this run's
    kernels want them (fused: float32 on the device, also from a format-1 checkpoint)."""
    saved_order = [p for g in saved_groups for p in g["params"]]
    by_param = {saved_order[int(i)]: st for i, st in saved_opt["state"].items()}
    state, groups, n = {}, [], 0
    for group in optimizer.param_groups:
        ids = []
        for p in group["params"]:
            if p in by_param:
                state[n] = by_param[p]
            ids.append(n)
            n += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def position(saved: dict, path: Path, rank: int, streams, device, seed: int) -> TrainState:
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
    was_seed = saved["config"]["train"].get("seed", 0)
    if random and state.batch and was_seed != seed:
        raise ckpt.CheckpointError(
            f"checkpoint '{path}' stopped inside epoch {state.epoch} of random sampling with "
            f"train.seed={was_seed}; the seed orders the windows, so train.seed={seed} would "
            f"repeat and skip windows of this epoch: resume with train.seed={was_seed} (the "
            f"seed may change at an epoch's end), or use train.resume=never"
        )
    if state.batch >= streams.epoch_size:
        raise ckpt.CheckpointError(
            f"checkpoint '{path}' stopped after minibatch {state.batch} of epoch "
            f"{state.epoch}, but the training data now gives {streams.epoch_size} "
            f"minibatches an epoch: the corpus changed; use another run.dir or "
            f"train.resume=never"
        )
    return state
