"""Distributed training through ``torchrun``: the process group, ranks and collectives.

``torchrun --nproc_per_node=N -m esreid train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous in their environment. :func:`setup`
reads it and joins the process group (NCCL on CUDA, Gloo on CPU); without torchrun (or with
one process) it does nothing and every helper below is the single-process identity, so the
trainer calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from esreid.utils import resolve_device

log = logging.getLogger("esreid.train")

__all__ = ["DistContext", "all_mean", "barrier", "broadcast_buffers", "broadcast_flag", "cleanup",
           "gather_to_main", "launched_by_torchrun", "setup", "shard"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that writes the run folder (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process launch (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str) -> DistContext:
    """Resolve ``train.device`` and, under torchrun, join the process group.

    Each process of a CUDA run takes the GPU of its ``LOCAL_RANK`` (a ``cuda:N`` in the
    config is overridden, since every process would otherwise pick the same card). The
    backend is NCCL on CUDA and Gloo on CPU. A group that is already initialised (a caller
    that set it up itself) is used as it is.
    """
    device = resolve_device(device_name)
    if not (launched_by_torchrun() or (dist.is_available() and dist.is_initialized())):
        return DistContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cleanup() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _tensor_device(ctx: DistContext) -> torch.device:
    # NCCL reduces CUDA tensors only; Gloo takes CPU tensors.
    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_mean(ctx: DistContext, values: list[float]) -> list[float]:
    """The mean over the processes of each of ``values`` (the values themselves alone)."""
    if not ctx.distributed or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_tensor_device(ctx))
    dist.all_reduce(t)
    return (t / ctx.world_size).tolist()


def broadcast_flag(ctx: DistContext, value: int) -> int:
    """The largest ``value`` over the processes: how all ranks agree that one of them was
    asked to stop (the signal number, 0 for none)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_tensor_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier(ctx: DistContext) -> None:
    """Wait until every process gets here."""
    if ctx.distributed:
        dist.barrier()


def broadcast_buffers(ctx: DistContext, module: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts them at the start of each training forward, but each rank's last step
    then updates them with its own batch; a model evaluated (or saved) between steps must
    be rank 0's model on every rank.
    """
    if not ctx.distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def gather_to_main(ctx: DistContext, obj: Any) -> list[Any] | None:
    """Every process's ``obj`` in rank order on rank 0; None on the other ranks."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def shard(ctx: DistContext, n: int) -> slice:
    """This rank's contiguous share of ``n`` items (the first ``n % world`` ranks take one
    more), so that concatenating the shards in rank order restores the original order."""
    base, extra = divmod(n, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (ctx.rank < extra))
