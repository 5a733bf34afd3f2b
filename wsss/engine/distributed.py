"""torch.distributed set-up for ``torchrun``, and the device of this process.

The same command runs on one process or many::

    wsss train voc                                   # world size 1
    torchrun --nproc_per_node=4 -m wsss.cli train voc
    torchrun --nnodes=2 --node_rank=R --master_addr=H --nproc_per_node=8 -m wsss.cli train voc

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the process
group is initialised from them (``env://``) with NCCL on CUDA and Gloo on CPU. Without
them this is world size 1 and no process group exists: every helper below then
degenerates to the single-process case, there is no separate code path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from wsss.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got '{value}'") from None


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``train.device``: "auto" (CUDA if available, else CPU), "cpu", "cuda" (GPU ``local_rank``), "cuda:N"."""
    spec = spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device is '{spec}' but no CUDA device is available; use train.device=cpu")
        index = local_rank if spec == "cuda" else int(spec.split(":", 1)[1]) if spec[5:].isdigit() else -1
        if not 0 <= index < torch.cuda.device_count():
            raise ConfigError(
                f"train.device '{spec}' names a GPU that does not exist ({torch.cuda.device_count()} visible)")
        return torch.device("cuda", index)
    raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got '{spec}'")


def init_distributed(device_spec: str = "auto") -> DistContext:
    """Initialise the process group from torchrun's variables (if any) -> this process's context."""
    world_size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", 0)
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
        logger.info("process group initialised: rank %d of %d (%s, %s)", rank, world_size, backend, device)
    if world_size > 1 and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU processes of one machine share its cores; without this each would use all of them.
        local_world = env_int("LOCAL_WORLD_SIZE", world_size)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistContext(rank, local_rank, world_size, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place); identity for world size 1."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order; ``[obj]`` for world size 1."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """The element-wise sum of ``values`` over all ranks (float64); the values themselves without a group."""
    if not is_initialized():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@contextlib.contextmanager
def joined(device_spec: str) -> Iterator[DistContext]:
    """The DistContext of this process for an inference command: joins the torchrun process group when
    WORLD_SIZE > 1 and none is initialized yet, and leaves it again at the end."""
    created = env_int("WORLD_SIZE", 1) > 1 and not is_initialized()
    ctx = init_distributed(device_spec)
    try:
        yield ctx
    finally:
        if created:
            cleanup_distributed()


__all__ = [
    "DistContext", "all_gather_objects", "all_reduce_mean", "barrier", "cleanup_distributed", "init_distributed",
    "is_initialized", "joined", "rank_and_world", "resolve_device", "sum_over_ranks",
]
