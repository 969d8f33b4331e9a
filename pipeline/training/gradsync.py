"""How one step's gradients become their average over the ranks (`dist.grad_sync`).

- `ddp`: torch's DistributedDataParallel, all-reducing buckets during the backward pass. Any
  layout: several nodes, CUDA, NCCL or gloo.
- `shm`: ranks that share one CPU node average through shared memory. On a CPU every core
  already computes, so there is nothing for DDP's overlap to hide the all-reduce behind, and
  gloo's TCP all-reduce over loopback moves each gradient through the kernel twice and runs
  on threads that compete with the compute. Here each rank writes its gradients, divided by
  the world size (as DDP divides before its all-reduce), into its slot of one shared buffer;
  one tiny gloo all-reduce serves as the barrier (and keeps `train.dist_timeout` and the
  hang report); and every rank sums the slots in rank order into its own gradients: the
  same operations on the same numbers, so every rank holds the same bits. Two buffers
  alternate by step, so a rank that runs ahead never writes a slot another rank is still
  reading (it must pass the next step's barrier first).
- `auto`: shm for CPU ranks that are all on one node, else ddp.
"""

from __future__ import annotations

import os
import uuid

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import dist
from pipeline.config import ConfigError


def shm_dir() -> str:
    """Where the shared buffer lives: /dev/shm, or PIPELINE_SHM_DIR (another tmpfs)."""
    return os.environ.get("PIPELINE_SHM_DIR", "/dev/shm")


def choose(requested: str, ctx: dist.DistContext) -> str:
    """The grad_sync mode for this job: 'none' (one process), 'ddp' or 'shm'."""
    if not ctx.distributed:
        return "none"
    one_node = ctx.local_world_size == ctx.world_size
    if requested == "auto":
        return "shm" if ctx.device.type == "cpu" and one_node else "ddp"
    if requested == "shm" and not (ctx.device.type == "cpu" and one_node):
        raise ConfigError(
            "config key 'dist.grad_sync': shm needs every rank on one node and on the CPU "
            f"({ctx.world_size} ranks, {ctx.local_world_size} on this node, device "
            f"{ctx.device.type}); use dist.grad_sync=ddp (or auto)"
        )
    return requested


class SharedAverage:
    """The `shm` mode's gradient average: call after backward, before clipping."""

    def __init__(self, params: list[torch.Tensor], rank: int, world_size: int):
        self.params, self.rank, self.world = params, rank, world_size
        self.n = sum(p.numel() for p in params)
        self.slots = _shared_buffer((2, world_size, self.n), rank)  # [parity, rank, element]
        self.mean = torch.empty(self.n)  # this rank's averaged gradients; p.grad views it
        self.views, at = [], 0
        for p in params:
            self.views.append(self.mean[at : at + p.numel()].view_as(p))
            at += p.numel()
        self.token = torch.zeros(1)
        self.parity = 0

    def __call__(self) -> None:
        mine = self.slots[self.parity, self.rank]
        at = 0
        for p in self.params:  # divided on the way in, as DDP does before its all-reduce
            part = mine[at : at + p.numel()]
            if p.grad is None:  # a parameter no step reached on this rank adds 0
                part.zero_()
            else:
                torch.div(p.grad.reshape(-1), self.world, out=part)
            at += p.numel()
        tdist.all_reduce(self.token)  # the barrier: every slot of this parity is written
        slots = self.slots[self.parity]  # summed in rank order, alike on every rank
        if self.world == 1:
            self.mean.copy_(slots[0])
        else:  # a fold of adds: 1.6x faster than torch.sum over the slots here
            torch.add(slots[0], slots[1], out=self.mean)
            for w in range(2, self.world):
                self.mean.add_(slots[w])
        for p, view in zip(self.params, self.views):
            p.grad = view
        self.parity ^= 1


def _shared_buffer(shape: tuple, rank: int) -> torch.Tensor:
    """A zeroed fp32 tensor that every rank of the group maps: rank 0 creates a file in
    shm_dir() with all of its pages reserved (a full tmpfs is an error here, not a SIGBUS
    at the first write), every rank maps it, and rank 0 removes the name once all have:
    nothing is left behind, however the job ends."""
    numel = 1
    for s in shape:
        numel *= s
    where = shm_dir()
    path = os.path.join(where, f"pipeline-grads-{uuid.uuid4().hex}") if rank == 0 else None

    def create() -> None:
        fd = None
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.posix_fallocate(fd, 0, numel * 4)
        except OSError as err:
            if fd is not None:
                os.unlink(path)
            raise ConfigError(
                f"config key 'dist.grad_sync': shm needs {numel * 4 / 2**20:.0f} MiB in "
                f"{where} ({err.strerror}); free some, or use dist.grad_sync=ddp"
            ) from None
        finally:
            if fd is not None:
                os.close(fd)

    dist.on_main(create, ConfigError)
    path = dist.broadcast_object(path)
    buf = torch.from_file(path, shared=True, size=numel, dtype=torch.float32)
    dist.barrier()
    if rank == 0:
        os.unlink(path)
    return buf.view(shape)


class GradSync:
    """The step's model (DDP-wrapped or not) and the call that averages after backward.
    `dist.grad_sync=auto` falls back to DDP, saying so, where /dev/shm cannot hold the
    buffer (a container's 64 MiB, say); `shm` asked for by name stops there (exit 2)."""

    def __init__(self, requested: str, model: nn.Module, params: list[torch.Tensor], ctx, log):
        self.mode = choose(requested, ctx)
        self.model, self.average = model, None
        if self.mode == "shm":
            try:
                self.average = SharedAverage(params, ctx.rank, ctx.world_size)
            except ConfigError as err:  # raised alike on every rank (dist.on_main)
                if requested != "auto":
                    raise
                log(f"warning: {err}; dist.grad_sync=auto uses ddp")
                self.mode = "ddp"
        if self.mode == "shm":
            for p in params:  # DDP's start: every rank from rank 0's parameters
                tdist.broadcast(p.data, src=0)
        if self.mode == "ddp":
            self.model = DDP(model)

    def __call__(self) -> None:
        if self.average is not None:
            self.average()
