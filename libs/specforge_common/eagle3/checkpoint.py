"""EAGLE-3 drafts on disk in the SGLang layout: ``config.json`` + ``model.safetensors``.

What ``save_draft`` writes is what users hand to SGLang (``--speculative-draft-model-path``), so
it is checked against the spec's key list before a byte is written, and written atomically: a
crash never leaves a half-written export where a good one was. ``load_draft`` reads our exports
and the published EAGLE-3 drafts (sharded safetensors, or ``pytorch_model.bin`` read with
``weights_only=True`` -- never an arbitrary pickle) for warm starts. The frozen target embedding
is never exported; loading takes it from the file if present, else from the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from specforge_common.eagle3.vocab import HASH_KEY, VocabMap, VocabMapMismatch, vocab_map_of
from specforge_common.log import get_logger
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft

__all__ = [
    "CONFIG_NAME",
    "REQUIRED_KEYS",
    "WEIGHTS_NAME",
    "CheckpointError",
    "expected_shapes",
    "load_draft",
    "save_draft",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
REQUIRED_KEYS = ("fc.weight", "norm.weight", "lm_head.weight", "t2d", "d2t")
EMBEDDING_KEY = "embed_tokens.weight"
FORBIDDEN_PREFIXES = ("embed", "draft_model.")
STRIPPABLE_PREFIXES = ("draft_model.", "model.")
# Files a previous export may hold; an out_dir holding anything else is not replaced.
EXPORT_FILE = re.compile(
    r"(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json|pytorch_model(-\d+-of-\d+)?\.bin"
    r"|pytorch_model\.bin\.index\.json)"
)

log = get_logger(component="eagle3.checkpoint")


class CheckpointError(ValueError):
    """A draft checkpoint is malformed, incomplete, or does not fit the draft config."""


def expected_shapes(config: Eagle3Config) -> dict[str, tuple[int, ...]]:
    """Every exported tensor and its shape (spec parameter table), embedding excluded."""
    H, H_t, inter = config.hidden_size, config.aux_hidden_size, config.intermediate_size
    V, V_d, d = config.vocab_size, config.draft_vocab_size, config.attention_head_dim
    n_h, n_kv = config.num_attention_heads, config.num_key_value_heads
    shapes: dict[str, tuple[int, ...]] = {"fc.weight": (H, 3 * H_t)}
    if config.fc_norm:
        shapes |= {f"fc_norm.{i}.weight": (H_t,) for i in range(3)}
    shapes |= {
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (n_h * d, 2 * H),
        "midlayer.self_attn.k_proj.weight": (n_kv * d, 2 * H),
        "midlayer.self_attn.v_proj.weight": (n_kv * d, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, n_h * d),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.mlp.gate_proj.weight": (inter, H),
        "midlayer.mlp.up_proj.weight": (inter, H),
        "midlayer.mlp.down_proj.weight": (H, inter),
        "norm.weight": (H,),
        "lm_head.weight": (V_d, H),
        "t2d": (V,),
        "d2t": (V_d,),
    }
    return shapes


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # directories on some filesystems cannot be fsynced; files always can on Linux
    finally:
        os.close(fd)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _export_config(draft: Eagle3Draft, vocab_hash: str) -> dict[str, Any]:
    config = draft.config.to_dict()
    config["specforge"] = {**(config.get("specforge") or {}), HASH_KEY: vocab_hash}
    # SGLang's dtype="auto" reads the draft config's dtype; keep it truthful for the weights.
    dtype = _dtype_name(draft.fc.weight.dtype)
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
    tmp = parent / f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    os.mkdir(tmp)
    old: Path | None = None
    try:
        config_path = tmp / CONFIG_NAME
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _fsync(config_path)
        weights_path = tmp / WEIGHTS_NAME
        weights_path.write_bytes(_deterministic_safetensors(state, file_metadata))
        _fsync(weights_path)
        _fsync(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
            os.replace(out_dir, old)  # rename over the empty placeholder dir
        os.replace(tmp, out_dir)
        _fsync(parent)
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


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
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


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (``draft_model.``, ``model.``) that every key carries."""
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIPPABLE_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_draft(
    path: str | Path,
    *,
    embedding: torch.Tensor | None = None,
    vocab_map: VocabMap | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    allow_random_embedding: bool = False,
) -> Eagle3Draft:
    """Load a draft directory (ours or a published EAGLE-3 draft) for training or evaluation.

    ``dtype`` defaults to the dtype of the stored ``fc.weight``. The embedding comes from the
    file, else ``embedding`` (the target's table; it may share storage with it), else a random
    one only if ``allow_random_embedding``. A given ``vocab_map`` must equal the stored
    ``d2t``/``t2d`` (VocabMapMismatch otherwise); it also fills them for published drafts that
    lack the buffers. A checkpoint with ``d2t`` but no ``t2d`` gets ``t2d`` derived; one with
    neither and ``draft_vocab_size == vocab_size`` gets the identity map.
    """
    path = Path(path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a draft checkpoint directory: no {CONFIG_NAME}")
    try:
        raw_config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw_config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    tensors, file_metadata, source = _read_weights(path)
    state = _strip_prefixes(tensors)

    if raw_config.get("draft_vocab_size") is None and "lm_head.weight" in state:
        raw_config["draft_vocab_size"] = state["lm_head.weight"].shape[0]  # older drafts
    try:
        config = Eagle3Config.from_dict(raw_config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc

    missing_required = [k for k in ("fc.weight", "norm.weight", "lm_head.weight") if k not in state]
    if missing_required:
        raise CheckpointError(f"{path} ({source}) is missing required keys {missing_required}")
    _fill_vocab_buffers(state, config, vocab_map, path)

    expected = expected_shapes(config)
    unexpected = sorted(set(state) - set(expected) - {EMBEDDING_KEY})
    if unexpected:
        raise CheckpointError(
            f"{path} ({source}) has keys an EAGLE-3 draft with this config does not have: "
            f"{unexpected}"
        )
    absent = sorted(set(expected) - set(state))
    if absent:
        raise CheckpointError(f"{path} ({source}) is missing keys {absent}")
    wrong = {k: tuple(state[k].shape) for k in expected if tuple(state[k].shape) != expected[k]}
    if wrong:
        raise CheckpointError(
            f"{path} ({source}) tensors do not fit {CONFIG_NAME}: "
            + ", ".join(f"{k} {s} (config implies {expected[k]})" for k, s in sorted(wrong.items()))
        )

    dtype = dtype or state["fc.weight"].dtype
    if not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating point dtype, got {dtype}")
    embedding_shape = (config.vocab_size, config.hidden_size)
    if EMBEDDING_KEY in state:
        if tuple(state[EMBEDDING_KEY].shape) != embedding_shape:
            raise CheckpointError(
                f"{path} ({source}) {EMBEDDING_KEY} has shape {tuple(state[EMBEDDING_KEY].shape)},"
                f" expected {embedding_shape} (vocab_size, hidden_size)"
            )
    elif embedding is not None:
        if tuple(embedding.shape) != embedding_shape:
            raise CheckpointError(
                f"embedding has shape {tuple(embedding.shape)} but the draft needs "
                f"{embedding_shape} (vocab_size, hidden_size); is it the right target's table?"
            )
        state[EMBEDDING_KEY] = embedding.detach()
    elif allow_random_embedding:
        log.warning("draft embedding is random: pass the target's embedding", path=str(path))
        state[EMBEDDING_KEY] = torch.empty(embedding_shape, dtype=dtype).normal_(
            0.0, config.initializer_range
        )
    else:
        raise CheckpointError(
            f"{path} holds no {EMBEDDING_KEY} (exports never do): pass the target's embedding "
            "table as embedding=..., or allow_random_embedding=True"
        )

    for key, value in state.items():
        if value.is_floating_point():
            state[key] = value.to(device=device, dtype=dtype)
        elif key in ("t2d", "d2t"):
            state[key] = value.to(device=device)
        else:
            raise CheckpointError(f"{path} ({source}) tensor {key} has dtype {value.dtype}")

    # Build on the meta device (no random init of ~1B parameters), then adopt the tensors.
    with torch.device("meta"):
        draft = Eagle3Draft(config)
    draft.load_state_dict(state, strict=True, assign=True)
    on_meta = [n for n, t in [*draft.named_parameters(), *draft.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"load_draft left tensors unmaterialized (a bug): {on_meta}")

    stored_hash = file_metadata.get(HASH_KEY)
    loaded_hash = vocab_map_of(draft).hash()
    if stored_hash is not None and stored_hash != loaded_hash:
        raise CheckpointError(
            f"{path} t2d/d2t hash to {loaded_hash} but were saved with hash {stored_hash}; "
            "the checkpoint was modified or corrupted"
        )
    log.info(
        "loaded draft",
        path=str(path),
        source=source,
        dtype=_dtype_name(dtype),
        vocab_map_hash=loaded_hash,
    )
    return draft


def _fill_vocab_buffers(
    state: dict[str, torch.Tensor], config: Eagle3Config, vocab_map: VocabMap | None, path: Path
) -> None:
    """Complete and check ``t2d``/``d2t`` in ``state``; refuse a map other than ``vocab_map``."""
    has_t2d, has_d2t = "t2d" in state, "d2t" in state
    if has_d2t and not has_t2d:  # some published drafts ship only d2t (all SGLang reads)
        used = torch.arange(state["d2t"].shape[0]) + state["d2t"].to(torch.int64)
        if used.numel() and (used.min() < 0 or used.max() >= config.vocab_size):
            raise CheckpointError(
                f"{path} d2t maps outside the target vocab [0, {config.vocab_size})"
            )
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[used] = True
        state["t2d"] = t2d
    elif has_t2d and not has_d2t:
        raise CheckpointError(f"{path} has t2d but no d2t; SGLang needs d2t")
    elif not has_t2d:
        if vocab_map is not None:
            stored = vocab_map
        elif config.draft_vocab_size == config.vocab_size:
            stored = VocabMap.identity(config.vocab_size)
        else:
            raise CheckpointError(
                f"{path} is missing required keys ['t2d', 'd2t'] and its draft vocab is reduced; "
                "pass the vocab_map it was trained with"
            )
        state["t2d"], state["d2t"] = stored.t2d.clone(), stored.d2t.clone()
    t2d, d2t = state["t2d"], state["d2t"]
    if t2d.dtype != torch.bool:
        if t2d.is_floating_point() or not bool(((t2d == 0) | (t2d == 1)).all()):
            raise CheckpointError(f"{path} t2d must be a bool (0/1) mask, got dtype {t2d.dtype}")
        t2d = t2d.to(torch.bool)
    if d2t.is_floating_point() or d2t.dtype == torch.bool:
        raise CheckpointError(f"{path} d2t must hold integer offsets, got dtype {d2t.dtype}")
    if t2d.dim() != 1 or d2t.dim() != 1:
        raise CheckpointError(
            f"{path} t2d/d2t must be 1-D, got {tuple(t2d.shape)} and {tuple(d2t.shape)}"
        )
    stored_map = VocabMap(d2t=d2t, t2d=t2d)
    try:
        stored_map.validate()
    except VocabMapMismatch as exc:
        raise CheckpointError(f"{path} holds an invalid vocab map: {exc}") from exc
    if vocab_map is not None and vocab_map != stored_map:
        raise VocabMapMismatch(
            f"{path} was trained with vocab map {stored_map.hash()} "
            f"(V={stored_map.target_vocab_size}, V_d={stored_map.draft_vocab_size}) but vocab map "
            f"{vocab_map.hash()} (V={vocab_map.target_vocab_size}, "
            f"V_d={vocab_map.draft_vocab_size}) was given; its lm_head rows belong to the first"
        )
    state["t2d"], state["d2t"] = stored_map.t2d, stored_map.d2t


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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (checkpoint identity in CheckpointEvents)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()
