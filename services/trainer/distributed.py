"""Multi-rank training under ``torchrun``: process group, DDP wrapper and small collectives.

``DistEnv.from_env()`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by torchrun); with
``WORLD_SIZE > 1`` ``init_process_group`` joins the group (gloo on CPU, nccl on CUDA, rendezvous
through ``MASTER_ADDR`` / ``MASTER_PORT``). ``DraftModule`` makes the strategy's forward a module
forward, so DDP can wrap it (DDP only averages parameters with ``requires_grad``; the frozen
embedding is left out). The helpers below are no-ops in a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from specforge_common.eagle3 import Eagle3Metrics

__all__ = [
    "DistEnv",
    "DraftModule",
    "all_gather_objects",
    "all_reduce_flags",
    "all_reduce_metrics",
    "all_reduce_sum",
    "backend_for",
    "destroy_process_group",
    "init_process_group",
    "is_distributed",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistEnv:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_process_group(env: DistEnv, device: torch.device | str) -> bool:
    """Join the process group when ``world_size > 1`` (idempotent); True when distributed."""
    if env.world_size <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), rank=env.rank, world_size=env.world_size)
    return True


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_flags(flags: list[int]) -> list[int]:
    """Element-wise MAX of small integer flags over the ranks (the flags themselves alone)."""
    if not is_distributed():
        return list(flags)
    t = torch.tensor(flags, dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def all_reduce_metrics(metrics: Eagle3Metrics) -> Eagle3Metrics:
    """The metric sums added over the ranks (SUM) — ratios are taken after this."""
    if not is_distributed():
        return metrics
    parts = metrics.tensors()
    flat = torch.cat([p.reshape(-1).to(torch.float64) for p in parts]).to(_comm_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    out, offset = [], 0
    for p in parts:
        out.append(flat[offset : offset + p.numel()].reshape(p.shape).to(p.dtype))
        offset += p.numel()
    return Eagle3Metrics(*out, step_weight_decay=metrics.step_weight_decay)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class DraftModule(torch.nn.Module):
    """The draft as a module whose forward is the training strategy, for DDP to wrap."""

    def __init__(self, draft: torch.nn.Module, strategy: Any) -> None:
        super().__init__()
        self.draft = draft
        self._strategy = [strategy]  # not a submodule: the head is no parameter of ours

    def forward(self, batch: Any) -> tuple[torch.Tensor, Eagle3Metrics]:
        out = self._strategy[0](batch)
        return out.loss, out.metrics


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise SUM of small float values over the ranks."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]
