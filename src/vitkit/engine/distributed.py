"""Process-group set-up for ``torchrun`` and the training device (``train.device``): nccl on CUDA, gloo on CPU.

Without ``torchrun`` (no WORLD_SIZE in the environment) everything runs in one process and the helpers
below degrade to no-ops, so the trainer has a single code path.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")  # train.device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(setting: str = "auto", local_rank: int | None = None) -> torch.device:
    """``train.device`` -> this process's device: ``auto`` takes CUDA when torch sees a GPU, else the CPU;
    ``cuda`` without a GPU is a one-line error rather than a crash at the first tensor moved there.
    ``local_rank`` (under torchrun) picks the process's own GPU."""
    if setting not in DEVICES:
        raise ConfigError(f"train.device={setting!r} must be one of {', '.join(DEVICES)}")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device=cuda but torch {torch.__version__} sees no CUDA device "
                          "(torch.cuda.is_available() is False); use train.device=auto or cpu")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank) if local_rank is not None else torch.device("cuda")


def loader_settings(device: torch.device, num_workers: int | str = "auto") -> dict[str, Any]:
    """DataLoader keywords sized from the device: on CUDA, page-locked batches (so the copies that
    ``to_device`` makes with ``non_blocking=True`` overlap the step) and, for ``num_workers: auto``, loader
    processes that share this node's cores with the node's other training processes, 4 batches ahead each. On
    the CPU, ``auto`` is 0: the cores that would decode batches are the ones computing the step."""
    cuda = device.type == "cuda"
    if num_workers == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        num_workers = min(8, max(1, per_process - 1)) if cuda else 0
    settings: dict[str, Any] = {"num_workers": int(num_workers), "pin_memory": cuda}
    if num_workers:
        settings["prefetch_factor"] = 4 if cuda else 2
    return settings


def autocast_dtype(device: torch.device, bf16: bool | str) -> torch.dtype | None:
    """The dtype ``train.bf16`` autocasts to on ``device``: bfloat16, or None for fp32. ``auto`` takes bf16 only
    where the device computes it natively (a CPU with AVX512-BF16 or AMX, a GPU from Ampere on): emulated bf16 is
    slower than fp32. Never fp16: it would need a gradient scaler, whose state exact resume would have to carry.
    None on a device without autocast (``meta``)."""
    if not torch.amp.is_autocast_available(device.type):
        return None
    if bf16 == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        else:
            from ..utils import native_bf16_supported

            bf16 = native_bf16_supported()
    return torch.bfloat16 if bf16 else None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any; ``device`` is
    ``train.device`` (nccl joins CUDA processes, gloo CPU ones)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device, local_rank)
    if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" \
            and os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") not in ("", "0"):
        # torchrun keeps its rendezvous store across restarts, previous workers' addresses included
        warnings.warn("torchrun --max-restarts: restarted workers may read the previous round's addresses from the "
                      "shared rendezvous store and fail to connect (pytorch/pytorch#135712); export "
                      "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun", stacklevel=2)
    if chosen.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, chosen)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every process's tensor along dim 0; the backward pass sums the gradient that each
    process's loss sends to a slice and hands each process the gradient of its own slice.

    Written with ``all_reduce`` rather than ``torch.distributed.nn.all_gather`` because the latter's backward
    needs ``reduce_scatter``, which gloo (CPU) does not implement.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        ctx.rank, ctx.rows = rank, t.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """(B, ...) on each of N processes -> (N*B, ...) on every process, rank order, gradients flowing back.

    Every process must pass the same shape. With DDP averaging gradients over processes, a loss that averages
    over the local rows of the gathered batch gets the same gradients as the single-process loss over the
    whole global batch.
    """
    if not info.enabled:
        return t
    return _GatherWithGrad.apply(t)


def gather_object(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every process's ``obj`` in rank order on rank 0 (None elsewhere, and None without torchrun), e.g. each
    process's RNG state for a checkpoint that rank 0 writes."""
    if not info.enabled:
        return None
    box: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, box, dst=0)
    return box


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
