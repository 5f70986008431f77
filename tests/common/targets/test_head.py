"""lm_head / embedding read from a checkpoint one tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specforge_common.targets import (
    load_embedding,
    load_lm_head,
    load_target_tensor,
    make_tiny_target,
)


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("untied"), seed=3)


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_single_file_lm_head_and_embedding_equal_the_models_own(untied: Path) -> None:
    assert (untied / "model.safetensors").is_file()
    model = _model(untied)
    head, embedding = load_lm_head(untied), load_embedding(untied)
    assert torch.equal(head, model.lm_head.weight)
    assert torch.equal(embedding, model.model.embed_tokens.weight)
    assert not torch.equal(head, embedding)
    norm = load_target_tensor(untied, "model.norm.weight")
    assert torch.equal(norm, model.model.norm.weight)


def test_sharded_checkpoint_reads_only_the_shard_holding_the_key(tmp_path: Path) -> None:
    source = make_tiny_target(tmp_path / "src", seed=5)
    model = _model(source)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="200KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shards = set(index.values())
    assert len(shards) >= 4 and not (sharded / "model.safetensors").exists()

    for key, load, param in [
        ("lm_head.weight", load_lm_head, model.lm_head.weight),
        ("model.embed_tokens.weight", load_embedding, model.model.embed_tokens.weight),
    ]:
        # Delete every other shard: a loader that opens more than the one it needs fails here.
        alone = tmp_path / key
        alone.mkdir()
        (alone / "model.safetensors.index.json").write_bytes(
            (sharded / "model.safetensors.index.json").read_bytes()
        )
        (alone / index[key]).write_bytes((sharded / index[key]).read_bytes())
        (alone / "config.json").write_bytes((sharded / "config.json").read_bytes())
        assert len(list(alone.glob("*.safetensors"))) == 1
        assert torch.equal(load(alone), param)
        assert torch.equal(load_target_tensor(sharded, key), param)


def test_tied_checkpoint_serves_the_embedding_as_lm_head(tmp_path: Path) -> None:
    from safetensors import safe_open

    tied = make_tiny_target(tmp_path, tie_word_embeddings=True)
    with safe_open(tied / "model.safetensors", framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # the fallback path is what is tested
    model = _model(tied)
    assert torch.equal(load_lm_head(tied), model.lm_head.weight)
    assert torch.equal(load_lm_head(tied), load_embedding(tied))


def test_missing_key_names_key_and_files(untied: Path) -> None:
    with pytest.raises(KeyError, match=r"no\.such\.weight.*model\.safetensors"):
        load_target_tensor(untied, "no.such.weight")


def test_untied_checkpoint_without_lm_head_is_an_error_not_the_embedding(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = make_tiny_target(tmp_path, seed=1)
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match="lm_head.weight"):
        load_lm_head(path)


def test_missing_key_in_sharded_checkpoint_names_the_index(tmp_path: Path) -> None:
    _model(make_tiny_target(tmp_path / "src")).save_pretrained(
        tmp_path / "sharded", max_shard_size="200KB"
    )
    with pytest.raises(KeyError, match=r"model\.safetensors\.index\.json"):
        load_target_tensor(tmp_path / "sharded", "no.such.weight")


def test_no_checkpoint_at_all(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_lm_head(tmp_path)
