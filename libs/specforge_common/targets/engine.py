"""What every target backend (HF transformers, SGLang, ...) offers the capture, trainer and
evaluator services, and the rule that picks which decoder layers feed the EAGLE-3 draft.

Conventions shared by all backends, so features from any backend are interchangeable:

* Aux layer id ``i`` is a 0-based decoder-layer index whose **output** is captured, i.e. HF
  ``model(..., output_hidden_states=True).hidden_states[i + 1]``.
* ``CaptureOutput.hidden_states`` is the final hidden state **after** the final norm: exactly the
  input of ``lm_head``, so ``lm_head(hidden_states)`` are the target logits.
* Batches are right-padded; positions run ``0..T-1`` in every row. Features at pad positions are
  unspecified (callers mask them with the attention mask).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

AuxLayerIds = tuple[int, int, int]


def default_aux_layer_ids(num_layers: int) -> AuxLayerIds:
    """EAGLE-3's default ``[1, N//2 - 1, N - 4]``: one low, one middle, one high layer."""
    if num_layers < 5:
        raise ValueError(f"the default aux layers need a target with >= 5 layers, not {num_layers}")
    return (1, num_layers // 2 - 1, num_layers - 4)


def _validated(ids: Sequence[Any], num_layers: int, source: str) -> AuxLayerIds:
    values = list(ids)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{source} must be exactly 3 ints, got {ids!r}")
    bad = [v for v in values if not 0 <= v < num_layers]
    if bad:
        raise ValueError(f"{source} {values} out of range for a {num_layers}-layer target: {bad}")
    return (values[0], values[1], values[2])


def resolve_aux_layer_ids(
    explicit: Sequence[int] | None,
    draft_config: Mapping[str, Any] | None,
    num_layers: int,
) -> AuxLayerIds:
    """Pick the aux layers: explicit ids > draft config ``eagle_config`` > the default rule.

    The draft config wins over the default so a draft trained elsewhere (e.g. with DeepSeek-V3's
    ``[1, 29, 57]``) keeps receiving the features it was trained on.
    """
    if explicit is not None:
        return _validated(explicit, num_layers, "explicit aux_hidden_state_layer_ids")
    eagle = (draft_config or {}).get("eagle_config") or {}
    from_draft = eagle.get("eagle_aux_hidden_state_layer_ids")
    if from_draft is not None:
        return _validated(from_draft, num_layers, "draft eagle_aux_hidden_state_layer_ids")
    return default_aux_layer_ids(num_layers)


@dataclass(frozen=True)
class TargetInfo:
    """Facts about the target that drafts and feature consumers size themselves from."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


@dataclass
class CaptureOutput:
    """The features an EAGLE-3 draft trains on, for one right-padded batch."""

    aux_hidden_states: Tensor  # [B, T, 3H]: outputs of the 3 aux layers, concatenated in id order
    hidden_states: Tensor  # [B, T, H]: final hidden state after the final norm (lm_head's input)


@runtime_checkable
class TargetEngine(Protocol):
    """A frozen target model. All methods run without grad and never change the weights."""

    info: TargetInfo
    aux_layer_ids: AuxLayerIds
    device: torch.device
    dtype: torch.dtype

    def capture(self, input_ids: Tensor, attention_mask: Tensor) -> CaptureOutput:
        """Aux + final hidden states of a right-padded batch, without the full-vocab logits."""
        ...

    def forward_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Full-vocab logits ``[B, T, V]`` (for checks and teachers; capture avoids them)."""
        ...

    def generate_and_capture(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int],
        temperature: float = 0.0,
        seeds: Sequence[int | None] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[Any]:
        """Decode mode in one pass: each prompt's reply and the features of prompt + reply."""
        ...

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """New tokens per row (greedy at temperature 0), each cut after its first stop token."""
        ...
