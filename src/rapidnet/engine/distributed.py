"""One process or many: ``torchrun`` environment, process group, rank-0 helpers and metric reduction.

The same command runs alone or under ``torchrun`` (single or multi node): ``init_distributed`` reads the variables
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) and picks NCCL for CUDA, gloo for CPU.
Everything else in the engine asks a :class:`DistInfo` instead of touching ``torch.distributed`` directly, so the
one-process path has no collective calls at all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from rapidnet.errors import ConfigError

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "cleanup_distributed",
    "init_distributed",
    "reduce_sums",
    "resolve_device",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes checkpoints and shows progress bars."""
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU when there is one, else CPU; explicit names are checked, not trusted."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} asked for but CUDA is not available here: use --device cpu")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ConfigError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); otherwise a one-process :class:`DistInfo`.

    Rank and world size come from the environment, so single-node and multi-node launches need nothing else.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(info: DistInfo, values: Sequence[float] | torch.Tensor, op: str = "sum") -> list[float]:
    """Sum (or ``max``/``min``) a few numbers over all processes in one collective; identity on one process.

    Float64 keeps counts and loss sums exact enough that distributed evaluation equals the one-process result.
    """
    tensor = torch.as_tensor(values, dtype=torch.float64).clone()
    if info.distributed:
        # gloo reduces CPU tensors; NCCL needs them on the GPU
        tensor = tensor.to(info.device) if info.device.type == "cuda" else tensor
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(tensor, op=reduce_op)
    return tensor.cpu().tolist()


def reduce_sums(info: DistInfo, sums: Mapping[str, float]) -> dict[str, float]:
    """All-reduce a dict of sums, keeping its keys."""
    keys = list(sums)
    return dict(zip(keys, all_reduce_sum(info, [float(sums[k]) for k in keys]), strict=True))
