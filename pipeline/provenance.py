"""Where a run came from: versions and the git commit, for run comparison."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch


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
    return {
        "world_size": world_size,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "git_commit": git_commit(),
    }
