"""The SGLang layout of a block drafter on disk, and its export and load.

SGLang serves both DFlash and Domino drafts with ``--speculative-algorithm DFLASH`` from a
Hugging Face style directory (see ``docs/block-drafters.md``, "Serving"):

* ``config.json``: ``architectures: ["DFlashDraftModel"]``, ``model_type: "qwen3"``, the shape
  fields (``hidden_size`` equal to the target's, ``num_hidden_layers``, heads, ``head_dim``,
  ``intermediate_size``, ``rms_norm_eps``, RoPE), ``block_size`` and a ``dflash_config`` with
  ``target_layer_ids`` and ``mask_token_id``; a Domino draft adds ``projector_type: "domino"``,
  ``gru_hidden_dim``, ``emb_dim``, ``shift_label`` and ``pure_draft_prefix_len`` there.
* ``model.safetensors``: unprefixed names ``fc``, ``hidden_norm``, ``norm``,
  ``layers.{i}.{input_layernorm,post_attention_layernorm}``,
  ``layers.{i}.self_attn.{q,k,v,o}_proj`` and ``{q,k}_norm``,
  ``layers.{i}.mlp.{gate,up,down}_proj``;
  Domino adds ``prefix_gru.weight_{ih,hh}_l0`` and ``embed_proj.{0,2}.weight``. No embedding and
  no lm_head: the draft reads the target's.

SGLang skips unknown keys and does not report missing ones (a missing tensor silently keeps its
random init), so every tensor is checked against the config here, on the way out and in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from specforge_common.draft_files import (
    CheckpointError,
    check_state,
    dtype_name,
    read_config,
    read_weights,
    strip_prefixes,
    write_draft_dir,
)
from specforge_common.log import get_logger
from specforge_common.models.dflash import ARCHITECTURE, DFlashConfig, DFlashDraft
from specforge_common.models.domino import DominoConfig, DominoDraft

__all__ = ["expected_shapes", "load_block_draft", "save_block_draft"]

log = get_logger(component="dflash.checkpoint")


def expected_shapes(config: DFlashConfig) -> dict[str, tuple[int, ...]]:
    """Every exported tensor of a block drafter with this config, and its shape."""
    H, inter, d = config.hidden_size, config.intermediate_size, int(config.head_dim or 0)
    n_h, n_kv = config.num_attention_heads, config.num_key_value_heads
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (H, config.target_width),
        "hidden_norm.weight": (H,),
        "norm.weight": (H,),
    }
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (n_h * d, H),
            p + "self_attn.k_proj.weight": (n_kv * d, H),
            p + "self_attn.v_proj.weight": (n_kv * d, H),
            p + "self_attn.o_proj.weight": (H, n_h * d),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (inter, H),
            p + "mlp.up_proj.weight": (inter, H),
            p + "mlp.down_proj.weight": (H, inter),
        }
    if isinstance(config, DominoConfig):
        G, E = config.gru_hidden_dim, config.correction_dim
        shapes |= {
            "prefix_gru.weight_ih_l0": (3 * G, H),
            "prefix_gru.weight_hh_l0": (3 * G, G),
            "embed_proj.0.weight": (E, H + G),
            "embed_proj.2.weight": (config.vocab_size, E),
        }
    return shapes


def save_block_draft(draft: DFlashDraft, out_dir: str | Path) -> Path:
    """Write the SGLang export of a DFlash or Domino draft to ``out_dir`` atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in draft.state_dict().items()}
    check_state(state, expected_shapes(draft.config), "block draft state vs the SGLang layout")
    config = draft.config.to_dict()
    dtype = dtype_name(draft.fc.weight.dtype)
    config["torch_dtype"] = dtype  # SGLang's dtype="auto" reads it
    out = write_draft_dir(out_dir, config, state, {"format": "pt"})
    log.info("saved draft", path=str(out), tensors=len(state), dtype=dtype,
             architecture=ARCHITECTURE)  # fmt: skip
    return out


def is_block_draft(config: dict) -> bool:
    """Whether a draft ``config.json`` describes a DFlash-family draft."""
    return ARCHITECTURE in (config.get("architectures") or [])


def load_block_draft(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> DFlashDraft:
    """A DFlash (or, with ``projector_type: domino``, Domino) draft directory back into a model.
    ``dtype`` defaults to that of the stored ``fc.weight``."""
    path = Path(path)
    raw = read_config(path)
    if not is_block_draft(raw):
        raise CheckpointError(
            f"{path} is not a block drafter: architectures {raw.get('architectures')}, "
            f"expected [{ARCHITECTURE!r}]"
        )
    nested = raw.get("dflash_config") or {}
    domino = (nested.get("projector_type") or raw.get("projector_type")) == "domino"
    config_cls, cls = (DominoConfig, DominoDraft) if domino else (DFlashConfig, DFlashDraft)
    try:
        config = config_cls.from_dict(raw)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    tensors, _metadata, source = read_weights(path)
    state = strip_prefixes(tensors)
    for ignored in ("embed_tokens.weight", "lm_head.weight"):  # published drafts may carry them
        state.pop(ignored, None)
    check_state(state, expected_shapes(config), f"{path} ({source})")
    dtype = dtype or state["fc.weight"].dtype
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    with torch.device("meta"):
        draft = cls(config)
    draft.load_state_dict(state, strict=True, assign=True)
    log.info("loaded draft", path=str(path), source=source, dtype=dtype_name(dtype),
             architecture="domino" if domino else "dflash")  # fmt: skip
    return draft
