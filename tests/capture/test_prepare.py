"""Task preparation without a bus, a broker or a target: what capture makes of a PromptTask
(token ids, loss mask, sample id, decode-mode prompts and replies) and how it packs forwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specforge_capture.prepare import (
    GenerationPrompt,
    Prepared,
    Rejected,
    check_supervised,
    check_task,
    decode_groups,
    decode_seed,
    generation_prompt,
    pack,
    prefill,
    right_padded,
    sample_id_for,
    with_reply,
)
from specforge_common.contracts import CaptureSpec, Message, PromptTask, RunSpec
from specforge_common.data.chat import generation_prompt_ids
from specforge_common.targets import make_tiny_tokenizer
from tests.capture.test_worker import expected_sample_id
from tests.support import tiny_run_spec

VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer(VOCAB)


def make_spec(tmp_path: Path, *, max_length: int = 64, **capture: object) -> RunSpec:
    return tiny_run_spec("prep", tmp_path / "target", tmp_path, max_length=max_length,
                         capture=CaptureSpec(**capture))  # fmt: skip


def task_for(spec: RunSpec, **fields: object) -> PromptTask:
    base: dict[str, object] = dict(
        run_id=spec.run_id, prompt_id="p/1", split="train", loss_mask_policy="given",
        run_spec_hash=spec.spec_hash(),
    )  # fmt: skip
    return PromptTask(**(base | fields))


# --- sample ids and seeds -------------------------------------------------------------------


def test_sample_id_is_the_rule_and_the_same_on_every_call() -> None:
    sid = sample_id_for("run-a", "src/7:ü", "abc")
    assert sid == expected_sample_id("run-a", "src/7:ü", "abc")
    assert sid.startswith("src_7__-") and sid == sample_id_for("run-a", "src/7:ü", "abc")
    others = {sample_id_for("run-b", "src/7:ü", "abc"), sample_id_for("run-a", "src/8:ü", "abc"),
              sample_id_for("run-a", "src/7:ü", "abd")}  # fmt: skip
    assert sid not in others and len(others) == 3  # run, prompt and spec hash all count
    long = "x" * 100 + "é"
    long_id = sample_id_for("r", long, "h")
    assert long_id == expected_sample_id("r", long, "h") and len(long_id) == 64 + 1 + 16


def test_decode_seed_depends_on_run_seed_and_prompt_only() -> None:
    seed = decode_seed(0, "c1")
    assert seed == decode_seed(0, "c1") and 0 <= seed < 2**63
    assert len({seed, decode_seed(1, "c1"), decode_seed(0, "c2")}) == 3


# --- checks and prefill -----------------------------------------------------------------------


def test_a_task_of_another_run_or_spec_is_rejected(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    check_task(task_for(spec, input_ids=[5]), spec.run_id, spec.spec_hash())  # no raise
    with pytest.raises(Rejected, match="task is for run 'prep'"):
        check_task(task_for(spec, input_ids=[5]), "other", spec.spec_hash())
    stale = task_for(spec, input_ids=[5], run_spec_hash="0123456789abcdef")
    with pytest.raises(Rejected) as info:
        check_task(stale, spec.run_id, spec.spec_hash())
    assert "0123456789abcdef" in str(info.value) and spec.spec_hash() in str(info.value)


def test_prefill_keeps_ids_and_loss_mask_position_by_position(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    task = task_for(spec, input_ids=[7, 8, 9, 10, 11], loss_mask=[0, 0, 1, 0, 1])
    assert prefill(task, spec, VOCAB) == ([7, 8, 9, 10, 11], [0, 0, 1, 0, 1])
    everything = task_for(spec, input_ids=[7, 8, 9], loss_mask_policy="all")
    assert prefill(everything, spec, VOCAB) == ([7, 8, 9], [1, 1, 1])


def test_prefill_cuts_ids_and_mask_to_max_length_together(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, max_length=6)
    ids = list(range(3, 13))  # 10 tokens
    mask = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    got_ids, got_mask = prefill(task_for(spec, input_ids=ids, loss_mask=mask), spec, VOCAB)
    assert got_ids == [3, 4, 5, 6, 7, 8] and got_mask == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"messages": [Message("user", "hi")]}, "capture.mode is 'prefill'"),
        ({"input_ids": [5, 6]}, "no loss_mask"),
        ({"input_ids": [], "loss_mask": []}, "no input_ids"),
        ({"input_ids": [5, VOCAB, 99999], "loss_mask": [0, 1, 1]}, "2 input id(s) outside"),
        ({"input_ids": [5, 6], "loss_mask": [0, 2]}, "must be 0 or 1"),
    ],
    ids=["messages", "no-mask", "empty", "foreign-ids", "mask-values"],
)
def test_prefill_refuses_what_it_cannot_capture(tmp_path: Path, fields, reason: str) -> None:
    spec = make_spec(tmp_path)
    with pytest.raises(Rejected) as info:
        prefill(task_for(spec, **fields), spec, VOCAB)
    assert reason in str(info.value)


def test_too_few_supervised_tokens_are_refused(tmp_path: Path) -> None:
    task = task_for(make_spec(tmp_path), input_ids=[5, 6, 7])
    with pytest.raises(Rejected, match="0 supervised .* of 3, fewer than min_loss_tokens=1"):
        check_supervised(task, [5, 6, 7], [0, 0, 0], 0)  # never fewer than one
    with pytest.raises(Rejected, match="min_loss_tokens=3"):
        check_supervised(task, [5, 6, 7], [0, 1, 1], 3)
    check_supervised(task, [5, 6, 7], [0, 1, 1], 2)  # no raise


# --- decode mode ------------------------------------------------------------------------------


def test_generation_prompt_is_the_templated_conversation_with_room_to_reply(
    tmp_path: Path, tokenizer
) -> None:
    messages = [Message("user", "What is the capital of France?"), Message("assistant", "Paris.")]
    want = generation_prompt_ids(tokenizer, messages)
    spec = make_spec(tmp_path, max_length=64, mode="decode", max_new_tokens=12)
    prompt = generation_prompt(task_for(spec, messages=messages), tokenizer, spec)
    assert prompt.input_ids == want and prompt.room == 12
    tight = make_spec(tmp_path, max_length=len(want) + 5, mode="decode", max_new_tokens=12)
    assert generation_prompt(task_for(tight, messages=messages), tokenizer, tight).room == 5


def test_generation_prompt_refuses_what_cannot_be_replied_to(tmp_path: Path, tokenizer) -> None:
    messages = [Message("user", "What is the capital of France?")]
    spec = make_spec(tmp_path, mode="decode")
    with pytest.raises(Rejected, match="needs the conversation"):
        generation_prompt(task_for(spec, input_ids=[5], loss_mask=[1]), tokenizer, spec)
    with pytest.raises(Rejected, match="cannot template the prompt: .*no message before"):
        reply_only = [Message("assistant", "hello")]
        generation_prompt(task_for(spec, messages=reply_only), tokenizer, spec)
    short = make_spec(tmp_path, max_length=len(generation_prompt_ids(tokenizer, messages)),
                      mode="decode")  # fmt: skip
    with pytest.raises(Rejected, match="no room to generate a reply"):
        generation_prompt(task_for(short, messages=messages), tokenizer, short)


def test_a_reply_is_spliced_as_generated_with_the_loss_on_it_only() -> None:
    prompt = GenerationPrompt(input_ids=[1, 20, 21, 22], room=3)
    assert with_reply(prompt, [40, 41]) == ([1, 20, 21, 22, 40, 41], [0, 0, 0, 0, 1, 1])
    ids, mask = with_reply(prompt, [40, 41, 42, 43, 44])  # cut to the room left
    assert ids == [1, 20, 21, 22, 40, 41, 42] and mask == [0, 0, 0, 0, 1, 1, 1]
    assert prompt.input_ids == [1, 20, 21, 22]  # the prompt itself is left alone


def test_decode_groups_batch_the_longest_prompts_together() -> None:
    lengths = [5, 9, 7, 9, 3]
    assert decode_groups(lengths, batch_size=2) == [[1, 3], [2, 0], [4]]
    assert decode_groups(lengths, batch_size=0) == [[1], [3], [2], [0], [4]]


# --- forwards ---------------------------------------------------------------------------------


def test_rows_are_right_padded_with_the_pad_id() -> None:
    ids, mask = right_padded([[5, 6, 7], [8]], pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [8, 2, 2]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_packing_respects_batch_size_and_token_budget() -> None:
    lengths = [10, 60, 30, 30, 120, 5, 5, 5, 5, 49]
    items = [Prepared(None, None, f"s{i}", [1] * n, [1] * n) for i, n in enumerate(lengths)]
    chunks = pack(items, batch_size=3, max_batch_tokens=100)
    assert sorted(len(p.input_ids) for c in chunks for p in c) == sorted(lengths)
    assert [len(p.input_ids) for p in chunks[0]] == [120]  # over the budget: alone, first
    for chunk in chunks:
        width = max(len(p.input_ids) for p in chunk)
        assert len(chunk) <= 3
        assert len(chunk) * width <= 100 or len(chunk) == 1
        assert [len(p.input_ids) for p in chunk] == sorted(
            (len(p.input_ids) for p in chunk), reverse=True
        )
    # Greedy, longest first: a row joins the forward while rows x width stays within budget.
    assert [[len(p.input_ids) for p in c] for c in chunks] == [
        [120], [60], [49, 30], [30, 10, 5], [5, 5, 5]
    ]  # fmt: skip
    rows = [Prepared(None, None, f"r{i}", [1] * 5, [1] * 5) for i in range(7)]
    by_rows = pack(rows, batch_size=3, max_batch_tokens=10_000)
    assert [len(c) for c in by_rows] == [3, 3, 1]  # the row limit alone
