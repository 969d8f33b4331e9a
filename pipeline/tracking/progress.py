"""The console sink: a tqdm bar on a TTY, else one plain line per log interval (rank 0)."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, mode: str, total: int, initial: int):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(
                ppl=f"{metrics['train/perplexity']:.2f}",
                tok_s=f"{metrics['perf/tokens_per_s']:.0f}",
                refresh=True,
            )
        elif self.mode == "lines":
            self.write(
                f"step {step} epoch {metrics.get('epoch', 0)}: train perplexity "
                f"{metrics['train/perplexity']:.3f}, loss {metrics['train/loss']:.4f}, "
                f"grad norm {metrics['opt/grad_norm']:.3g}, "
                f"{metrics['perf/tokens_per_s']:.0f} tokens/s"
            )

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def write(self, line: str) -> None:
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
