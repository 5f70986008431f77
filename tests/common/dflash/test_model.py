"""The DFlash and Domino drafts: configs, parameter layout, forward against a loop reference."""

from __future__ import annotations

import pytest
import torch

from specforge_common.models.dflash import DFlashConfig, DFlashDraft, build_target_layer_ids
from specforge_common.models.domino import DominoConfig, DominoDraft
from specforge_common.registry import DRAFT_ARCHITECTURES

from .reference import randomize_norms, reference_forward, tiny_target_config


def test_default_target_layers_follow_the_spec_rule() -> None:
    assert build_target_layer_ids(36, 5) == (1, 9, 17, 25, 33)  # Qwen3-8B recipe
    assert build_target_layer_ids(36, 1) == (18,)
    assert build_target_layer_ids(8, 3) == (1, 3, 5)  # round(1 + i*4/2)
    assert build_target_layer_ids(28, 4) == (1, 9, 17, 25)
    with pytest.raises(ValueError):
        build_target_layer_ids(36, 0)


def test_from_target_copies_the_shape_and_picks_defaults() -> None:
    config = DFlashConfig.from_target(tiny_target_config(), draft_vocab_size=32000)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (16, 24, 40)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 8)
    assert config.rope_theta == 50.0 and config.target_hidden_size == 16
    assert config.num_hidden_layers == 1 and config.target_layer_ids == (4,)
    assert config.block_size == 16 and config.sliding_window is None
    assert config.mask_token_id == 2  # no mask or pad token: the first eos
    assert config.extra["num_target_layers"] == 8
    three = DFlashConfig.from_target(tiny_target_config(), num_hidden_layers=3)
    assert three.target_layer_ids == (1, 3, 5)
    explicit = DFlashConfig.from_target(tiny_target_config(), aux_layer_ids=(2, 6))
    assert explicit.target_layer_ids == (2, 6) and explicit.target_width == 32


@pytest.mark.parametrize(
    ("fields", "overrides", "expected"),
    [
        ({"mask_token_id": 7, "pad_token_id": 5}, {}, 7),
        ({"pad_token_id": 5}, {}, 5),
        ({}, {}, 2),
        ({"eos_token_id": None}, {}, 0),
        ({"mask_token_id": 7}, {"mask_token_id": 9}, 9),
        ({}, {"dflash_config": {"mask_token_id": 11}}, 11),
    ],
)
def test_mask_token_falls_back_in_order(fields: dict, overrides: dict, expected: int) -> None:
    config = DFlashConfig.from_target(tiny_target_config(**fields), **overrides)
    assert config.mask_token_id == expected


def test_target_sliding_window_is_not_the_drafts() -> None:
    target = tiny_target_config(sliding_window=4096, use_sliding_window=False)
    assert DFlashConfig.from_target(target).sliding_window is None
    assert DFlashConfig.from_target(target, sliding_window=8).sliding_window == 8


def test_configs_round_trip_through_the_reference_layout() -> None:
    config = DFlashConfig.from_target(tiny_target_config(), num_hidden_layers=2, block_size=8,
                                      loss_decay_gamma=None)  # fmt: skip
    out = config.to_dict()
    assert out["architectures"] == ["DFlashDraftModel"] and out["model_type"] == "qwen3"
    assert out["dflash_config"] == {"mask_token_id": 2, "target_layer_ids": [1, 5]}
    assert out["layer_types"] == ["full_attention"] * 2 and out["block_size"] == 8
    assert DFlashConfig.from_dict(out) == config

    domino = DominoConfig.from_target(tiny_target_config(), shift_label=True, gru_hidden_dim=12,
                                      correction_dim=6, lambda_base_decay_ratio=0.5)  # fmt: skip
    out = domino.to_dict()
    assert out["dflash_config"]["projector_type"] == "domino"
    assert out["dflash_config"]["emb_dim"] == 6 and out["dflash_config"]["shift_label"] is True
    assert DominoConfig.from_dict(out) == domino


def test_domino_reads_a_reference_config() -> None:
    published = {
        "architectures": ["DFlashDraftModel"], "block_size": 16, "hidden_size": 64,
        "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_hidden_layers": 5, "vocab_size": 100, "model_type": "qwen3",
        "rope_theta": 1000000, "sliding_window": None, "use_sliding_window": False,
        "layer_types": ["full_attention"] * 5, "emb_dim": 256,
        "dflash_config": {"mask_token_id": 99, "target_layer_ids": [1, 9, 17, 25, 33],
                          "projector_type": "domino", "pure_draft_prefix_len": 1,
                          "emb_dim": 256, "gru_hidden_dim": 1024, "shift_label": True},
    }  # fmt: skip
    config = DominoConfig.from_dict(published)
    assert config.target_layer_ids == (1, 9, 17, 25, 33) and config.mask_token_id == 99
    assert (config.correction_dim, config.gru_hidden_dim, config.shift_label) == (256, 1024, True)
    assert config.num_drafted == 16 and config.num_hidden_layers == 5
    with pytest.raises(ValueError, match="no corrected slots"):
        DominoConfig.from_target(tiny_target_config(), block_size=4, pure_draft_prefix_len=3)


def test_parameters_hold_no_target_embedding_or_head() -> None:
    assert DRAFT_ARCHITECTURES.get("dflash") is DFlashDraft
    assert DRAFT_ARCHITECTURES.get("domino") is DominoDraft
    config = DFlashConfig.from_target(tiny_target_config(), aux_layer_ids=(2, 6))
    names = set(DFlashDraft(config).state_dict())
    assert "fc.weight" in names and "hidden_norm.weight" in names and "norm.weight" in names
    layer = {n.removeprefix("layers.0.") for n in names if n.startswith("layers.0.")}
    assert layer == {
        "input_layernorm.weight", "post_attention_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    }  # fmt: skip
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    domino = DominoDraft(DominoConfig.from_target(tiny_target_config(), gru_hidden_dim=12))
    extra = set(domino.state_dict()) - names - {"fc.weight"}
    assert extra == {"prefix_gru.weight_ih_l0", "prefix_gru.weight_hh_l0",
                     "embed_proj.0.weight", "embed_proj.2.weight"}  # fmt: skip
    assert domino.embed_proj[2].weight.shape == (40, 256)


def test_init_is_normal_for_linears_and_ones_for_norms() -> None:
    config = DFlashConfig.from_target(
        tiny_target_config(intermediate_size=2000), num_hidden_layers=2
    )
    draft = DFlashDraft(config)
    assert torch.all(draft.layers[1].self_attn.q_norm.weight == 1)
    std = draft.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002


@pytest.mark.parametrize("layers", [1, 2])
def test_forward_matches_the_loop_reference(layers: int) -> None:
    gen = torch.Generator().manual_seed(layers)
    config = DFlashConfig.from_target(tiny_target_config(), num_hidden_layers=layers,
                                      initializer_range=0.3)  # fmt: skip
    torch.manual_seed(0)
    draft = DFlashDraft(config).double()
    randomize_norms(draft, gen)
    C, Q = 5, 6
    context = draft.project_context(
        torch.randn(2, C, config.target_width, generator=gen, dtype=torch.float64)
    )
    embeds = torch.randn(2, Q, 16, generator=gen, dtype=torch.float64)
    q_pos = torch.tensor([[3, 4, 5, 1, 2, 3], [0, 1, 2, 7, 8, 9]])
    c_pos = torch.arange(C).expand(2, C)
    mask = torch.rand(2, Q, C + Q, generator=gen) < 0.6
    mask[0, 2] = False  # a query with nothing to attend to: finite, no attention update
    got = draft(embeds, context, q_pos, c_pos, mask)
    assert torch.isfinite(got).all()
    for b in range(2):
        want = reference_forward(draft, embeds[b], context[b], q_pos[b].tolist(),
                                 c_pos[b].tolist(), mask[b].tolist())  # fmt: skip
        torch.testing.assert_close(got[b], want, rtol=1e-10, atol=1e-10)


def test_context_is_projected_by_fc_then_hidden_norm() -> None:
    gen = torch.Generator().manual_seed(3)
    config = DFlashConfig.from_target(tiny_target_config(), aux_layer_ids=(1, 4, 6))
    draft = DFlashDraft(config).double()
    randomize_norms(draft, gen)
    x = torch.randn(1, 3, 48, generator=gen, dtype=torch.float64)
    want = torch.stack([
        draft.hidden_norm.weight * (v / torch.sqrt((v * v).mean() + 1e-6))
        for v in (draft.fc.weight @ x[0].T).T
    ])  # fmt: skip
    torch.testing.assert_close(draft.project_context(x)[0], want)
