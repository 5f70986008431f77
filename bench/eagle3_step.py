"""One EAGLE-3 training step as the trainer takes it, with random weights and features.

Shared by the CPU bench (``bench/train_step.py``) and the GPU check (``bench/gpu/``) so both time
the same step: a fresh draft (fp32 parameters, the trainer's masters), the target's frozen
``lm_head``, one random right-padded batch, ``Eagle3Strategy`` for the loss, AdamW with the
trainer's settings and global grad-norm clipping at ``TrainSpec().max_grad_norm``.

Strategy options that newer trees add (``attention="auto"|"flex"``, ``loss_chunk_tokens``,
``activation_checkpointing``, ``precision``) are passed only where this tree's constructor takes
them (``strategy_options``), so the benchmarks run on older and newer trees alike and say which
options were dropped.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any

import torch

from specforge_common.batch import TrainBatch
from specforge_common.contracts import TrainSpec
from specforge_common.eagle3.strategy import Eagle3Strategy
from specforge_common.models import eagle3 as eagle3_model
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft


@dataclass(frozen=True)
class DraftDims:
    """The draft's shape and the target vocabulary it predicts into."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    draft_vocab: int

    def config(self) -> Eagle3Config:
        return Eagle3Config(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            draft_vocab_size=self.draft_vocab,
        )


# Llama-3.1-8B's EAGLE-3 draft: the shape the reference numbers were measured at.
LLAMA31_8B = DraftDims(
    hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, draft_vocab=32000
)


def attention_backends() -> tuple[str, ...]:
    """The ``attention`` values this tree's EAGLE-3 model knows."""
    return tuple(typing.get_args(getattr(eagle3_model, "AttentionBackend", None)) or ("sdpa",))


def strategy_options(**wanted: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the options ``Eagle3Strategy`` takes, the ones it does not); an unknown ``attention``
    value is dropped too, since older trees silently run their plain path for it."""
    accepted = inspect.signature(Eagle3Strategy.__init__).parameters
    kept, dropped = {}, {}
    for name, value in wanted.items():
        known = name in accepted and (name != "attention" or value in attention_backends())
        (kept if known else dropped)[name] = value
    return kept, dropped


def trainer_options(device: torch.device) -> dict[str, Any]:
    """The strategy options the trainer would use on ``device``: ``auto`` attention where the
    tree has it (flex on CUDA), bf16 on CUDA, the rest at their ``TrainSpec`` defaults."""
    spec = TrainSpec()
    cuda = device.type == "cuda"
    attention = "auto" if "auto" in attention_backends() else spec.attention
    options: dict[str, Any] = {"attention": attention, "precision": "bf16" if cuda else "fp32"}
    for name in ("loss_chunk_tokens", "activation_checkpointing"):
        if hasattr(spec, name):
            options[name] = getattr(spec, name)
    return options


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG ``fork_rng`` must save for work on ``device``."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def random_draft(dims: DraftDims, device: torch.device, seed: int = 0) -> Eagle3Draft:
    """A seeded fp32 draft on ``device``. Its frozen embedding is the target's (the same for
    every ``seed``, as the trainer copies it from the target) and its draft vocabulary the first
    ``draft_vocab`` target ids (so ``d2t`` is all zeros)."""
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        with torch.device(device):
            draft = Eagle3Draft(dims.config())
    gen = torch.Generator(device=device).manual_seed(3)
    with torch.no_grad():
        draft.embed_tokens.weight.normal_(0.0, draft.config.initializer_range, generator=gen)
    draft.t2d.zero_()
    draft.t2d[: dims.draft_vocab] = True
    return draft


def random_head(
    dims: DraftDims, device: torch.device, dtype: torch.dtype, seed: int = 1
) -> torch.Tensor:
    """The target's frozen ``lm_head`` [V, H] in its stored dtype."""
    gen = torch.Generator(device=device).manual_seed(seed)
    head = torch.randn(dims.vocab, dims.hidden, generator=gen, device=device) * 0.02
    return head.to(dtype)


def random_batch(
    dims: DraftDims, length: int, device: torch.device, dtype: torch.dtype, seed: int = 2
) -> TrainBatch:
    """One full-length sample: ids, all-ones masks and random features in the capture dtype."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ones = torch.ones(1, length, dtype=torch.long, device=device)
    return TrainBatch(
        input_ids=torch.randint(0, dims.vocab, (1, length), generator=gen, device=device),
        attention_mask=ones,
        loss_mask=ones.clone(),
        aux_hidden_states=torch.randn(
            1, length, 3 * dims.hidden, generator=gen, device=device, dtype=dtype
        ),
        hidden_states=torch.randn(
            1, length, dims.hidden, generator=gen, device=device, dtype=dtype
        ),
    )


def make_strategy(
    draft: Eagle3Draft, head: torch.Tensor, ttt_length: int, options: dict[str, Any]
) -> tuple[Eagle3Strategy, dict[str, Any]]:
    """The strategy with the options this tree takes; the dropped ones come back too."""
    kept, dropped = strategy_options(**options)
    return Eagle3Strategy(draft, head, ttt_length=ttt_length, **kept), dropped


def adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """The trainer's optimizer (``specforge_trainer.build``) at the default learning rate."""
    spec = TrainSpec()
    return torch.optim.AdamW(
        params, lr=spec.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=spec.weight_decay
    )


def clip(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The trainer's global grad-norm clipping; the norm (a DTensor's full value under FSDP)."""
    norm = torch.nn.utils.clip_grad_norm_(params, TrainSpec().max_grad_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
