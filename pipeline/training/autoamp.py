"""train.amp=auto: the precision measured fastest on this run's device and model.

A fixed rule is wrong somewhere: bf16 is slower than fp32 for small RNNs on an H200 and faster
for the songci recipe's LSTM 2x1024; on a CPU without native bf16 it is emulated (about 4x
slower). So rank 0 times a few training steps per candidate precision at start-up, on deep
copies of the model and optimizer, with every RNG state saved and restored: the run itself is
the one it would be with the chosen precision set explicitly (bitwise on the CPU). Every rank
uses rank 0's choice (a broadcast).

A choice by timing must not make runs differ from run to run, so it is kept in the cache
folder ($PIPELINE_CACHE_DIR or ~/.cache/lyrics-rnn, under amp_auto/) per device name, model
shape, batch and optimizer, and measured only when none is kept; a resumed run keeps the
precision its checkpoint was trained in.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import dist
from pipeline.data.common import cache_dir
from pipeline.model.noise import Noise
from pipeline.training.optim import build_optimizer
from pipeline.training.precision import Amp, cpu_has_native_bf16, cpu_model_name
from pipeline.training.step import train_step

MODES = ("off", "bf16", "fp16")
PREFER = MODES  # among the near-fastest: fp32 (no rounding), bf16 (no loss scale), fp16
SLACK = 0.05  # never choose a precision more than 5% slower than the fastest one tried
WARMUP, ROUNDS, STEPS = 2, 3, 3  # per candidate: untimed steps, then alternating timed rounds
DROP = 0.5  # a candidate under half the best rate after a round is timed no further
NAMES = {"off": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class Choice:
    """What train.amp resolved to on this run, and why."""

    mode: str
    source: str  # set (train.amp) | resumed | cached | measured | only candidate
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # per candidate (probe)
    seconds: float = 0.0  # the measurement's start-up cost (when it was made)
    where: str = ""  # the cache file
    failed: dict[str, str] = field(default_factory=dict)  # candidates that cannot run here

    def describe(self) -> str:
        """One line for the log and config.yaml's head."""
        if self.source == "set":
            return f"{self.mode} (set by train.amp)"
        if self.source == "resumed":
            return f"{self.mode} (train.amp=auto: kept from the checkpoint it resumes)"
        if self.source == "only candidate":
            return f"{self.mode} (train.amp=auto: the only candidate on this device)"
        rates = ", ".join(f"{NAMES[m]} {r:,.0f}" for m, r in self.tokens_per_s.items())
        rates += "".join(f", {NAMES[m]} failed ({why})" for m, why in self.failed.items())
        how = f"measured in {self.seconds:.1f} s" if self.source == "measured" else "kept"
        return f"{self.mode} (train.amp=auto: {rates} tokens/s, {how}; {self.where})"

    def summary(self) -> dict:
        """Flat keys for the wandb config."""
        out = {"amp_auto/source": self.source, "amp_auto/seconds": self.seconds}
        out.update({f"amp_auto/tokens_per_s/{NAMES[m]}": r for m, r in self.tokens_per_s.items()})
        return out


def candidates(device: torch.device) -> list[str]:
    """fp32 always; bf16 where the card has it or the CPU runs it natively (never where it
    is emulated; PIPELINE_NATIVE_BF16=1 forces it, see cpu_has_native_bf16); fp16 on CUDA."""
    if device.type == "cuda":
        return ["off", *(["bf16"] if torch.cuda.is_bf16_supported() else []), "fp16"]
    return ["off", "bf16"] if cpu_has_native_bf16() else ["off"]


def pick(tokens_per_s: dict[str, float]) -> str:
    """The first of PREFER within SLACK of the fastest: never more than 5% slower than the
    fastest tried, and timing noise between near-equals does not flip to a lower precision."""
    fastest = max(tokens_per_s.values())
    return next(m for m in PREFER if m in tokens_per_s and tokens_per_s[m] >= (1 - SLACK) * fastest)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()}, {torch.get_num_threads()} threads"


def cache_key(cfg, device: torch.device, vocab_size: int, b: int, modes: list[str]) -> dict:
    """What a kept choice holds for: device, model shape, this rank's batch, optimizer."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "model": {k: v for k, v in vars(cfg.model).items() if k not in ("init_std",)},
        "vocab_size": vocab_size,
        "batch": [b, cfg.train.num_steps],
        "optimizer": cfg.train.optimizer,
        "compile": cfg.train.compile,
        "candidates": modes,
    }


def cache_file(cfg, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(cfg.data) / "amp_auto" / f"{digest}.json"


@contextmanager
def kept_rng(device: torch.device):
    """Every RNG state the run could draw from, as it was before."""
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(modes: list[str], model, tcfg, streams, device, first_stream: int) -> dict:
    """Tokens/s of training steps per mode, on copies (the run's model, optimizer and RNG
    states are untouched): WARMUP untimed steps each, then ROUNDS rounds in alternating
    order of STEPS steps each (load from elsewhere hits every mode alike); medians. A mode
    under DROP x the best after a round is not timed further (it cannot come within 5%:
    emulated bf16 on a CPU costs one round, not three). A mode whose steps raise (oneDNN has no bf16 LSTM on CPUs without AVX-512) gets the error's
    first line instead of a rate."""
    with kept_rng(device):
        runs = {}
        for mode in modes:
            twin = copy.deepcopy(model)
            runs[mode] = (
                twin,
                list(twin.parameters()),
                build_optimizer(tcfg, twin),
                Amp(mode, device),
            )
        rates: dict[str, list[float]] = {m: [] for m in modes}

        def steps(mode: str, n: int, start: int) -> int:
            twin, params, opt, amp = runs[mode]
            tokens = 0
            for i in range(start, start + n):
                x_BT, y_BT = streams.batch(0, i % streams.epoch_size)
                state = twin.init_state(streams.b, device)
                noise = Noise(tcfg.seed, i, first_stream)
                train_step(twin, params, x_BT, y_BT, state, opt, amp, tcfg.clip, noise)
                tokens += x_BT.numel()
            return tokens

        failed = {}
        for mode in modes:
            try:
                steps(mode, WARMUP, 0)
            except RuntimeError as err:
                failed[mode] = str(err).splitlines()[0][:120]
        modes = [m for m in modes if m not in failed]
        active = list(modes)
        for r in range(ROUNDS):
            for mode in active if r % 2 == 0 else active[::-1]:
                _sync(device)
                t0 = time.perf_counter()
                tokens = steps(mode, STEPS, WARMUP + r * STEPS)
                _sync(device)
                rates[mode].append(tokens / max(time.perf_counter() - t0, 1e-9))
            best = max(statistics.median(rates[m]) for m in active)
            active = [m for m in active if statistics.median(rates[m]) >= DROP * best]
    return {**{m: statistics.median(rates[m]) for m in modes}, **failed}


def _decide_on_main(cfg, device, model, streams, vocab_size: int) -> Choice:
    modes = candidates(device)
    if len(modes) == 1:
        return Choice(modes[0], "only candidate")
    key = cache_key(cfg, device, vocab_size, streams.b, modes)
    path = cache_file(cfg, key)
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept.get("key") == key and kept.get("mode") in modes:
            rates, seconds, failed = kept["tokens_per_s"], kept["seconds"], kept["failed"]
            return Choice(kept["mode"], "cached", rates, seconds, str(path), failed)
    except (OSError, ValueError, KeyError):
        pass  # none kept (or a damaged file): measure
    began = time.perf_counter()
    found = measure(modes, model, cfg.train, streams, device, 0)
    rates = {m: r for m, r in found.items() if not isinstance(r, str)}
    failed = {m: r for m, r in found.items() if isinstance(r, str)}
    if not rates:
        raise RuntimeError(f"train.amp=auto: no precision could train here: {failed}")
    seconds = time.perf_counter() - began
    choice = Choice(pick(rates), "measured", rates, seconds, str(path), failed)
    record = {"key": key, "mode": choice.mode, "tokens_per_s": rates, "seconds": seconds}
    record["failed"] = failed
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache: the choice holds for this run only
        choice.where = f"not kept: {err}"
    return choice


def for_run(cfg, ctx, model, streams, vocab_size: int, saved: dict | None) -> Amp:
    """Collective (train.amp=auto, unless resumed). The run's Amp: train.amp as set; auto
    resumed: the checkpoint's precision; else rank 0's kept or measured choice, broadcast."""
    requested = cfg.train.amp
    if requested != "auto":
        return Amp(requested, ctx.device, Choice(requested, "set"))
    # resumed: the checkpoint's precision, where it is a candidate here (a bf16 checkpoint
    # from a machine with native bf16 resumed on one without is measured afresh)
    if saved and saved.get("precision") in candidates(ctx.device):
        return Amp(saved["precision"], ctx.device, Choice(saved["precision"], "resumed"))
    choice = None
    if ctx.is_main:
        choice = _decide_on_main(cfg, ctx.device, model, streams, vocab_size)
    dist.doing("train.amp=auto's measurement on rank 0")
    choice = dist.broadcast_object(choice)
    return Amp(choice.mode, ctx.device, choice)
