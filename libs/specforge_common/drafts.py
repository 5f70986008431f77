"""Any exported draft directory back into a model, whichever algorithm trained it.

The ``config.json`` says which: ``DFlashDraftModel`` (DFlash, or Domino with
``projector_type: domino``) or an EAGLE-3 layout (``LlamaForCausalLMEagle3`` and the published
variants ``load_draft`` accepts).
"""

from __future__ import annotations

from pathlib import Path

import torch

from specforge_common.dflash.export import is_block_draft, load_block_draft
from specforge_common.draft_files import read_config
from specforge_common.eagle3 import load_draft
from specforge_common.eagle3.vocab import VocabMap
from specforge_common.models import DraftModel
from specforge_common.models.dflash import DFlashDraft

__all__ = ["algorithm_of_draft", "captured_layers", "load_any_draft"]


def algorithm_of_draft(path: str | Path) -> str:
    """``eagle3``, ``dflash`` or ``domino``: the strategy a draft directory was trained with."""
    config = read_config(Path(path))
    if not is_block_draft(config):
        return "eagle3"
    nested = config.get("dflash_config") or {}
    domino = (nested.get("projector_type") or config.get("projector_type")) == "domino"
    return "domino" if domino else "dflash"


def load_any_draft(
    path: str | Path,
    *,
    embedding: torch.Tensor | None = None,
    vocab_map: VocabMap | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> DraftModel:
    """Load a draft directory. ``embedding`` (the target's table) completes EAGLE-3 exports;
    block drafters hold no target tensors and ignore it."""
    if algorithm_of_draft(path) == "eagle3":
        return load_draft(path, embedding=embedding, vocab_map=vocab_map, device=device,
                          dtype=dtype)  # fmt: skip
    return load_block_draft(path, device=device, dtype=dtype)


def captured_layers(draft: DraftModel) -> tuple[str, tuple[int, ...] | None]:
    """(capture method, target layers) a target engine must extract to feed ``draft``; None
    layers: the method's default rule."""
    if isinstance(draft, DFlashDraft):
        return "dflash", tuple(draft.config.target_layer_ids)
    layers = getattr(draft.config, "aux_layer_ids", None)
    return "eagle3", None if layers is None else tuple(layers)
