"""``load_draft``: a draft directory back into an ``Eagle3Draft``, for warm starts and evaluation.

It reads our exports and the layouts published EAGLE-3 drafts ship in: sharded safetensors,
or ``pytorch_model.bin`` read with ``weights_only=True`` (never an arbitrary pickle), with or
without a wrapper prefix and the ``t2d``/``d2t`` buffers. Exports hold no embedding, so it
comes from the caller (the target's table).
"""

from __future__ import annotations

from pathlib import Path

import torch

from specforge_common.draft_files import read_config, read_weights, strip_prefixes
from specforge_common.eagle3.layout import (
    CONFIG_NAME,
    EMBEDDING_KEY,
    CheckpointError,
    dtype_name,
    expected_shapes,
)
from specforge_common.eagle3.vocab import HASH_KEY, VocabMap, VocabMapMismatch, vocab_map_of
from specforge_common.log import get_logger
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft

__all__ = ["load_draft"]

log = get_logger(component="eagle3.checkpoint")


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
    raw_config = read_config(path)
    tensors, file_metadata, source = read_weights(path)
    state = strip_prefixes(tensors)

    if raw_config.get("draft_vocab_size") is None and "lm_head.weight" in state:
        # Published drafts whose config lacks it: lm_head has one row per draft token.
        raw_config["draft_vocab_size"] = state["lm_head.weight"].shape[0]
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
        dtype=dtype_name(dtype),
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
