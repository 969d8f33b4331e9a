"""When a checkpoint is written, and whether: never once the non-finite guard tripped, never a
state that holds NaN or inf, a periodic one not inside a streak of skipped steps (the final
one is: a skipped step's state is the last good one); rank 0 writes, every rank learns the
outcome (a full disk ends every rank alike)."""

from __future__ import annotations

from pathlib import Path

from pipeline import dist
from pipeline.run import checkpoint as ckpt
from pipeline.training.nonfinite import Diverged, NonFiniteGuard


def check_room(run_dir: Path, params: list, optimizer: str) -> None:
    """Collective, before training: a checkpoint of this run must fit into the run directory
    (model, optimizer moments, carried state; the moments may not exist yet)."""
    moments = 2 if optimizer in ("adam", "adamw") else 0
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    need = (1 + moments) * model_bytes + ckpt.OVERHEAD_BYTES
    where = ckpt.checkpoint_dir(run_dir)
    dist.on_main(lambda: ckpt.check_space(where, need, "a checkpoint"), ckpt.DiskFull)


class Saver:
    def __init__(self, run_dir: Path, keep: int, guard: NonFiniteGuard, log):
        self.cdir, self.run_dir, self.keep = ckpt.checkpoint_dir(run_dir), run_dir, keep
        self.guard, self.log = guard, log

    def save(self, checkpoint, step: int, name: str | None, final: bool = False) -> Path | None:
        """Collective: rank 0 writes `name`, or (None) a periodic step_N.pt that last.pt then
        names, from `checkpoint()` (collective too). Returns the file written, None when
        nothing was; Diverged when the state holds non-finite values (every rank decides
        alike: the state is the same on every rank). Nothing once the guard tripped (the run
        stops as diverged). Inside a streak of skipped steps a periodic save waits (the
        streak may end in a divergence, and pruning would drop an older checkpoint for it);
        a `final` one (the run's end, a preemption, a time limit) is written: a skipped step
        changed no parameter, moment or carried state, so the state is the last good one."""
        streak, tripped = self.guard.state()  # an I/O edge: the host may look here
        if tripped >= 0 or (streak and not final):
            why = (
                f"the run diverged at step {tripped}"
                if tripped >= 0
                else (f"in a streak of {streak} non-finite steps")
            )
            self.log(
                f"step {step}: not saving {name or 'a periodic checkpoint'}: {why} (the "
                f"checkpoints on disk stay as they are)"
            )
            return None
        state = checkpoint()
        bad = ckpt.first_nonfinite(state)
        if bad is not None:
            raise Diverged(
                f"diverged: at step {step} the run's {bad} holds non-finite values, so it "
                f"was not saved; the checkpoints on disk stay as they are"
            )

        target = self.cdir / (name or f"step_{step:08d}.pt")

        def write():
            ckpt.save_atomic(state, target)
            if name is None:
                ckpt.link_atomic(target, self.cdir / "last.pt")
                ckpt.prune(self.run_dir, self.keep)

        dist.on_main(write, ckpt.DiskFull)  # every rank waits for the file
        return target
