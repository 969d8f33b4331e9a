"""A run's position and carried values: what a checkpoint holds beyond the model, optimizer
and scaler. No random-generator state: every random draw of a step is a pure function of
(seed, step, site, global stream) (pipeline.model.noise), and sampling of (seed, epoch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline import dist
from pipeline.model.rnn import State, detach_state


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # next minibatch inside the epoch
    train_time: float = 0.0  # seconds of training before this process started
    hidden: State | None = None  # this rank's streams (consecutive sampling)
    best_val: float = math.inf
    run_id: str = ""  # the wandb run, kept across resumes

    def advance(self, epoch_size: int) -> bool:
        """Count one step; True when it ended an epoch."""
        self.step, self.batch = self.step + 1, self.batch + 1
        if self.batch < epoch_size:
            return False
        self.epoch, self.batch = self.epoch + 1, 0
        return True

    def to_checkpoint(self, consecutive: bool) -> dict:
        """Collective: every rank's hidden state joined into the GLOBAL (layers, batch,
        hidden) tensors, so any world size can resume it."""
        hidden = []
        if consecutive and self.batch > 0 and self.hidden is not None:
            hidden = [dist.all_gather_cat(h.detach(), dim=1).cpu() for h in self.hidden]
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch,
            "train_time": self.train_time,
            "hidden": hidden,
            "best_val_loss": self.best_val,
            "wandb_run_id": self.run_id,
        }

    @classmethod
    def from_checkpoint(cls, saved: dict, rank: int, b: int, device) -> TrainState:
        """This rank's share (rows [rank*b, (rank+1)*b)) of the saved global state."""
        hidden = None
        if saved["hidden"]:
            lo = rank * b
            # fp32 on this run's device: a checkpoint from before the states were carried in
            # fp32 may hold bf16 ones (any precision and device resume it)
            hidden = tuple(
                h[:, lo : lo + b].to(device=device, dtype=torch.float32).contiguous()
                for h in saved["hidden"]
            )
        return cls(
            step=saved["step"],
            epoch=saved["epoch"],
            batch=saved["batch_in_epoch"],
            train_time=saved.get("train_time", 0.0),
            hidden=hidden,
            best_val=saved.get("best_val_loss", math.inf),
            run_id=saved.get("wandb_run_id", ""),
        )


def carried(state: TrainState, model: torch.nn.Module, b: int, random: bool, device) -> State:
    """The state a minibatch starts from: zeros for random windows and at each epoch start,
    else the previous minibatch's final state, graph cut (model.detach_state)."""
    if random or state.batch == 0 or state.hidden is None:
        return model.init_state(b, device)
    return detach_state(state.hidden)
