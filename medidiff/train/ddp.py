"""Multi-process data-parallel training (PyTorch DDP), launched by ``torchrun`` or :func:`launch_local`.

The training loop asks :func:`dist_info` where it runs. Inside an initialised process group each
rank trains its own replica on its own batches, gradients are averaged by DDP, and rank 0 alone
writes checkpoints, model cards and metrics. Outside one (the usual single-process case) every
helper here is a no-op.

Launch on a GPU node with::

    torchrun --nproc_per_node=4 -m medidiff.cli train ...

:func:`init_distributed` reads the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables torchrun sets.
Each rank must be given its own share of the data (e.g. a ``DistributedSampler``).
"""

from __future__ import annotations

import gc
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "dist_info",
    "gather_json",
    "init_distributed",
    "launch_local",
    "shutdown_distributed",
    "unwrap",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: ``rank`` of ``world_size``, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _default_device(local_rank: int) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def dist_info(device: str | torch.device | None = None) -> DistInfo:
    """This process's rank, world size and device (rank 0 of 1 without a process group).

    Args:
        device: the device to use; by default ``cuda:<LOCAL_RANK>`` if CUDA is available, else CPU.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
    else:
        rank, world, local = 0, 1, 0
    dev = torch.device(device) if device is not None else _default_device(local)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables (if any).

    Does nothing when ``WORLD_SIZE`` is unset or 1, or when a group is already initialised.
    ``backend`` defaults to NCCL with CUDA and gloo without.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return dist_info()


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group cleanly (call once at the end of a torchrun script).

    DDP reducers left to the cyclic garbage collector would be torn down after the process group,
    at interpreter exit, and abort the process (gloo: "terminate called without an active
    exception"); they are freed here while the group exists, and with ``wait`` no rank leaves while
    another still talks to it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    try:
        if wait:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed; ``model`` itself otherwise."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _comm_device(info: DistInfo) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return info.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``values`` over ranks (a copy; ``values`` itself when not distributed)."""
    if not info.distributed:
        return values
    t = values.detach().to(_comm_device(info), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(values.device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def gather_json(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (JSON-serialisable), in rank order, on every rank.

    Sent as UTF-8 JSON bytes, so no pickling is involved.
    """
    if not info.distributed:
        return [obj]
    dev = _comm_device(info)
    blob = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=dev)
    size = torch.tensor([blob.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(info.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: blob.numel()] = blob
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return [
        json.loads(bytes(p[: int(s)].cpu().tolist()).decode("utf-8"))
        for p, s in zip(parts, sizes, strict=True)
    ]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    backend: str,
    threads: int,
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(threads)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    ok = False
    try:
        fn(rank, *args)
        ok = True
    finally:
        shutdown_distributed(wait=ok)


def launch_local(
    fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", threads: int = 1
) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` new processes joined in one process group.

    For tests and single-machine CPU runs (torchrun is the launcher on a cluster). ``fn`` must be
    importable by name (a module-level function). Raises if any process fails.

    Args:
        fn: the per-rank function.
        world_size: number of processes.
        args: further arguments of ``fn`` (picklable: they cross the process boundary).
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        threads: torch intra-op threads per process (keep processes x threads <= cores).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    import torch.multiprocessing as mp

    mp.spawn(
        _local_worker,
        args=(fn, world_size, _free_port(), backend, threads, args),
        nprocs=world_size,
        join=True,
    )
