r"""Data parallelism for ``attribute``: which process this is, and the few collectives needed.

``accelerate launch`` and ``torchrun`` both start one process per worker with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment;
that is all this module reads (``accelerate launch --multi_gpu`` starts the processes
through torchrun, also on a machine without GPUs; Open MPI's ``OMPI_COMM_WORLD_*``
variables are read when those are absent). The unfinished shards are dealt round-robin,
so the work split needs no communication at all: the process group (gloo, which runs on
CPU tensors whatever the device) is opened only when ``WORLD_SIZE > 1``, and used for a
few barriers, one broadcast (rank 0's verdict on the output folder) and one all-reduce
(did every rank finish?), after which rank 0 writes the index.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

__all__ = [
    "ProcessInfo",
    "from_env",
    "process_group",
    "barrier",
    "all_succeeded",
    "broadcast_object",
    "gather_objects",
    "shards_of_rank",
]


@dataclass(frozen=True)
class ProcessInfo:
    r"""Where this process stands in a data-parallel run.

    Attributes:
        rank (int): this process's index, ``0..world_size-1``.
        world_size (int): how many processes share the run.
        local_rank (int): index among the processes of this machine (picks the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        r"""Whether this is rank 0 (the one that writes the index and merges errors)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        r"""Whether more than one process shares the run."""
        return self.world_size > 1


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def from_env(env: Optional[Mapping[str, str]] = None) -> ProcessInfo:
    r"""Rank, world size and local rank from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
    (set by ``torchrun`` and ``accelerate launch``); one process when they are absent.

    Args:
        env (Mapping[str, str], optional): the environment to read (default:
            ``os.environ``).

    Returns:
        ProcessInfo: this process's rank, the world size and the local rank.

    Raises:
        ValueError: the variables are not integers, or ``RANK`` is outside
            ``0..WORLD_SIZE-1``.
    """
    env = os.environ if env is None else env
    if not env.get("WORLD_SIZE") and env.get("OMPI_COMM_WORLD_SIZE"):  # mpirun
        world = _int_env(env, "OMPI_COMM_WORLD_SIZE", 1)
        rank = _int_env(env, "OMPI_COMM_WORLD_RANK", 0)
        local = _int_env(env, "OMPI_COMM_WORLD_LOCAL_RANK", rank)
    else:
        world = _int_env(env, "WORLD_SIZE", 1)
        rank = _int_env(env, "RANK", 0)
        local = _int_env(env, "LOCAL_RANK", rank if world > 1 else 0)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return ProcessInfo(rank=rank, world_size=world, local_rank=local)


@contextlib.contextmanager
def process_group(info: ProcessInfo, timeout_s: float = 1800.0) -> Iterator[ProcessInfo]:
    r"""A gloo process group for the block when ``info.world_size > 1`` (none otherwise);
    one that is already open (e.g. by accelerate) is used as it is and left open.

    Raises:
        ValueError: several processes, but ``MASTER_ADDR``/``MASTER_PORT`` are not set
            (start the processes with ``torchrun`` or ``accelerate launch``).
    """
    if not info.distributed:
        yield info
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield info
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={info.world_size} but {' and '.join(missing)} not set: start the "
            "processes with torchrun or accelerate launch"
        )
    dist.init_process_group(
        "gloo", init_method="env://", rank=info.rank, world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        yield info
    finally:
        dist.destroy_process_group()


def barrier(info: ProcessInfo) -> None:
    r"""Wait until every process gets here (nothing to do for one process)."""
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_succeeded(info: ProcessInfo, ok: bool) -> bool:
    r"""True on every rank exactly when ``ok`` is true on every rank (an all-reduce)."""
    if not info.distributed:
        return ok
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":  # a group opened by the caller (accelerate) on GPUs
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_object(info: ProcessInfo, obj: Any) -> Any:
    r"""Rank 0's ``obj`` on every rank (a picklable object; ``obj`` of other ranks is
    ignored)."""
    if not info.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(info: ProcessInfo, obj: Any) -> Optional[List[Any]]:
    r"""Every rank's ``obj``, in rank order, on rank 0 (None on the other ranks); for one
    process, ``[obj]``."""
    if not info.distributed:
        return [obj]
    import torch.distributed as dist

    out: Optional[List[Any]] = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def shards_of_rank(shards: Sequence[int], info: ProcessInfo) -> List[int]:
    r"""The shards of ``shards`` this process computes: positions ``rank, rank +
    world_size, ...`` of the list (round-robin)."""
    return list(shards)[info.rank :: info.world_size]


def describe(info: ProcessInfo) -> Dict[str, int]:
    r"""The process's place, for logs."""
    return {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank}
