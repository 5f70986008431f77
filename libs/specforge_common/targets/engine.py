"""What every target backend (HF transformers, SGLang, ...) offers the capture, trainer and
evaluator services, and the rules that pick which decoder layers feed the draft (per capture
method: EAGLE-3's three aux layers, DFlash's ``target_layer_ids``).

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
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..models.dflash import build_target_layer_ids

if TYPE_CHECKING:
    from ..contracts import RunSpec

AuxLayerIds = tuple[int, ...]  # eagle3: exactly 3; dflash: one per draft layer by default


def default_aux_layer_ids(num_layers: int) -> AuxLayerIds:
    """EAGLE-3's default ``[1, N//2 - 1, N - 4]``: one low, one middle, one high layer."""
    if num_layers < 5:
        raise ValueError(f"the default aux layers need a target with >= 5 layers, not {num_layers}")
    return (1, num_layers // 2 - 1, num_layers - 4)


def _validated(ids: Sequence[Any], num_layers: int, source: str, count: int | None = 3,
               ) -> AuxLayerIds:  # fmt: skip
    values = list(ids)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values) or not values:
        raise ValueError(f"{source} must be a non-empty list of ints, got {ids!r}")
    if count is not None and len(values) != count:
        raise ValueError(f"{source} must be exactly {count} ints, got {ids!r}")
    bad = [v for v in values if not 0 <= v < num_layers]
    if bad:
        raise ValueError(f"{source} {values} out of range for a {num_layers}-layer target: {bad}")
    return tuple(values)


def resolve_aux_layer_ids(
    explicit: Sequence[int] | None,
    draft_config: Mapping[str, Any] | None,
    num_layers: int,
    method: str = "eagle3",
) -> AuxLayerIds:
    """Pick the captured layers: explicit ids > the draft config's own > the method's default.

    The draft config wins over the default so a draft trained elsewhere (e.g. with DeepSeek-V3's
    ``[1, 29, 57]``) keeps receiving the features it was trained on. ``eagle3``: exactly three
    ids (``eagle_config.eagle_aux_hidden_state_layer_ids``); ``dflash``: any number
    (``dflash_config.target_layer_ids``; default ``build_target_layer_ids`` with the draft's
    ``num_hidden_layers``, 1 if unset).
    """
    config = draft_config or {}
    if method == "dflash":
        if explicit is not None:
            return _validated(explicit, num_layers, "explicit target_layer_ids", None)
        from_draft = (config.get("dflash_config") or {}).get("target_layer_ids")
        if from_draft is not None:
            return _validated(from_draft, num_layers, "draft dflash_config.target_layer_ids", None)
        return build_target_layer_ids(num_layers, int(config.get("num_hidden_layers", 1)))
    if method != "eagle3":
        raise ValueError(f"unknown capture method {method!r}; known: dflash, eagle3")
    if explicit is not None:
        return _validated(explicit, num_layers, "explicit aux_hidden_state_layer_ids")
    eagle = config.get("eagle_config") or {}
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
    """The features of one right-padded batch (a capture method stores what it needs of them)."""

    aux_hidden_states: Tensor  # [B, T, nH]: the captured layers' outputs, concatenated in id order
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


def layer_ids_for_run(spec: RunSpec, num_layers: int) -> AuxLayerIds:
    """The target layers a run captures: its explicit ids or its capture method's rule."""
    return resolve_aux_layer_ids(
        spec.draft.aux_layer_ids, spec.draft.config, num_layers, spec.capture_method
    )


def check_engine_layers(spec: RunSpec, engine: TargetEngine) -> None:
    """A capture engine must extract exactly the layers the run's draft reads."""
    wanted = layer_ids_for_run(spec, engine.info.num_layers)
    if tuple(engine.aux_layer_ids) != tuple(wanted):
        raise ValueError(
            f"run {spec.run_id!r} ({spec.capture_method} capture) needs target layers "
            f"{list(wanted)} but the engine extracts {list(engine.aux_layer_ids)}; build it with "
            "HFTargetEngine.for_run(spec)"
        )
