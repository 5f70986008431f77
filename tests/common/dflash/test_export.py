"""The SGLang layout of block drafters: what is written (architecture, ``dflash_config``, tensor
names and shapes, no target tensors), that it loads back bit-identical, and that a state that
does not fit its config is refused on the way out and on the way in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specforge_common.dflash.export import expected_shapes, load_block_draft, save_block_draft
from specforge_common.draft_files import CheckpointError
from specforge_common.drafts import algorithm_of_draft, load_any_draft
from specforge_common.models import DFlashConfig, DFlashDraft, DominoConfig, DominoDraft

TARGET = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=8, vocab_size=96, rms_norm_eps=1e-5, rope_theta=10000.0,
              max_position_embeddings=256, pad_token_id=0, eos_token_id=2)  # fmt: skip


def make(domino: bool) -> DFlashDraft:
    torch.manual_seed(0)
    if domino:
        config = DominoConfig.from_target(TARGET, block_size=4, num_hidden_layers=2,
                                          gru_hidden_dim=8, correction_dim=6)  # fmt: skip
        return DominoDraft(config)
    return DFlashDraft(DFlashConfig.from_target(TARGET, block_size=4, num_hidden_layers=2))


@pytest.mark.parametrize("domino", [False, True])
def test_export_is_the_sglang_layout_and_loads_back_identical(tmp_path: Path, domino: bool) -> None:
    draft = make(domino)
    save_block_draft(draft, tmp_path / "draft")
    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["block_size"] == 4 and config["num_hidden_layers"] == 2
    # the default rule for 2 draft layers of an 8-layer target: round(1 + i * 4 / 1)
    assert config["dflash_config"]["target_layer_ids"] == [1, 5]
    assert config["dflash_config"]["mask_token_id"] == 0  # no mask token: the pad token
    if domino:
        dominos = config["dflash_config"]
        assert dominos["projector_type"] == "domino"
        assert (dominos["gru_hidden_dim"], dominos["emb_dim"]) == (8, 6)
    stored = load_file(tmp_path / "draft" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in stored.items()} == expected_shapes(draft.config)
    assert not any(k.startswith(("embed_tokens", "lm_head", "model.")) for k in stored)
    assert stored["fc.weight"].shape == (32, 2 * 32)  # n target layers x hidden

    loaded = load_any_draft(tmp_path / "draft")
    assert type(loaded) is type(draft)
    assert algorithm_of_draft(tmp_path / "draft") == ("domino" if domino else "dflash")
    original = draft.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    assert all(torch.equal(loaded.state_dict()[k], original[k]) for k in original)


def test_a_state_that_does_not_fit_its_config_is_refused(tmp_path: Path) -> None:
    draft = make(False)
    draft.extra_head = torch.nn.Linear(2, 2)  # a tensor SGLang would silently skip
    with pytest.raises(CheckpointError, match="unexpected.*extra_head"):
        save_block_draft(draft, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()

    good = make(False)
    save_block_draft(good, tmp_path / "draft")
    weights = tmp_path / "draft" / "model.safetensors"
    state = load_file(weights)
    del state["layers.1.self_attn.k_norm.weight"]  # SGLang would keep a random init
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"missing \['layers.1.self_attn.k_norm.weight'\]"):
        load_block_draft(tmp_path / "draft")


def test_published_layouts_load_prefixed_and_with_target_tensors(tmp_path: Path) -> None:
    draft = make(False)
    save_block_draft(draft, tmp_path / "draft")
    weights = tmp_path / "draft" / "model.safetensors"
    state = {f"model.{k}": v for k, v in load_file(weights).items()}
    state["model.embed_tokens.weight"] = torch.zeros(96, 32)  # some exports carry the target's
    save_file(state, weights)
    loaded = load_block_draft(tmp_path / "draft", dtype=torch.bfloat16)
    assert loaded.fc.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.fc.weight, draft.fc.weight.to(torch.bfloat16))
