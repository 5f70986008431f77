"""A draft directory on disk, whatever the algorithm: file names, reading its weights in the
layouts drafts are published in, and writing an export atomically.

Each algorithm's ``layout`` says which tensors and config fields its serving engine expects;
this module only moves bytes. Reading accepts sharded safetensors or ``pytorch_model.bin`` read
with ``weights_only=True`` (never an arbitrary pickle). Writing is atomic (a crash never leaves a
half-written export where a good one was) and deterministic (the same weights give the same
bytes, so the sha256 of the weights names them).
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
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from specforge_common.durable import fsync_dir, fsync_file, temp_sibling

__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_INDEX",
    "TORCH_INDEX",
    "TORCH_WEIGHTS",
    "WEIGHTS_NAME",
    "CheckpointError",
    "check_state",
    "dtype_name",
    "read_config",
    "read_weights",
    "strip_prefixes",
    "write_draft_dir",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
STRIPPABLE_PREFIXES = ("draft_model.", "model.")
# Files a previous export may hold; an out_dir holding anything else is not replaced.
EXPORT_FILE = re.compile(
    r"(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json|pytorch_model(-\d+-of-\d+)?\.bin"
    r"|pytorch_model\.bin\.index\.json)"
)


class CheckpointError(ValueError):
    """A draft checkpoint is malformed, incomplete, or does not fit the draft config."""


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` for ``torch.bfloat16``: the spelling of ``torch_dtype`` in config.json."""
    return str(dtype).removeprefix("torch.")


def read_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of a draft directory as a dict."""
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a draft checkpoint directory: no {CONFIG_NAME}")
    try:
        raw_config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw_config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    return raw_config


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """All tensors of a checkpoint dir, the safetensors metadata (merged), and the source."""

    def read(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} does not exist")
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(file), device="cpu"), meta
        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"cannot read {file} with weights_only=True (only plain tensor dicts are "
                f"accepted, never arbitrary pickles): {exc}"
            ) from exc
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
        ):
            raise CheckpointError(f"{file} is not a flat dict of named tensors")
        return data, {}

    for single in (WEIGHTS_NAME, TORCH_WEIGHTS):
        if (path / single).is_file():
            tensors, meta = read(path / single)
            return tensors, meta, single
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index_path = path / index_name
        if not index_path.is_file():
            continue
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path} is not a valid weight index: {exc}") from exc
        tensors, meta = {}, {}
        for shard in sorted(set(weight_map.values())):
            shard_path = (path / shard).resolve()
            if not shard_path.is_relative_to(path.resolve()):
                raise CheckpointError(f"{index_path} points outside the checkpoint: {shard}")
            shard_tensors, shard_meta = read(shard_path)
            tensors.update(shard_tensors)
            meta.update(shard_meta)
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{index_path} lists tensors no shard holds: {absent}")
        return tensors, meta, index_name
    raise CheckpointError(
        f"{path} holds no draft weights: expected {WEIGHTS_NAME}, {SAFETENSORS_INDEX}, "
        f"{TORCH_WEIGHTS} or {TORCH_INDEX}"
    )


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (``draft_model.``, ``model.``) that every key carries."""
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIPPABLE_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                where: str) -> None:  # fmt: skip
    """``state`` has exactly the ``expected`` tensors with their shapes."""
    unexpected = sorted(set(state) - set(expected))
    absent = sorted(set(expected) - set(state))
    if unexpected or absent:
        raise CheckpointError(
            f"{where}: keys differ from the layout: unexpected {unexpected}, missing {absent}"
        )
    wrong = {k: tuple(v.shape) for k, v in state.items() if tuple(v.shape) != expected[k]}
    if wrong:
        raise CheckpointError(
            f"{where}: tensors have the wrong shapes for the config: "
            + ", ".join(f"{k} {s} (expected {expected[k]})" for k, s in sorted(wrong.items()))
        )


def write_draft_dir(
    out_dir: str | Path,
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` to ``out_dir`` atomically: it is created,
    or replaced if it holds a previous export (only export files)."""
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
        weights_path.write_bytes(_deterministic_safetensors(state, metadata))
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
    return out_dir


def _replaceable(out_dir: Path) -> None:
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise CheckpointError(f"{out_dir} exists and is not a directory; not replacing it")
    others = sorted(p.name for p in out_dir.iterdir() if not EXPORT_FILE.fullmatch(p.name))
    if others:
        raise CheckpointError(
            f"{out_dir} already exists and holds files that are not part of a draft export "
            f"({others}); an export replaces the whole directory, so save into a fresh one"
        )


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
