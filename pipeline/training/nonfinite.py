"""Non-finite steps: skip them on the device, count them, stop a run that diverged.

The all-reduced gradient norm decides (a NaN or inf loss on any rank reaches it through DDP's
all-reduce), so every rank takes the same decision without a collective of its own. The
decision is a device tensor handed to the fused optimizer as `found_inf`: a skipped step
changes no parameter and no optimizer state (moments, step counts), in every precision,
without a host read. After `patience` consecutive skipped steps the guard trips and stays
tripped (every later step is skipped too), so the run's parameters are those of the step
the patience names, however late the host looks (at the stop check, or a save).
"""

from __future__ import annotations

import torch

DIVERGED_EXIT = 65  # EX_DATAERR: the run diverged; nothing after the last good step was saved


class Diverged(Exception):
    pass


class NonFiniteGuard:
    def __init__(self, patience: int, device: torch.device):
        self.patience = patience
        # streak of consecutive skipped steps; the step at which the guard tripped (-1: not);
        # loss and gradient norm of the step that tripped it (for the message)
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.tripped_at = torch.full((), -1, dtype=torch.int64, device=device)
        self.what = torch.zeros(2, dtype=torch.float32, device=device)

    def check(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Device-side: 1.0 when step `step` (0-based) must change nothing, else 0.0."""
        bad = ~torch.isfinite(norm)
        self.streak = torch.where(bad, self.streak + 1, 0)
        trips = (self.streak >= self.patience) & (self.tripped_at < 0)
        self.tripped_at = torch.where(trips, step + 1, self.tripped_at)
        self.what = torch.where(trips, torch.stack([loss.float(), norm.float()]), self.what)
        return (bad | (self.tripped_at >= 0)).float()

    def state(self) -> tuple[int, int]:
        """Host read (at stop checks and saves only): (streak, step it tripped at or -1)."""
        streak, tripped = torch.stack([self.streak, self.tripped_at]).tolist()
        return streak, tripped

    def flag(self) -> torch.Tensor:
        """1 once tripped, as an int32 device tensor (for the stop check's all-reduce)."""
        return (self.tripped_at >= 0).to(torch.int32).view(1)

    def message(self, tripped_at: int) -> str:
        loss, norm = self.what.tolist()
        first = tripped_at - self.patience + 1
        return (
            f"diverged: {self.patience} consecutive non-finite steps, {first} to {tripped_at} "
            f"(train.nonfinite_patience={self.patience}; at step {tripped_at}: loss {loss:g}, "
            f"gradient norm {norm:g}); no step changed the parameters after step {first - 1}"
        )
