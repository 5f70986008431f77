"""Single tensors (``lm_head``, ``embed_tokens``) read straight from a target checkpoint.

The trainer needs the target's ``lm_head`` (teacher logits) and the draft copies its embedding,
but never the decoder layers: loading a 70B target to get two [V, H] matrices would take minutes
and all the host memory. ``safetensors.safe_open`` maps the file and reads only the requested
key, and a sharded checkpoint's ``*.index.json`` says which shard holds it, so no other shard is
even opened.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _index_files(model_dir: Path) -> list[Path]:
    preferred = model_dir / INDEX_FILE
    if preferred.is_file():
        return [preferred]
    return sorted(model_dir.glob("*.safetensors.index.json"))


def _single_files(model_dir: Path) -> list[Path]:
    preferred = model_dir / SINGLE_FILE
    if preferred.is_file():
        return [preferred]
    return sorted(model_dir.glob("*.safetensors"))


def load_target_tensor(model_dir: str | Path, key: str) -> Tensor:
    """Read one tensor by checkpoint key, touching only the file that holds it.

    A sharded checkpoint is resolved through its ``*.index.json`` weight map; otherwise the
    ``*.safetensors`` file(s) in ``model_dir`` are searched. Raises ``KeyError`` naming the
    key and the files searched, and ``FileNotFoundError`` if there is no checkpoint at all.
    """
    from safetensors import safe_open

    root = Path(model_dir)
    searched: list[Path] = []
    indexes = _index_files(root)
    if indexes:
        for index in indexes:
            searched.append(index)
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            if key in weight_map:
                with safe_open(root / weight_map[key], framework="pt") as handle:
                    return handle.get_tensor(key)
    else:
        files = _single_files(root)
        if not files:
            raise FileNotFoundError(f"no *.safetensors checkpoint in {root}")
        for file in files:
            searched.append(file)
            with safe_open(file, framework="pt") as handle:
                if key in handle.keys():
                    return handle.get_tensor(key)
    names = ", ".join(str(p) for p in searched)
    raise KeyError(f"tensor {key!r} not found in the checkpoint; searched: {names}")


def _tied(model_dir: Path) -> bool:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text())
    tie = config.get("tie_word_embeddings")
    if tie is None:
        tie = (config.get("text_config") or {}).get("tie_word_embeddings", False)
    return bool(tie)


def load_lm_head(
    model_dir: str | Path,
    key: str = "lm_head.weight",
    embedding_key: str = "model.embed_tokens.weight",
) -> Tensor:
    """The target's output projection ``[V, H]``.

    Tied-embedding targets (``tie_word_embeddings`` true) usually store no ``lm_head``; their
    head is the input embedding, which is returned instead.
    """
    root = Path(model_dir)
    try:
        return load_target_tensor(root, key)
    except KeyError:
        if not _tied(root):
            raise
    return load_target_tensor(root, embedding_key)


def load_embedding(model_dir: str | Path, key: str = "model.embed_tokens.weight") -> Tensor:
    """The target's input embedding ``[V, H]`` (the draft's embedding is a frozen copy)."""
    return load_target_tensor(model_dir, key)
