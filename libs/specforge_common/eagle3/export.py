"""``save_draft``: the SGLang export of a draft, the directory users serve it from.

SGLang's ``--speculative-draft-model-path`` names that directory, so it is checked against the
layout before a byte is written, and it appears atomically: a crash never leaves a half-written
export where a good one was. The same weights always give the same bytes, so the sha256 of the
weights names them. The frozen target embedding is never exported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from specforge_common.durable import fsync_dir, fsync_file, temp_sibling
from specforge_common.eagle3.layout import (
    CONFIG_NAME,
    REQUIRED_KEYS,
    WEIGHTS_NAME,
    CheckpointError,
    dtype_name,
    expected_shapes,
)
from specforge_common.eagle3.vocab import HASH_KEY, VocabMapMismatch, vocab_map_of
from specforge_common.log import get_logger
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft

__all__ = ["save_draft"]

FORBIDDEN_PREFIXES = ("embed", "draft_model.")
# Files a previous export may hold; an out_dir holding anything else is not replaced.
EXPORT_FILE = re.compile(
    r"(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json|pytorch_model(-\d+-of-\d+)?\.bin"
    r"|pytorch_model\.bin\.index\.json)"
)

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
    expected = expected_shapes(config)
    unexpected = sorted(set(state) - set(expected))
    absent = sorted(set(expected) - set(state))
    if unexpected or absent:
        raise CheckpointError(
            f"draft state keys differ from the SGLang layout: unexpected {unexpected}, "
            f"missing {absent}"
        )
    wrong = {k: tuple(v.shape) for k, v in state.items() if tuple(v.shape) != expected[k]}
    if wrong:
        raise CheckpointError(
            "draft tensors have the wrong shapes for its config: "
            + ", ".join(f"{k} {s} (expected {expected[k]})" for k, s in sorted(wrong.items()))
        )


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


def _replaceable(out_dir: Path) -> None:
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise CheckpointError(f"{out_dir} exists and is not a directory; not replacing it")
    others = sorted(p.name for p in out_dir.iterdir() if not EXPORT_FILE.fullmatch(p.name))
    if others:
        raise CheckpointError(
            f"{out_dir} already exists and holds files that are not part of a draft export "
            f"({others}); save_draft replaces the whole directory, so save into a fresh one"
        )


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

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() or out_dir.is_symlink():
        _replaceable(out_dir)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would survive the rename and hide the export from other users.
    tmp = temp_sibling(out_dir)
    os.mkdir(tmp)
    old: Path | None = None
    try:
        config_path = tmp / CONFIG_NAME
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        fsync_file(config_path)
        weights_path = tmp / WEIGHTS_NAME
        weights_path.write_bytes(_deterministic_safetensors(state, file_metadata))
        fsync_file(weights_path)
        fsync_dir(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
            os.replace(out_dir, old)  # rename over the empty placeholder dir
        os.replace(tmp, out_dir)
        fsync_dir(parent)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)  # put the previous export back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    log.info(
        "saved draft",
        path=str(out_dir),
        tensors=len(state),
        dtype=config["torch_dtype"],
        vocab_map_hash=vocab_hash,
    )
    return out_dir


def _deterministic_safetensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> bytes:
    """safetensors bytes whose header lists the metadata in sorted order.

    The library writes ``__metadata__`` from a hash map, so the same weights would otherwise get
    different bytes (and a different sha256) on every save. Reordering a JSON object keeps its
    length, so the data offsets stay valid.
    """
    data = bytearray(safetensors_save(dict(tensors), metadata=dict(metadata)))
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > length:  # cannot happen for a reordering; refuse rather than corrupt
        raise CheckpointError("safetensors header grew while sorting its metadata")
    data[8 : 8 + length] = text.ljust(length, b" ")
    return bytes(data)
