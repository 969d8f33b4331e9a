"""Optimisation pieces: the optimizer, the learning-rate schedule, clipping by global norm."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, scope: str) -> list[dict]:
    """The optimizer's groups, in the order its state numbers the parameters: one group of
    every parameter (train.weight_decay_params=all, or no decay), else the matrices (2+
    dimensions, embeddings included) decayed and the 1-D ones (biases) not, as most recipes
    do."""
    params = list(model.parameters())  # shared (tied) parameters once
    if scope == "all" or not weight_decay:
        return [{"params": params, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(cfg, model: torch.nn.Module, fused: bool = True) -> torch.optim.Optimizer:
    """The fused kernels (CPU and CUDA) take a skip flag on the device (`found_inf`, set by
    pipeline.training.nonfinite's guard, or by GradScaler in fp16) and skip the whole update inside
    the kernel, step counts included, instead of reading the flag with .item() every step.
    `fused=False` is the unguarded foreach path, kept for benchmarks against it."""
    groups = param_groups(model, cfg.weight_decay, getattr(cfg, "weight_decay_params", "all"))
    kw = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":  # the chapter's d2l.sgd: p -= lr * grad
        return torch.optim.SGD(groups, lr=cfg.lr, **kw)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kw)


def lr_at(cfg, step: int, plans) -> float:
    """Linear warmup, then constant, or cosine or linear decay to lr * min_lr_ratio (both
    follow the same progress along the schedule); a pure function of the step and the
    schedule's plans (see schedule_progress; an int is one plan spanning that many steps), so
    resuming needs no scheduler state. No plan yet (a time budget still measuring): the
    peak. Like warm-up, the decay counts the update being made (progress after `step + 1`
    updates): the last update before a horizon H, step H - 1, runs at lr * min_lr_ratio,
    however few steps a late re-plan of a time budget left."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    plans = [(0, plans)] if isinstance(plans, int) else plans
    if cfg.schedule == "constant" or not plans:
        return cfg.lr
    frac = schedule_progress(step + 1, cfg.warmup_steps, plans)
    left = 1 - frac if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * left)


def schedule_progress(step: int, warmup: int, plans) -> float:
    """The fraction of the decay (cosine or linear) done at `step`. Plans [(from_step,
    horizon), ...]: from its step on, each plan takes the curve from where it stands (0
    before warm-up ends) to its end at `horizon`. One plan (0, H) is the plain decay from
    warm-up to H; a time budget appends a plan each time it re-aims the rest of the curve."""
    done = 0.0
    for i, (at, horizon) in enumerate(plans):
        last = i + 1 == len(plans) or step < plans[i + 1][0]
        upto, start = (step if last else plans[i + 1][0]), max(at, warmup)
        if horizon > start:  # else nothing left to span: hold
            done = min(1.0, done + (1 - done) * max(0, upto - start) / (horizon - start))
        if last:
            break
    return done


def schedule_steps(tcfg, epoch_size: int) -> int:
    """Steps the LR schedule spans: its own key, so that a run stopped by train.max_steps and
    continued with a larger one can keep one cosine curve (set it to the final length)."""
    return tcfg.schedule_steps or tcfg.max_steps or tcfg.epochs * epoch_size


def schedule_plans(tcfg, epoch_size: int) -> list[tuple[int, int]]:
    """The time budget's plans (train.schedule_plans), else one plan over schedule_steps."""
    if tcfg.schedule_plans:
        return [(int(at), int(h)) for at, h in tcfg.schedule_plans]
    return [(0, schedule_steps(tcfg, epoch_size))]


def warn_schedule_change(saved_train: dict, tcfg, epoch_size: int, log) -> None:
    """Resuming under another schedule length changes the LR from here on: allowed, not
    silent."""
    was = schedule_steps(SimpleNamespace(**{"schedule_steps": 0, **saved_train}), epoch_size)
    now = schedule_steps(tcfg, epoch_size)
    if tcfg.schedule != "constant" and was != now:
        log(
            f"warning: the {tcfg.schedule} LR schedule spanned {was} steps in the checkpoint "
            f"and spans {now} now, so the learning rate differs from here on; set "
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
