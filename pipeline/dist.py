"""The distributed life-cycle: init from torchrun's environment, reductions, teardown.

World size 1 without a launcher needs no process group; every helper here then degrades to
the identity, so one code path serves `python -m pipeline` and `torchrun -m pipeline`.
"""

from __future__ import annotations

import atexit
import faulthandler
import gc
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.config import ConfigError

# Set once this process has started a process group (it stays set after the teardown).
_group_started = False
HUNG_EXIT = 124  # like timeout(1): a collective waited past train.dist_timeout
# What this rank is doing between collectives, for the message when one of them times out.
_doing = "start-up"


class Hung(Exception):
    """A collective waited past train.dist_timeout: a rank stopped, stuck or cut off."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def restart_count() -> int:
    """How often torchrun's elastic agent has restarted this job's workers (0: first try)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"config key 'train.device': 'cuda' requested, but torch {torch.__version__} "
                f"sees no CUDA device; use train.device=cpu (or auto)"
            )
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def choose_backend(requested: str, device_type: str, local_ranks: int, gpus: int) -> str:
    """dist.backend for a group of `local_ranks` ranks on this node with `gpus` visible GPUs:
    auto is nccl on CUDA, gloo on the CPU. NCCL needs a GPU of its own per rank (two ranks
    on one device fail or hang inside NCCL); gloo takes CUDA tensors too, so ranks can
    share a GPU. Raises ConfigError (exit 2) where the request cannot work."""
    backend = requested if requested != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if backend == "nccl" and device_type != "cuda":
        raise ConfigError(
            "config key 'dist.backend': nccl needs CUDA, but the device is the CPU "
            "(train.device); use dist.backend=gloo (or auto)"
        )
    if backend == "nccl" and local_ranks > gpus:
        raise ConfigError(
            f"config key 'dist.backend': {local_ranks} ranks on this node but {gpus} GPU(s) "
            f"visible, and NCCL needs one GPU per rank; launch torchrun "
            f"--nproc_per_node={gpus}, or set dist.backend=gloo to let ranks share a GPU"
        )
    return backend


def _restart_store(timeout: timedelta):
    """torch 2.13's elastic agent shares its TCPStore with the workers, so restarted workers
    can read the previous attempt's gloo peer addresses ("Gloo connectFullMesh failed").
    Namespacing the store by the restart count gives every attempt fresh keys.
    Only for a shared agent store: with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (recommended for
    several nodes) worker rank 0 hosts a fresh store every round and env:// init is right.
    On several nodes the counts can differ (a node whose worker was still alive restarts for
    the membership change, keeping its count), and the attempt then hangs: hence the flag."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or "MASTER_ADDR" not in os.environ:
        return None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    return dist.PrefixStore(f"{run_id}/restart_{restart}", store)


def init(
    device: str = "auto", threads: int = 0, timeout_s: float = 1800, backend: str = "auto"
) -> DistContext:
    world_size = _env_int("WORLD_SIZE", 1)
    ctx = DistContext(
        rank=_env_int("RANK", 0),
        world_size=world_size,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
    )
    ctx.device = pick_device(device, ctx.local_rank)
    gpus = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    backend = choose_backend(backend, ctx.device.type, ctx.local_world_size, gpus)
    if "OMP_NUM_THREADS" not in os.environ or threads:
        n = threads or max(1, (os.cpu_count() or 1) // ctx.local_world_size)
        torch.set_num_threads(n)
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = _restart_store(timeout)
        kwargs = dict(backend=backend, timeout=timeout)
        if store is not None:
            kwargs.update(store=store, rank=ctx.rank, world_size=world_size)
        if backend == "nccl":
            kwargs["device_id"] = ctx.device
        faulthandler.enable()  # a crash in a rank prints every thread's Python stack
        dist.init_process_group(**kwargs)
        global _group_started
        _group_started = True
    return ctx


def shutdown() -> None:
    """Release the group only after everything that referenced it is gone: a DDP model still
    alive at destroy_process_group() lets a gloo thread free a tensor during interpreter exit
    (SIGABRT about 1 run in 8). Callers drop their references first; we collect here."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> None:
    """End the process with `code`. After a process group, skip the interpreter's teardown:
    with gloo a rank could still abort there ("terminate called without an active
    exception", SIGABRT) after shutdown() had run, turning a finished job into a FAILED one
    (seen once in CI, in a SLURM job; rarer than 1 in 200 local runs). The Python exit
    handlers (wandb, logging) run first, while everything is alive; the run's files are
    closed by then; the streams are flushed."""
    if not _group_started:
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def doing(what: str) -> None:
    """Name what this rank does next (a plain assignment: cheap enough for every step)."""
    global _doing
    _doing = what


def set_timeout(seconds: float) -> None:
    """Bound every later collective by `seconds` (start-up ran under init's longer bound)."""
    if dist.is_initialized():
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timedelta(seconds=seconds))


def is_timeout(err: BaseException) -> bool:
    """gloo: "Timed out waiting 5000ms for recv operation"; NCCL's watchdog says "timed out"
    too (with NCCL the watchdog usually ends the process itself)."""
    return _group_started and isinstance(err, RuntimeError) and "timed out" in str(err).lower()


def hung(err: BaseException, timeout_s: float) -> Hung:
    """After a collective timed out: post this rank's presence to the rendezvous store, wait
    a few seconds for the other live ranks to do the same, and name the ranks that did not
    (stopped, stuck or cut off); dump this process' Python stacks to stderr."""
    import time
    import traceback

    traceback.print_exception(err)
    faulthandler.dump_traceback(all_threads=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    missing = "the missing rank could not be determined"
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        prefix = f"pipeline/hung/{restart_count()}/"
        store.set(f"{prefix}{rank}", _doing)
        deadline = time.monotonic() + min(10.0, max(2.0, timeout_s))
        absent = list(range(world))
        while absent and time.monotonic() < deadline:
            absent = [r for r in range(world) if not store.check([f"{prefix}{r}"])]
            time.sleep(0.2)
        if absent:
            missing = f"rank(s) {', '.join(map(str, absent))} did not answer (stopped or stuck)"
        else:
            missing = "every rank answered afterwards (a slow rank, or a broken connection)"
    except Exception as store_err:  # the store went with the job: say so, keep the message
        missing = f"the missing rank could not be determined ({type(store_err).__name__})"
    return Hung(
        f"hung: rank {rank} waited more than train.dist_timeout={timeout_s:g} s in a "
        f"collective during {_doing}; {missing}"
    )


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def max_over_ranks(values: list[float]) -> list[float]:
    """The largest of every rank's values, elementwise (a collective)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    return all_reduce_max(t).tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_cat(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate every rank's `t` along `dim`, in rank order (same shape on all ranks)."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same(value: int, what: str) -> None:
    """All ranks must agree on `value` (e.g. steps per epoch): one all-reduce of (-v, v)."""
    if not dist.is_initialized():
        return
    t = torch.tensor([-value, value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    all_reduce_max(t)
    lo, hi = -int(t[0]), int(t[1])
    if lo != hi:
        raise RuntimeError(f"ranks disagree on {what}: min {lo}, max {hi}")


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(action, *errors: type[Exception]):
    """Collective: rank 0 runs `action()`; an error of the given kinds that it raises is
    raised on every rank (same kind, same message), so all ranks leave alike. The broadcast
    is also a barrier: no rank goes on before rank 0 is done."""
    failed = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            action()
        except errors as err:
            failed = (next(i for i, e in enumerate(errors) if isinstance(err, e)), str(err))
    failed = broadcast_object(failed)
    if failed is not None:
        raise errors[failed[0]](failed[1])
