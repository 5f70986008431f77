"""The SGLang layout of an EAGLE-3 draft on disk: file names, tensor names and shapes.

``export`` writes it and ``load`` reads it (and the layouts of published drafts); both check
tensors against ``expected_shapes`` so a draft that SGLang would misread never gets through.
"""

from __future__ import annotations

from specforge_common.draft_files import (
    CONFIG_NAME,
    SAFETENSORS_INDEX,
    TORCH_INDEX,
    TORCH_WEIGHTS,
    WEIGHTS_NAME,
    CheckpointError,
    dtype_name,
)
from specforge_common.models.eagle3 import Eagle3Config

__all__ = [
    "CONFIG_NAME",
    "EMBEDDING_KEY",
    "REQUIRED_KEYS",
    "SAFETENSORS_INDEX",
    "TORCH_INDEX",
    "TORCH_WEIGHTS",
    "WEIGHTS_NAME",
    "CheckpointError",
    "dtype_name",
    "expected_shapes",
]

REQUIRED_KEYS = ("fc.weight", "norm.weight", "lm_head.weight", "t2d", "d2t")
EMBEDDING_KEY = "embed_tokens.weight"


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
