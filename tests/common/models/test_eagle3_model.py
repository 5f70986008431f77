"""The draft model itself: config round trips, auto-generated configs, registry, rotary dtype."""

from __future__ import annotations

import pytest
import torch

from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft, TTTCache
from specforge_common.models.layers import apply_rope, rope_cos_sin, rope_inverse_frequencies
from specforge_common.registry import DRAFT_ARCHITECTURES, STRATEGIES

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "hidden_act": "silu", "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}  # fmt: skip


def test_config_from_target_copies_the_spec_fields() -> None:
    config = Eagle3Config.from_target(LLAMA_31_8B, aux_layer_ids=(1, 15, 28))
    out = config.to_dict()
    assert out["architectures"] == ["LlamaForCausalLMEagle3"]
    assert out["num_hidden_layers"] == 1 and out["tie_word_embeddings"] is False
    assert (out["hidden_size"], out["intermediate_size"], out["vocab_size"]) == (
        4096,
        14336,
        128256,
    )
    assert out["draft_vocab_size"] == 32000 and out["pad_token_id"] == 0
    assert out["head_dim"] == 128 and out["rope_theta"] == 500000.0
    assert out["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 15, 28]}
    assert out["rope_parameters"]["rope_type"] == "llama3"
    assert out["eos_token_id"] == [128001, 128008, 128009]  # unknown-to-us fields kept
    assert Eagle3Config.from_dict(out) == config


def test_transformers5_rope_parameters_are_copied_from_the_target() -> None:
    target = {k: v for k, v in LLAMA_31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    target["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    config = Eagle3Config.from_target(target)
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    scaled = dict(target, rope_parameters={"rope_theta": 5e5, **LLAMA_31_8B["rope_scaling"]})
    assert Eagle3Config.from_target(scaled).rope_scaling["rope_type"] == "llama3"


def test_legacy_rope_scaling_type_is_written_as_rope_type() -> None:
    config = Eagle3Config.from_target(
        {**LLAMA_31_8B, "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    assert config.to_dict()["rope_parameters"] == {
        "rope_theta": 500000.0, "rope_type": "linear", "factor": 2.0,
    }  # fmt: skip


def test_config_refuses_more_than_one_layer_and_missing_fields() -> None:
    with pytest.raises(ValueError, match="one decoder layer"):
        Eagle3Config.from_dict({**LLAMA_31_8B, "draft_vocab_size": 10, "num_hidden_layers": 2})
    with pytest.raises(ValueError, match="draft_vocab_size"):
        Eagle3Config.from_dict({k: v for k, v in LLAMA_31_8B.items() if k != "num_hidden_layers"})


def test_registries_name_the_architecture_and_strategy() -> None:
    import specforge_common.eagle3  # noqa: F401 - registers the strategy

    assert DRAFT_ARCHITECTURES.get("llama_eagle3") is Eagle3Draft
    assert STRATEGIES.get("eagle3").__name__ == "Eagle3Strategy"
    with pytest.raises(KeyError, match="known: dflash, domino, llama_eagle3"):
        DRAFT_ARCHITECTURES.get("medusa")


def test_rotary_frequencies_survive_a_bf16_cast() -> None:
    """SGLang computes rotary angles in fp32; a bf16 draft must not round its frequencies."""
    config = Eagle3Config.from_target(
        {**LLAMA_31_8B, "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 50}, draft_vocab_size=20,
    )  # fmt: skip
    draft = Eagle3Draft(config)
    before = draft._inv_freq.clone()
    draft.to(torch.bfloat16)
    assert draft._inv_freq.dtype == torch.float64 and torch.equal(draft._inv_freq, before)


def test_rope_rotation_matches_the_pairwise_formula() -> None:
    import math

    d, theta, pos = 8, 10000.0, 37
    x = torch.randn(1, 1, 1, d, dtype=torch.float64)
    cos, sin = rope_cos_sin(
        torch.tensor([[pos]]), rope_inverse_frequencies(d, theta, None), torch.float64
    )
    rotated = apply_rope(x, cos, sin)[0, 0, 0]
    for i in range(d // 2):
        angle = pos * theta ** (-2 * i / d)
        a, b = x[0, 0, 0, i], x[0, 0, 0, i + d // 2]
        assert rotated[i] == pytest.approx(float(a * math.cos(angle) - b * math.sin(angle)))
        assert rotated[i + d // 2] == pytest.approx(
            float(b * math.cos(angle) + a * math.sin(angle))
        )


def test_step_zero_with_no_padding_is_plain_causal_attention() -> None:
    """At step 0 the TTT attention is ordinary causal attention (checked against SDPA's own)."""
    config = Eagle3Config(hidden_size=32, intermediate_size=32, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=40, draft_vocab_size=10)  # fmt: skip
    draft = Eagle3Draft(config).double()
    attn = draft.midlayer.self_attn
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    pos = torch.arange(9).expand(2, 9)
    cos, sin = rope_cos_sin(pos, draft._inv_freq, torch.float64)
    ours = attn(x, cos, sin, TTTCache(torch.ones(2, 9, dtype=torch.long), "reference"))
    q = apply_rope(attn.q_proj(x).view(2, 9, 4, 8).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(2, 9, 4, 8).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(2, 9, 4, 8).transpose(1, 2)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, attn.o_proj(plain.transpose(1, 2).reshape(2, 9, 32)))
