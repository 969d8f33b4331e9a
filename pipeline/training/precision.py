"""Mixed precision: autocast dtype and the GradScaler (fp16 only)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matrix products run natively (about 5x fp32 here).
    PIPELINE_NATIVE_BF16=0 or 1 overrides the detection (to see what `amp=auto` does on
    the other kind of machine; with ONEDNN_MAX_CPU_ISA=AVX512_CORE oneDNN also emulates
    bf16 the way such a CPU does)."""
    forced = os.environ.get("PIPELINE_NATIVE_BF16", "")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return ("amx_bf16" in flags or "avx512_bf16" in flags) and torch.backends.mkldnn.is_available()


def cpu_model_name(default: str = "cpu") -> str:
    """The CPU's model name from /proc/cpuinfo (`default` where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def resolve(mode: str, device: torch.device) -> str:
    """A static guess for `auto` (eval, generate); training measures (pipeline.training.autoamp)."""
    if mode != "auto":
        return mode
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "off"


class Amp:
    def __init__(self, mode: str, device: torch.device, choice=None):
        self.mode = resolve(mode, device)
        self.choice = choice  # how train.amp resolved (pipeline.training.autoamp.Choice), if known
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mode)
        # Disabled scaler: scale() returns the loss, unscale_() and update() do nothing,
        # step() is optimizer.step(), so one code path serves every mode.
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.mode == "fp16")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)
