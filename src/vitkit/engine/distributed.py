"""Process-group set-up for ``torchrun``: gloo on CPU, nccl when CUDA is present.

Without ``torchrun`` (no WORLD_SIZE in the environment) everything runs in one process and the helpers
below degrade to no-ops, so the trainer has a single code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def init_distributed() -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank, device)


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
