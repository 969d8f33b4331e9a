"""One training step and one evaluation: what the trainer, `python -m pipeline eval` and the
benchmarks run alike.

One step: minibatch of this rank's streams -> forward (autocast; dropout masks drawn from
(seed, step, site, global stream)) -> mean cross-entropy -> backward (DDP all-reduces, i.e.
averages, the gradients; with dist.grad_sync=shm the shared-memory average follows it) ->
unscale (fp16) -> clip by the global norm of the all-reduced gradients (identical on every
rank) -> the non-finite guard's skip -> optimizer step.
"""

from __future__ import annotations

import torch

from pipeline import dist
from pipeline.config import ConfigError
from pipeline.data.common import IGNORE
from pipeline.data.streams import EvalStreams
from pipeline.model.loss import LN2, perplexity
from pipeline.model.rnn import State
from pipeline.training.nonfinite import NonFiniteGuard
from pipeline.training.optim import clip_grad_global
from pipeline.training.precision import Amp


def train_step(
    train_model, params, x_BT, y_BT, state: State, optimizer, amp: Amp, clip: float, noise=None,
    guard: NonFiniteGuard | None = None, step: int = 0, grad_sync=None,
):  # fmt: skip
    """One update. With a guard, a step whose all-reduced gradient norm is not finite changes
    nothing (the fused optimizer takes the skip as `found_inf`; no host read) and the state
    carried to the next minibatch is the one it started from."""
    with amp.autocast():
        nll_N, new_state = train_model(x_BT, state, noise, y_BT)
    loss = nll_N.mean()  # fp32 whatever the compute dtype; training targets are never IGNORE
    optimizer.zero_grad(set_to_none=True)
    amp.scaler.scale(loss).backward()
    if grad_sync is not None:  # dist.grad_sync=shm: the average over ranks (DDP's is done)
        grad_sync()
    amp.scaler.unscale_(optimizer)  # fp16: records the scaler's own inf check for update()
    norm = clip_grad_global(params, clip)
    if guard is None:
        amp.scaler.step(optimizer)  # fp16: skipped on every rank alike when grads hold inf/nan
    else:
        skip = guard.check(step, loss.detach(), norm)
        optimizer.found_inf = skip  # read by the fused kernels: skip=1 changes nothing
        optimizer.step()
        new_state = tuple(
            torch.where(skip > 0, h0.to(h1.dtype), h1) for h0, h1 in zip(state, new_state)
        )
    amp.scaler.update()  # fp16: halves the scale after an overflow, as after scaler.step
    return loss.detach(), norm, new_state


@torch.no_grad()
def check_precision_runs(model, amp: Amp, device, vocab_size: int) -> None:
    """Run the model once on two characters under the run's precision: where this device's
    kernels cannot (oneDNN has no bf16 or fp16 LSTM on a CPU without native bf16, e.g.
    without AVX512-BF16 or AMX), exit 2 naming train.amp instead of a kernel's traceback in
    the first step. Eval mode: no dropout mask, so no random draw, and nothing changes."""
    if amp.dtype is None:
        return
    was_training = model.training
    model.eval()
    x_BT = torch.zeros(1, 2, dtype=torch.long, device=device).clamp_(max=vocab_size - 1)
    try:
        with amp.autocast():
            model(x_BT, model.init_state(1, device))
    except RuntimeError as err:
        why = str(err).splitlines()[0].split(". ")[0][:100]
        raise ConfigError(
            f"config key 'train.amp': {amp.mode} does not run on this {device.type} for this "
            f"model ({type(model).__name__}: {why}); use train.amp=off, or train.amp=auto, "
            f"which picks what this machine runs"
        ) from None
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model, streams: EvalStreams, amp: Amp, device) -> dict:
    """Loss over the whole split, state carried through it; reduced across ranks."""
    model.eval()
    state = model.init_state(streams.b, device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for x_BT, y_BT in streams:
        with amp.autocast():
            nll_N, state = model(x_BT, state, None, y_BT)
        sums[0] += nll_N.double().sum()
        sums[1] += (y_BT != IGNORE).sum()
    model.train()
    loss_sum, count = dist.all_reduce_sum(sums).tolist()
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": perplexity(loss), "bpc": loss / LN2, "tokens": count}
