"""Tiny seeded targets: deterministic, loadable offline, ChatML like SmolLM2."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

from specforge_common.targets import make_tiny_target


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_same_seed_gives_identical_weights_and_leaves_global_rng_alone(tmp_path: Path) -> None:
    rng = torch.random.get_rng_state()
    a = _weights(make_tiny_target(tmp_path / "a", seed=7))
    b = _weights(make_tiny_target(tmp_path / "b", seed=7))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_different_seed_gives_different_weights(tmp_path: Path) -> None:
    a = _weights(make_tiny_target(tmp_path / "a", seed=0))
    b = _weights(make_tiny_target(tmp_path / "b", seed=1))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[key], b[key])


@pytest.mark.parametrize(
    ("arch", "cls"),
    [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")],
)
def test_loads_offline_with_auto_classes(tmp_path: Path, offline, arch: str, cls: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_target(tmp_path, arch=arch, num_layers=6, hidden_size=32, num_heads=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == cls
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (6, 32, 512)
    assert len(tokenizer) == 512 == model.get_input_embeddings().weight.shape[0]
    text = "The capital of France is Paris. ¿Qué? 東京"
    ids = tokenizer(text).input_ids
    assert max(ids) < 512
    assert tokenizer.decode(ids) == text  # byte-level: any text round-trips


def test_chat_template_renders_chatml_with_special_token_ids(tmp_path: Path, offline) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_target(tmp_path))
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(text).input_ids
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 2  # <|im_start|>, <|im_end|>
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0


def test_tied_embeddings_share_one_matrix(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        make_tiny_target(tmp_path, tie_word_embeddings=True)
    )
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
