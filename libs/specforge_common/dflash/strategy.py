"""The DFlash training strategy: many blocks per sequence, drafted in one forward, hard-label CE.

Per sequence: sample anchors, build one block per anchor, run the draft once over all blocks
(queries: every block token; keys: the projected target context then every block token, under
the block mask), read out with the target's frozen lm_head and take the weighted CE of each
drafted position against the true next tokens. The loss is a weighted *sum* with its weight
(``StrategyOutput.loss_weight``): the trainer normalises by the weight of the whole window.

The vocabulary projection and CE run ``objective_chunk_blocks`` blocks at a time under activation
checkpointing, so ``[blocks, D, V]`` logits never exist whole (they are recomputed per chunk in
the backward pass); ``objective_chunk_blocks = 0`` projects all blocks at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..batch import TrainBatch
from ..models.dflash import DFlashDraft, read_out
from ..models.layers import upcast
from ..registry import STRATEGIES
from ..strategy import StrategyOutput
from .anchors import sample_anchors
from .blocks import (
    block_attention_mask,
    block_positions,
    block_targets,
    block_token_ids,
    previous_tokens,
)
from .metrics import BlockMetrics

if TYPE_CHECKING:
    from ..contracts import RunSpec


@dataclass
class DraftedBlocks:
    """The valid blocks of a batch, flattened to ``N`` blocks of ``D`` drafted positions."""

    hidden: torch.Tensor  # [N, D, H] draft hidden states of the drafted positions
    labels: torch.Tensor  # [N, D] int64
    supervised: torch.Tensor  # [N, D] bool
    weights: torch.Tensor  # [N, D] float32, decayed
    prev_ids: torch.Tensor  # [N, D] the token before each label (Domino's GRU inputs)


def check_knobs(spec: RunSpec, config: Any, names: Sequence[str]) -> None:
    """The run's overrides must be what the draft config holds (a loaded draft could differ)."""
    overrides = dict(spec.draft.config)
    overrides |= overrides.get("dflash_config") or {}
    for name in names:
        if name in overrides and overrides[name] != getattr(config, name):
            raise ValueError(
                f"the run sets {name}={overrides[name]!r} but the draft config holds "
                f"{getattr(config, name)!r}"
            )


def run_chunked(
    fn: Callable[..., tuple[torch.Tensor, ...]], tensors: Sequence[torch.Tensor], chunk: int
) -> list[torch.Tensor]:
    """``fn`` over slices of ``chunk`` rows (all rows when 0), checkpointed when training;
    returns its outputs: the first (a scalar) summed, the others concatenated."""
    n = tensors[0].shape[0]
    size = chunk if chunk > 0 else max(n, 1)
    outs: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, n, size):
        part = [t[start : start + size] for t in tensors]
        if torch.is_grad_enabled():
            outs.append(checkpoint(fn, *part, use_reentrant=False))
        else:
            outs.append(fn(*part))
    total = torch.stack([o[0] for o in outs]).sum()
    return [total] + [torch.cat([o[i] for o in outs]) for i in range(1, len(outs[0]))]


@STRATEGIES.register("dflash")
class DFlashStrategy:
    """Loss and telemetry of one batch for a DFlash draft."""

    capture_method: ClassVar[str] = "dflash"
    weighted_loss: ClassVar[bool] = True
    knobs: ClassVar[tuple[str, ...]] = ("num_anchors", "loss_decay_gamma", "objective_chunk_blocks")

    def __init__(
        self,
        draft: DFlashDraft,
        target_head: torch.Tensor,
        target_embedding: torch.Tensor,
        *,
        num_anchors: int = 512,
        loss_decay_gamma: float | None = 7.0,
        objective_chunk_blocks: int = 128,
    ) -> None:
        config = draft.config
        H, V = config.hidden_size, config.vocab_size
        for name, tensor in (("head", target_head), ("embedding", target_embedding)):
            if tuple(tensor.shape) != (V, H):
                raise ValueError(
                    f"target {name} has shape {tuple(tensor.shape)}, the draft needs ({V}, {H}) "
                    "(block drafters share the target's vocabulary and hidden size)"
                )
        self.draft = draft
        # Upcast once: logits are computed in at least fp32, and a per-chunk cast of a
        # low-precision head would copy it every time.
        self.target_head = upcast(target_head.detach())
        self.target_embedding = target_embedding.detach()
        self.num_anchors = num_anchors
        self.loss_decay_gamma = loss_decay_gamma
        self.objective_chunk_blocks = objective_chunk_blocks
        self.shift_label = bool(getattr(config, "shift_label", False))
        self.step = 0

    @classmethod
    def strategy_kwargs(cls, config: Any, total_steps: int | None) -> dict[str, Any]:
        del total_steps
        return {name: getattr(config, name) for name in cls.knobs}

    @classmethod
    def from_spec(
        cls,
        spec: RunSpec,
        draft: DFlashDraft,
        *,
        target_head: torch.Tensor,
        target_embedding: torch.Tensor,
        total_steps: int | None,
    ) -> Self:
        """Block size, mask token and knobs come from the draft config (the run's overrides were
        applied to it when the draft was built)."""
        check_knobs(spec, draft.config, cls.knobs)
        return cls(draft, target_head, target_embedding,
                   **cls.strategy_kwargs(draft.config, total_steps))  # fmt: skip

    def set_step(self, step: int) -> None:
        self.step = step

    def empty_metrics(self) -> BlockMetrics:
        return BlockMetrics.zeros(self.draft.config.num_drafted)

    def draft_blocks(self, batch: TrainBatch) -> DraftedBlocks:
        """Anchors -> blocks -> one draft forward -> the valid blocks' drafted positions."""
        draft, config = self.draft, self.draft.config
        bs, D = config.block_size, config.num_drafted
        first = 0 if self.shift_label else 1  # block position of drafted position 0
        anchors, valid = sample_anchors(
            batch.loss_mask, batch.attention_mask, batch.seeds, self.num_anchors
        )
        B, A = anchors.shape
        T = batch.input_ids.shape[1]
        dtype = draft.fc.weight.dtype
        ids = block_token_ids(batch.input_ids, anchors, valid, bs, config.mask_token_id)
        embeds = F.embedding(ids.view(B, A * bs), self.target_embedding).to(dtype)
        context = draft.project_context(batch.aux_hidden_states.to(dtype))
        ctx_positions = torch.arange(T, device=anchors.device).expand(B, T)
        mask = block_attention_mask(anchors, valid, batch.attention_mask, bs, config.sliding_window)
        hidden = draft(embeds, context, block_positions(anchors, bs), ctx_positions, mask)
        hidden = hidden.view(B, A, bs, -1)[:, :, first : first + D]
        targets = block_targets(batch.input_ids, batch.loss_mask, batch.attention_mask, anchors,
                                valid, D, self.loss_decay_gamma)  # fmt: skip
        prev = previous_tokens(batch.input_ids, anchors, D)
        return DraftedBlocks(
            hidden=hidden[valid],
            labels=targets.labels[valid],
            supervised=targets.supervised[valid],
            weights=targets.weights[valid],
            prev_ids=prev[valid],
        )

    def _graph_zero(self) -> torch.Tensor:
        """A zero loss still tied to every trainable parameter (a batch without blocks must not
        leave parameters out of the graph under data parallelism)."""
        params = [p for p in self.draft.parameters() if p.requires_grad]
        return torch.stack([upcast(p).sum() for p in params]).sum() * 0.0

    def objective(self, blocks: DraftedBlocks) -> tuple[torch.Tensor, BlockMetrics]:
        head = self.target_head

        def chunk(hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
            logits = read_out(hidden, head)
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            ce = ce.view_as(labels)
            return (ce * weights).sum(), ce.detach(), logits.detach().argmax(dim=-1)

        if blocks.labels.shape[0] == 0:
            return self._graph_zero(), self.empty_metrics()
        loss, ce, predicted = run_chunked(
            chunk, (blocks.hidden, blocks.labels, blocks.weights), self.objective_chunk_blocks
        )
        metrics = BlockMetrics.measure(ce, predicted, blocks.labels, blocks.supervised,
                                       blocks.weights)  # fmt: skip
        return loss, metrics

    def __call__(self, batch: TrainBatch) -> StrategyOutput:
        blocks = self.draft_blocks(batch)
        loss, metrics = self.objective(blocks)
        return StrategyOutput(loss=loss, metrics=metrics, loss_weight=blocks.weights.sum())
