"""``save_draft``: the SGLang export of a draft, the directory users serve it from.

SGLang's ``--speculative-draft-model-path`` names that directory, so it is checked against the
layout before a byte is written, and it appears atomically: a crash never leaves a half-written
export where a good one was. The same weights always give the same bytes, so the sha256 of the
weights names them. The frozen target embedding is never exported.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from specforge_common.draft_files import check_state, write_draft_dir
from specforge_common.eagle3.layout import (
    REQUIRED_KEYS,
    CheckpointError,
    dtype_name,
    expected_shapes,
)
from specforge_common.eagle3.vocab import HASH_KEY, VocabMapMismatch, vocab_map_of
from specforge_common.log import get_logger
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft

__all__ = ["save_draft"]

FORBIDDEN_PREFIXES = ("embed", "draft_model.")

log = get_logger(component="eagle3.checkpoint")


def _check_export_keys(state: Mapping[str, torch.Tensor], config: Eagle3Config) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"draft state is missing required SGLang keys {missing}")
    forbidden = sorted(k for k in state if k.startswith(FORBIDDEN_PREFIXES))
    if forbidden:
        raise CheckpointError(
            f"draft state has keys SGLang must not receive (embedding / prefixed): {forbidden}"
        )
    check_state(state, expected_shapes(config), "draft state vs the SGLang layout")


def _export_config(draft: Eagle3Draft, vocab_hash: str) -> dict[str, Any]:
    config = draft.config.to_dict()
    config["specforge"] = {**(config.get("specforge") or {}), HASH_KEY: vocab_hash}
    # SGLang's dtype="auto" reads the draft config's dtype; keep it truthful for the weights.
    dtype = dtype_name(draft.fc.weight.dtype)
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype
    config.setdefault("torch_dtype", dtype)
    return config


def save_draft(
    draft: Eagle3Draft, out_dir: str | Path, *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the SGLang export of ``draft`` to ``out_dir`` atomically and return ``out_dir``.

    ``out_dir`` is created, or replaced if it holds a previous export (only export files). The
    draft's vocab map must be valid: apply one with ``apply_vocab_map`` first (the identity map
    when the draft keeps the whole vocabulary).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in draft.trainable_state_dict().items()}
    _check_export_keys(state, draft.config)
    vocab_map = vocab_map_of(draft)
    try:
        vocab_map.validate()
    except VocabMapMismatch as exc:
        raise CheckpointError(
            f"the draft's t2d/d2t buffers are not a valid vocab map ({exc}); "
            "call apply_vocab_map(draft, ...) before saving"
        ) from exc
    vocab_hash = vocab_map.hash()
    user_metadata = dict(metadata or {})
    reserved = sorted({"format", HASH_KEY} & user_metadata.keys())
    if reserved:
        raise CheckpointError(f"metadata keys {reserved} are reserved for save_draft")
    bad = [k for k, v in user_metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise CheckpointError(f"safetensors metadata must map str to str; bad entries: {bad}")
    file_metadata = {"format": "pt", HASH_KEY: vocab_hash, **user_metadata}
    config = _export_config(draft, vocab_hash)

    out_dir = write_draft_dir(out_dir, config, state, file_metadata)
    log.info(
        "saved draft",
        path=str(out_dir),
        tensors=len(state),
        dtype=config["torch_dtype"],
        vocab_map_hash=vocab_hash,
    )
    return out_dir
