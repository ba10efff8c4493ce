"""The process group ``torchrun`` describes (RANK / WORLD_SIZE / LOCAL_RANK), the device of this
process, and what the ranks compute together: DDP, the all-reduced totals, rank divergence.

Outside ``torchrun`` a run is one process and none of this communicates.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from .errors import SetupError

__all__ = [
    "DistInfo",
    "select_device",
    "env_int",
    "setup",
    "sync_batch_norm",
    "wrap",
    "totals",
    "rank_divergence",
    "barrier",
    "teardown",
]


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def select_device(arg: str, local_rank: int) -> torch.device:
    """The device ``--device arg`` means for the process of ``local_rank`` (plain cuda: its GPU)."""
    if arg == "auto":
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(arg)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def env_int(name: str, default: int, least: int) -> int:
    """The integer environment variable ``name`` (torchrun sets it), at least ``least``."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise SetupError(f"environment variable {name}={text!r} must be an integer") from None
    if value < least:
        raise SetupError(f"environment variable {name}={value} must be >= {least}")
    return value


def setup(device_arg: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (none: single process)."""
    world_size = env_int("WORLD_SIZE", 1, 1)
    rank = env_int("RANK", 0, 0)
    if rank >= world_size:
        raise SetupError(f"environment variable RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    info = DistInfo(rank=rank, world_size=world_size, local_rank=env_int("LOCAL_RANK", 0, 0))
    device = select_device(device_arg, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def sync_batch_norm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` with its batch norm layers normalising over the global batch, as one process
    would (``SyncBatchNorm``, in place: the same parameters and buffers, so the optimizer and
    checkpoints are unaffected). PyTorch's SyncBatchNorm runs on GPUs only: on a CPU a model with
    batch norm (Efficient-CapsNet) is refused, since each process would normalise over its own
    slice of the batch and the run would silently differ from the single-process one."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type != "cuda":
        raise SetupError(
            f"{type(model).__name__} has batch norm layers, which multi-process training keeps in step "
            "with SyncBatchNorm, and PyTorch's SyncBatchNorm needs CUDA: train it in one process on a CPU"
        )
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap(model: torch.nn.Module, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """``model`` in DistributedDataParallel across the process group, batch norm synchronised
    (:func:`sync_batch_norm`); itself in a single process."""
    if not info.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        sync_batch_norm(model, device), device_ids=[device.index] if device.type == "cuda" else None
    )


def totals(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, info: DistInfo) -> tuple[float, float, int]:
    """Mean loss, accuracy and example count over every rank's share (one sync, one all-reduce)."""
    t = torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(float(seen))])
    if info.distributed:
        dist.all_reduce(t)
    loss_sum, correct, n = t.tolist()
    return loss_sum / max(n, 1), correct / max(n, 1), int(n)


def rank_divergence(model: torch.nn.Module, info: DistInfo) -> float:
    """Largest difference of any parameter between ranks (0 when they are in sync)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


def barrier(info: DistInfo) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if info.distributed:
        dist.barrier()


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
