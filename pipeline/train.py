"""The training loop, top to bottom: the only module that knows the order of things.

    python -m pipeline train --config configs/jaychou.yaml [key=value ...]
    torchrun --standalone --nproc_per_node=2 -m pipeline train --config configs/jaychou.yaml

One step: minibatch of this rank's streams -> forward (autocast) -> mean cross-entropy ->
backward (DDP all-reduces, i.e. averages, the gradients) -> unscale (fp16) -> clip by the
global norm of the all-reduced gradients (identical on every rank) -> optimizer step.
"""

from __future__ import annotations

import math
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from . import config as config_mod
from . import dist
from .amp import Amp
from .config import Config, ConfigError
from .corpus import load_corpus
from .generate import PrefixError, generate
from .loss import cross_entropy
from .metrics import LN2, Progress, RunLogger, TrainAccumulator, perplexity
from .model import State, build_model, detach_state
from .streams import IGNORE, EvalStreams, make_train_streams
from .vocab import Vocab

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved after SIGTERM/SIGUSR1; launch/slurm.sbatch requeues


class Preempted(Exception):
    pass


# ---------------------------------------------------------------- optimisation pieces


def build_optimizer(cfg, model: torch.nn.Module, amp_mode: str = "off") -> torch.optim.Optimizer:
    """fp16 takes the fused kernels: GradScaler then hands them found_inf on the device
    (the step is skipped inside the kernel) instead of reading it with .item() every step."""
    params = list(model.parameters())
    fused = {"fused": True} if amp_mode == "fp16" else {}
    if cfg.optimizer == "sgd":  # the chapter's d2l.sgd: p -= lr * grad
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **fused)


def lr_at(cfg, step: int, total_steps: int) -> float:
    """Linear warmup, then constant or cosine decay to lr * min_lr_ratio; a pure function of
    the step, so resuming needs no scheduler state."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps:
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    )


def schedule_steps(tcfg, epoch_size: int) -> int:
    """Steps the LR schedule spans: its own key, so that a run stopped by train.max_steps and
    continued with a larger one can keep one cosine curve (set it to the final length)."""
    return tcfg.schedule_steps or tcfg.max_steps or tcfg.epochs * epoch_size


def warn_schedule_change(saved_train: dict, tcfg, epoch_size: int, log) -> None:
    """Resuming under another cosine length changes the LR from here on: allowed, not silent."""
    was = schedule_steps(SimpleNamespace(**{"schedule_steps": 0, **saved_train}), epoch_size)
    now = schedule_steps(tcfg, epoch_size)
    if tcfg.schedule == "cosine" and was != now:
        log(
            f"warning: the cosine LR schedule spanned {was} steps in the checkpoint and spans "
            f"{now} now, so the learning rate differs from here on; set "
            f"train.schedule_steps={was} to keep the saved schedule"
        )


def clip_grad_global(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The chapter's rule g <- min(theta / ||g||, 1) g over all parameters; returns the
    pre-clip global norm as a device tensor (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
    if max_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(max_norm / norm, max=1.0).to(grads[0].dtype))
    return norm


def lm_loss(logits_TBV: torch.Tensor, y_BT: torch.Tensor, reduction: str = "mean"):
    """Mean (or summed) cross-entropy, accumulated in fp32 whatever the logits' dtype."""
    return cross_entropy(
        logits_TBV.flatten(0, 1), y_BT.t().reshape(-1), ignore_index=IGNORE, reduction=reduction
    )


def train_step(train_model, params, x_BT, y_BT, state: State, optimizer, amp: Amp, clip: float):
    with amp.autocast():
        logits_TBV, state = train_model(x_BT, state)
    loss = lm_loss(logits_TBV, y_BT)
    optimizer.zero_grad(set_to_none=True)
    amp.scaler.scale(loss).backward()
    amp.scaler.unscale_(optimizer)
    norm = clip_grad_global(params, clip)
    amp.scaler.step(optimizer)  # fp16: skipped on every rank alike when grads hold inf/nan
    amp.scaler.update()
    return loss.detach(), norm, state


@torch.no_grad()
def evaluate(model, streams: EvalStreams, amp: Amp, device) -> dict:
    """Loss over the whole split, state carried through it; reduced across ranks."""
    model.eval()
    state = model.init_state(streams.b, device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for x_BT, y_BT in streams:
        with amp.autocast():
            logits_TBV, state = model(x_BT, state)
        sums[0] += lm_loss(logits_TBV, y_BT, reduction="sum").double()
        sums[1] += (y_BT != IGNORE).sum()
    model.train()
    loss_sum, count = dist.all_reduce_sum(sums).tolist()
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": perplexity(loss), "bpc": loss / LN2, "tokens": count}


# ---------------------------------------------------------------- stopping


class Stopper:
    """SIGTERM/SIGUSR1 (preemption) and the time limit, agreed on by all ranks."""

    def __init__(self, time_limit: float, check_every: int, world_size: int):
        self.signalled = False
        self.deadline = time.monotonic() + time_limit if time_limit else math.inf
        self.check_every = 1 if world_size == 1 else check_every
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signalled = True

    def poll(self, step: int) -> tuple[bool, bool]:
        """(preempted, out_of_time); a collective every `check_every` steps."""
        if step % self.check_every:
            return False, False
        late = time.monotonic() > self.deadline
        if not torch.distributed.is_initialized():  # nothing to agree on: no tensor per step
            return self.signalled, late
        flags = torch.tensor([self.signalled, late], dtype=torch.int32)
        if torch.distributed.get_backend() == "nccl":
            flags = flags.cuda()
        preempt, late = dist.all_reduce_max(flags).tolist()
        return bool(preempt), bool(late)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- state in checkpoints


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # next minibatch inside the epoch
    train_time: float = 0.0  # seconds of training before this process started


def training_state(
    model, optimizer, amp, pos, hidden, vocab, cfg_dict, run_id, best_val, ctx, sampling
) -> dict:
    """Collective: gathers every rank's hidden state and dropout RNG."""
    hidden_global = []
    if sampling == "consecutive" and pos.batch > 0:
        hidden_global = [dist.all_gather_cat(h.detach(), dim=1).cpu() for h in hidden]
    rng = torch.get_rng_state()
    rngs = dist.all_gather_cat(rng.to(ctx.device).unsqueeze(0), dim=0).cpu()
    return {
        "format": ckpt.FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": amp.scaler.state_dict(),
        "step": pos.step,
        "epoch": pos.epoch,
        "batch_in_epoch": pos.batch,
        "train_time": pos.train_time,
        "hidden": hidden_global,
        "rng_per_rank": rngs,
        "world_size": ctx.world_size,
        "vocab": vocab.to_list(),
        "config": cfg_dict,
        "wandb_run_id": run_id,
        "best_val_loss": best_val,
    }


def restore_hidden(saved: list, ctx, b: int) -> State:
    """Split the GLOBAL (layers, batch, hidden) state for this rank, whatever W saved it."""
    lo = ctx.rank * b
    return tuple(h[:, lo : lo + b].contiguous().to(ctx.device) for h in saved)


def restore_rng(state: dict, ctx, seed: int) -> None:
    rngs = state.get("rng_per_rank")
    if rngs is not None and state.get("world_size") == ctx.world_size:
        torch.set_rng_state(rngs[ctx.rank].clone())
    else:  # resized: dropout masks cannot continue per rank; make them reproducible instead
        torch.manual_seed(seed * 7919 + state["step"] * 104729 + ctx.rank)


def resolve_resume(cfg: Config, run_dir: Path, log) -> tuple[Path, dict] | None:
    mode = cfg.train.resume
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


# ---------------------------------------------------------------- the run


def run(cfg: Config) -> dict:
    """Train on this process' rank. Returns the final metrics (rank 0's view = global)."""
    ctx = dist.init(cfg.train.device, cfg.train.threads)
    try:
        return _train(cfg, ctx)
    except BaseException as err:
        # The traceback keeps _train's frame alive, and with it the DDP model: drop it
        # before the process group goes, or gloo may abort at interpreter exit.
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        dist.shutdown()


def _data(cfg: Config, ctx: dist.DistContext):
    """Every rank builds the same vocabulary and ids (a pure function of the corpus), then
    takes its own streams."""
    tcfg = cfg.train
    corpus = load_corpus(cfg.data, ctx)
    streams = make_train_streams(
        corpus.splits["train"],
        tcfg.sampling,
        tcfg.batch_size,
        tcfg.num_steps,
        ctx.rank,
        ctx.world_size,
        ctx.device,
        tcfg.seed,
    )
    dist.check_same(streams.epoch_size, "minibatches per epoch")
    valid = None
    if "validation" in corpus.splits:
        valid = EvalStreams(
            corpus.splits["validation"],
            cfg.eval.batch_size,
            cfg.eval.num_steps or tcfg.num_steps,
            ctx.rank,
            ctx.world_size,
            ctx.device,
        )
    return corpus.vocab, streams, valid


@dataclass
class Resumed:
    pos: Position
    hidden: State | None = None
    run_id: str = ""
    best_val: float = math.inf


def _resume(found, cfg, cfg_dict, vocab, model, optimizer, amp, streams, ctx, log) -> Resumed:
    """Load a found checkpoint into model, optimizer and scaler; the position to go on from."""
    if not found:
        return Resumed(Position())
    path, saved = found
    tcfg = cfg.train
    ckpt.check_compatible(saved, cfg_dict, vocab.to_list(), path)
    model.load_state_dict(saved["model"])
    fused = [group.get("fused") for group in optimizer.param_groups]
    optimizer.load_state_dict(saved["optimizer"])
    for group, f in zip(optimizer.param_groups, fused):  # kernels follow THIS run's amp mode
        group["fused"] = f
    if saved["scaler"]:
        amp.scaler.load_state_dict(saved["scaler"])
    pos = Position(
        saved["step"], saved["epoch"], saved["batch_in_epoch"], saved.get("train_time", 0.0)
    )
    if pos.batch >= streams.epoch_size:  # data.* may change on resume; this cannot
        raise ckpt.CheckpointError(
            f"checkpoint '{path}' stopped after minibatch {pos.batch} of epoch {pos.epoch}, "
            f"but the training data now gives {streams.epoch_size} minibatches an epoch: "
            f"the corpus changed; use another run.dir or train.resume=never"
        )
    hidden = restore_hidden(saved["hidden"], ctx, streams.b) if saved["hidden"] else None
    restore_rng(saved, ctx, tcfg.seed)
    warn_schedule_change(saved["config"]["train"], tcfg, streams.epoch_size, log)
    log(
        f"resumed from '{path}' at step {pos.step} (epoch {pos.epoch}, "
        f"minibatch {pos.batch}; saved with {saved.get('world_size')} ranks)"
    )
    return Resumed(pos, hidden, saved.get("wandb_run_id", ""), saved.get("best_val_loss", math.inf))


def _samples(model, vocab: Vocab, cfg: Config, device, progress: Progress) -> list:
    """The configured prefixes continued by the model (rank 0 only)."""
    rows = []
    for prefix in cfg.generate.prefixes:
        try:
            text = generate(
                model,
                vocab,
                prefix,
                cfg.generate.length,
                cfg.generate.temperature,
                cfg.generate.top_k,
                seed=cfg.train.seed,
                device=device,
            )
        except PrefixError as err:
            text = f"(skipped: {err})"
        rows.append((prefix, text))
        progress.write(f" - {text}")
    return rows


def due(every: int, step: int) -> bool:
    """Whether a `*_every` interval (0 = never) ends at this step."""
    return every > 0 and step % every == 0


def _interval_record(pos: Position, optimizer, amp: Amp, ctx, tokens_per_step: int) -> dict:
    """Host-side values logged with each training interval (no device reads)."""
    rec = {
        "epoch": pos.epoch,
        "opt/lr": optimizer.param_groups[0]["lr"],
        "train/chars": pos.step * tokens_per_step,
        "world_size": ctx.world_size,
    }
    if amp.mode == "fp16":
        rec["amp/scale"] = amp.scaler.get_scale()
    if ctx.device.type == "cuda":  # the allocator's counter: no device sync
        rec["perf/gpu_peak_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    return rec


def _train(cfg: Config, ctx: dist.DistContext) -> dict:
    run_dir = Path(cfg.run.dir)
    cfg_dict = config_mod.to_dict(cfg)
    log = print if ctx.is_main else (lambda *a, **k: None)
    tcfg = cfg.train
    vocab, streams, valid = _data(cfg, ctx)

    # Model, optimizer, AMP; then any checkpoint; DDP wraps the model only after loading.
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg.model, len(vocab)).to(ctx.device)
    amp = Amp(tcfg.amp, ctx.device)
    optimizer = build_optimizer(tcfg, model, amp.mode)
    if ctx.is_main and tcfg.resume == "never" and cfg.run.overwrite:
        for p in ckpt.candidates(run_dir) + [ckpt.checkpoint_dir(run_dir) / "best.pt"]:
            p.unlink(missing_ok=True)
    dist.barrier()
    found = resolve_resume(cfg, run_dir, log)
    r = _resume(found, cfg, cfg_dict, vocab, model, optimizer, amp, streams, ctx, log)
    del found
    pos, hidden, best_val = r.pos, r.hidden, r.best_val
    run_id = r.run_id or dist.broadcast_object(_new_run_id())
    train_model = DDP(model) if ctx.distributed else model
    if tcfg.compile:
        train_model = torch.compile(train_model)
    params = list(model.parameters())

    total_steps = tcfg.max_steps or tcfg.epochs * streams.epoch_size
    lr_steps = schedule_steps(tcfg, streams.epoch_size)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_mod.dump(cfg), encoding="utf-8")
    logger = RunLogger(
        run_dir,
        cfg,
        cfg_dict,
        ctx.world_size,
        ctx.device,
        run_id,
        pos.step,
        ctx.is_main,
        hold=tcfg.checkpoint_every > 0,
    )
    progress = Progress(cfg.logging.progress if ctx.is_main else "off", total_steps, pos.step)
    log(
        f"{cfg.model.kind}: {sum(p.numel() for p in params):,} parameters, vocabulary "
        f"{len(vocab)}, {streams.epoch_size} minibatches/epoch, world size {ctx.world_size}, "
        f"device {ctx.device}, amp {amp.mode}"
    )

    def save(path_name: str, periodic: bool) -> None:
        """Collective (gathers state); rank 0 writes; everyone waits for the file."""
        state = training_state(
            model,
            optimizer,
            amp,
            pos,
            hidden,
            vocab,
            cfg_dict,
            run_id,
            best_val,
            ctx,
            tcfg.sampling,
        )
        if ctx.is_main:
            cdir = ckpt.checkpoint_dir(run_dir)
            if periodic:
                target = cdir / f"step_{pos.step:08d}.pt"
                ckpt.save_atomic(state, target)
                ckpt.link_atomic(target, cdir / "last.pt")
                ckpt.prune(run_dir, tcfg.keep_checkpoints)
            else:
                ckpt.save_atomic(state, cdir / path_name)
        dist.barrier()

    def elapsed() -> float:
        """Seconds of training up to now, across resumes (for wall-time plots)."""
        return pos.train_time + time.monotonic() - started

    def run_eval() -> dict:
        nonlocal best_val
        out = {}
        if valid is not None:
            v = evaluate(model, valid, amp, ctx.device)
            out = {"val/loss": v["loss"], "val/perplexity": v["perplexity"], "val/bpc": v["bpc"]}
            improved = v["loss"] < best_val
            best_val = min(best_val, v["loss"])
            logger.log(pos.step, {**out, "epoch": pos.epoch, "time/elapsed_s": elapsed()})
            log(
                f"step {pos.step}: validation perplexity {v['perplexity']:.3f}, "
                f"{v['bpc']:.3f} bits/char over {int(v['tokens'])} characters"
            )
            if improved:
                save("best.pt", periodic=False)
        if ctx.is_main and cfg.generate.prefixes:
            logger.samples(pos.step, _samples(model, vocab, cfg, ctx.device, progress))
        return out

    # ---- the loop
    stopper = Stopper(tcfg.time_limit, tcfg.signal_check_every, ctx.world_size)
    acc = TrainAccumulator(ctx.device)
    started = time.monotonic()
    tokens_per_step = tcfg.batch_size * tcfg.num_steps
    last_train: dict = {}
    last_val: dict = {}
    reason = "done"
    stop = pos.step >= total_steps or pos.epoch >= tcfg.epochs  # resumed at the very end
    try:
        while not stop:
            i = pos.batch
            if tcfg.sampling == "random" or i == 0 or hidden is None:
                hidden = model.init_state(streams.b, ctx.device)  # fresh per batch / epoch
            else:
                hidden = detach_state(hidden)  # carried across minibatches, graph cut
            x_BT, y_BT = streams.batch(pos.epoch, i)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(tcfg, pos.step, lr_steps)
            loss, norm, hidden = train_step(
                train_model, params, x_BT, y_BT, hidden, optimizer, amp, tcfg.clip
            )
            acc.add(loss, x_BT.numel(), norm, tcfg.clip)
            pos.step, pos.batch = pos.step + 1, i + 1
            end_of_epoch = pos.batch == streams.epoch_size
            if end_of_epoch:
                pos.epoch, pos.batch = pos.epoch + 1, 0
            final = pos.step >= total_steps or pos.epoch >= tcfg.epochs
            preempt, late = stopper.poll(pos.step)
            if preempt:
                reason = "preempted"
            elif late:
                reason = "time_limit"
            stop = final or reason != "done"

            by_epoch = end_of_epoch and pos.epoch % tcfg.eval_every_epochs == 0
            if stop or (due(tcfg.log_every, pos.step) if tcfg.log_every else end_of_epoch):
                last_train = {
                    **acc.reduce(ctx.world_size),  # the one host read of the interval
                    **_interval_record(pos, optimizer, amp, ctx, tokens_per_step),
                    "time/elapsed_s": elapsed(),
                }
                logger.log(pos.step, last_train)
                progress.update(pos.step, last_train)
            if stop or (due(tcfg.eval_every, pos.step) if tcfg.eval_every else by_epoch):
                if reason != "preempted":
                    last_val = run_eval() or last_val
            periodic = due(tcfg.checkpoint_every, pos.step)
            if periodic or stop:
                pos.train_time += time.monotonic() - started
                started = time.monotonic()
                logger.commit()  # wandb gets events up to this resumable point
                save("last.pt", periodic=periodic)
    finally:
        stopper.restore()
        progress.close()
    summary = {
        "final/step": pos.step,
        "final/train_time_s": pos.train_time,
        "best/val_loss": best_val,
        "best/val_perplexity": perplexity(best_val) if best_val < math.inf else None,
        "world_size": ctx.world_size,
    }
    logger.finish({k: v for k, v in summary.items() if v is not None})
    result = {**last_train, **last_val, **summary, "reason": reason}
    if reason == "preempted":
        log(f"preempted: saved step {pos.step} to {ckpt.checkpoint_dir(run_dir) / 'last.pt'}")
        raise Preempted(pos.step)
    return result


def _new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)
