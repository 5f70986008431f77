"""Multi-rank training under ``torchrun``: process group, DDP wrapper and small collectives.

``DistEnv.from_env()`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by torchrun); with
``WORLD_SIZE > 1`` ``init_process_group`` joins the group (gloo on CPU, nccl on CUDA, rendezvous
through ``MASTER_ADDR`` / ``MASTER_PORT``). ``DraftModule`` makes the strategy's forward a module
forward, so DDP can wrap it (DDP only averages parameters with ``requires_grad``; the frozen
embedding is left out). The helpers below are no-ops in a single process.

FSDP (``shard_draft``, for drafts whose parameters, gradients and AdamW state do not fit one
device several times over): FSDP2 ``fully_shard`` on the decoder layer and on the whole module,
so each rank holds 1 / world_size of every parameter (the frozen target embedding included) and
of the optimizer state, and all-gathers a unit only while it runs. Checkpoints stay
sharding-free: ``full_state`` gathers the full weights and the optimizer state keyed by
parameter name onto rank 0 (a collective), and ``load_full_state`` gives every rank its shard
back from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from specforge_common.strategy import StrategyMetrics

__all__ = [
    "DistEnv",
    "DraftModule",
    "full_state",
    "load_full_state",
    "shard_draft",
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


def all_reduce_metrics(metrics: StrategyMetrics) -> StrategyMetrics:
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
    return metrics.from_tensors(out)


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

    def forward(self, batch: Any) -> tuple[torch.Tensor, StrategyMetrics, torch.Tensor | None]:
        out = self._strategy[0](batch)
        return out.loss, out.metrics, out.loss_weight


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise SUM of small float values over the ranks."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def shard_draft(module: DraftModule) -> DraftModule:
    """One FSDP2 unit for the whole draft. The decoder layer is deliberately not a unit of its
    own: the training-time-test unroll runs it ``ttt_length`` times per forward, and a separate
    unit reshards and reduce-scatters it per use, which gave wrong gradients in testing."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(module)
    return module


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(module: DraftModule, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(draft weights, optimizer state by parameter name), full, on rank 0's CPU; empty dicts
    on the other ranks. A collective: every rank calls it at the same step."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    weights = get_model_state_dict(module, options=_options(cpu_offload=True))
    prefix = "draft."
    weights = {k.removeprefix(prefix): v for k, v in weights.items()}
    if not optimizer.state:  # before the first step: reading would initialise it (a fake step)
        return weights, {"state": {}, "param_groups": []}
    optim = get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))
    return weights, optim


def load_full_state(
    module: DraftModule,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    optim: dict[str, Any],
) -> None:
    """Every rank passes the full weights (unprefixed draft keys; missing frozen ones keep their
    values) and full optimizer state; each keeps its shard. A collective."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    prefixed = {f"draft.{k}": v for k, v in weights.items()}
    set_model_state_dict(module, prefixed, options=_options(strict=False))
    if optim.get("state"):  # an empty one is a fresh optimizer: leave it uninitialised
        set_optimizer_state_dict(module, optimizer, optim, options=_options())
