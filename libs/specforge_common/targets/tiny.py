"""Tiny seeded Llama / Qwen2 / Qwen3 targets in HF format, built offline, for tests.

They are real ``*ForCausalLM`` checkpoints (safetensors + config + tokenizer with a ChatML chat
template shaped like SmolLM2's), so everything that loads a target from a directory can be
tested against them in milliseconds with no download. Same seed -> identical weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

Arch = Literal["llama", "qwen2", "qwen3"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# ChatML, as SmolLM2-Instruct renders it (without its default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text for the tiny BPE: enough distinct words for a few hundred merges.
_CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is
Rome. Speculative decoding drafts several tokens with a small model and verifies them with the
large target model in one forward pass; accepted tokens cost almost nothing. EAGLE-3 trains the
draft on hidden states taken from three layers of the target: a low, a middle and a high one.
What is the weather like today? It is sunny with a light breeze from the west, perfect for a
walk in the park or a bicycle ride along the river. Could you write a short poem about autumn
leaves? Golden leaves drift slowly down, painting quiet streets in amber and brown.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14159 2.71828.
User: Please summarize the following article in three sentences. Assistant: Sure! Here is a
summary of the main points, followed by a brief explanation of why they matter to readers.
Mathematics, physics, chemistry, biology, history, geography, literature, music and painting
are subjects students learn at school. Machine learning models need data, compute and careful
evaluation; training loss alone does not tell whether a model generalizes.
"""


def _config(
    arch: Arch,
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    tie_word_embeddings: bool,
    max_position_embeddings: int,
):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=hidden_size // num_heads)
    raise ValueError(f"unknown arch {arch!r}; expected llama, qwen2 or qwen3")


def make_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE of exactly ``vocab_size`` tokens trained in-process, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {len(alphabet) + len(SPECIAL_TOKENS)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    # A small corpus may run out of merges: fill up with inert tokens so vocab == vocab_size.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<|filler_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[PAD_ID],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 30,
    )


def make_tiny_target(
    out_dir: str | Path,
    *,
    arch: Arch = "llama",
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
) -> Path:
    """Write a seeded random ``arch`` CausalLM + tokenizer to ``out_dir``; return the dir.

    The init runs under a forked RNG, so the caller's global torch RNG is left untouched.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    config = _config(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    make_tiny_tokenizer(vocab_size).save_pretrained(out)
    return out
