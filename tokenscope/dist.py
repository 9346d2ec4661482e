"""torch.distributed in one small module: who am I, am I the writer, wait for everyone, add up.

`torchrun` (or `srun torchrun`) starts the processes and sets RANK / WORLD_SIZE / LOCAL_RANK;
tokenscope only reads them. A process started without torchrun is rank 0 of 1 and never touches
torch.distributed, so every job reads as single-process code with a few marked collective points.
Collectives time out (TOKENSCOPE_DIST_TIMEOUT seconds, default 1800) and then fail with one
line, so a rank that dies or hangs stops the others instead of leaving them waiting forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from tokenscope.errors import TokenscopeError

T = TypeVar("T")
TIMEOUT_ENV = "TOKENSCOPE_DIST_TIMEOUT"


class DistributedError(TokenscopeError):
    """Another rank failed, or a collective timed out."""

    exit_code = 4


@dataclass(frozen=True)
class Context:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes what belongs to the whole job (run.json, tables, figures, checkpoints)."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items` (every world_size-th, from its rank): disjoint, complete."""
        return list(items[self.rank::self.world_size])


def timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))


def context(device_type: str = "cpu") -> Context:
    """The job this process belongs to; joins torchrun's process group on first use
    (nccl on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":  # NCCL's object collectives run on the current device: one GPU per rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend=backend, timeout=timeout())
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"cannot join the torchrun job ({str(exc).splitlines()[0]})") from None
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _guard(ctx: Context, what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except (RuntimeError, ValueError) as exc:  # timeouts and broken peers surface as these
        raise DistributedError(f"rank {ctx.rank}: {what} failed: another rank died or did not arrive within "
                               f"{timeout().total_seconds():.0f} s ({str(exc).splitlines()[0][:160]})") from None


def barrier(ctx: Context, what: str) -> None:
    """Wait until every rank gets here."""
    if ctx.active:
        if dist.get_backend() == "gloo":
            _guard(ctx, f"waiting for all ranks ({what})", lambda: dist.monitored_barrier(timeout=timeout()))
        else:
            _guard(ctx, f"waiting for all ranks ({what})", dist.barrier)


def broadcast(ctx: Context, obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not ctx.active:
        return obj
    box = [obj]
    _guard(ctx, "receiving rank 0's value", dist.broadcast_object_list, box, 0)
    return box[0]


def gather(ctx: Context, obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    _guard(ctx, "gathering results", dist.all_gather_object, out, obj)
    return out


def all_reduce_sum(ctx: Context, values: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks (counts, confusion matrices), exact for integers below 2^53."""
    if not ctx.active:
        return values
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    _guard(ctx, "adding up counts", dist.all_reduce, t)
    return t.numpy().astype(values.dtype)
