"""The compute precision of a train step (``train.precision``).

``bf16`` is autocast to bfloat16 on CUDA: matmuls and attention run in bf16 while the trainable
weights, their gradients and AdamW's state stay fp32 (the weights are the fp32 master copy;
autocast casts them per matmul). Nothing else changes: the optimizer, clipping, checkpoints and
resume all see fp32 tensors, as on CPU. A CPU refuses ``bf16``: its bf16 matmuls are hundreds of
times slower than fp32 there, so asking for it is a mistake, not a setting. ``auto`` is bf16 on
CUDA and fp32 elsewhere, which is what the trainer has always done.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
ResolvedPrecision = Literal["fp32", "bf16"]


def resolve_precision(precision: Precision, device: torch.device) -> ResolvedPrecision:
    """``auto`` made concrete for ``device``; ``bf16`` anywhere but CUDA is a ValueError."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ValueError(
            f"train.precision bf16 needs a CUDA device, this step runs on {device.type}; "
            "set train.precision to fp32 or auto (bf16 on CPU is far slower than fp32)"
        )
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown train.precision {precision!r}; known: auto, fp32, bf16")
    return precision


def autocast(precision: ResolvedPrecision) -> AbstractContextManager:
    """The autocast context of a resolved precision: bf16 autocast on CUDA, or a no-op (fp32;
    inside an enclosing autocast it turns autocast off)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
