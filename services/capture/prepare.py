"""A PromptTask turned into the exact tokens to capture: plain functions of the task, the run
spec and the tokenizer, so every rule here can be checked without a bus or a target.

Prefill mode: the task's token ids and loss mask, checked against the target vocabulary and cut
to ``max_length``.

Decode mode ("train with decode"): the messages before the first assistant turn are templated
with the generation prompt (``generation_prompt_ids``), the target generates at most
``min(max_new_tokens, max_length - prompt length)`` tokens (greedy at temperature 0, batched;
sampled one prompt at a time with a seed derived from the run seed and the prompt id, so a
redelivery regenerates the same reply), and the sample is the prompt ids followed by the
generated ids **exactly as generated**, with the loss mask on the generated tokens only (the
reply and the end-of-turn token the target stopped on). This is what ``tokenize_conversation``
masks for an assistant turn (content + end-of-turn, not the separator after it), without
decoding the reply to text and re-tokenizing it, which can merge tokens differently from what
the target produced.

A task that can never succeed (another run or spec hash, malformed, fewer than
``min_loss_tokens`` supervised tokens, a template error) raises :class:`Rejected` with the
reason; the worker dead-letters it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from specforge_common.bus import Delivery
from specforge_common.contracts import PromptTask, RunSpec
from specforge_common.data.chat import generation_prompt_ids


def sample_id_for(run_id: str, prompt_id: str, spec_hash: str) -> str:
    """``<safe prompt id>-<16 hex of sha256(run:prompt:spec hash)>``: the same on every worker
    and every redelivery, a valid store id whatever characters the prompt id has."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in prompt_id)
    digest = hashlib.sha256(f"{run_id}:{prompt_id}:{spec_hash}".encode()).hexdigest()[:16]
    return f"{safe[:64]}-{digest}"


def decode_seed(run_seed: int, prompt_id: str) -> int:
    """Sampling seed of one prompt in decode mode: a function of the run seed and prompt id."""
    digest = hashlib.sha256(f"{run_seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


class Rejected(Exception):
    """A task that can never succeed: dead-letter it with this reason."""


@dataclass
class Prepared:
    """A task turned into the exact token sequence to capture."""

    delivery: Delivery[PromptTask]
    task: PromptTask
    sample_id: str
    input_ids: list[int]
    loss_mask: list[int]
    # Decode mode captures while generating: (aux hidden states, final hidden states) of every
    # token, so the sample needs no forward of its own.
    features: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class GenerationPrompt:
    """Decode mode: the templated prompt the target writes a reply to."""

    input_ids: list[int]
    room: int  # the most tokens the reply may have


def check_task(task: PromptTask, run_id: str, spec_hash: str) -> None:
    """A task enqueued for another run or under another spec would train the wrong draft."""
    if task.run_id != run_id:
        raise Rejected(f"task is for run {task.run_id!r}, this worker captures {run_id!r}")
    if task.run_spec_hash != spec_hash:
        raise Rejected(
            f"task run_spec_hash {task.run_spec_hash!r} != the run spec's hash "
            f"{spec_hash!r}: it was enqueued under another spec; re-enqueue it"
        )


def prefill(task: PromptTask, spec: RunSpec, vocab_size: int) -> tuple[list[int], list[int]]:
    """The task's token ids and loss mask, cut to ``spec.max_length``."""
    if task.input_ids is None:
        raise Rejected(
            "capture.mode is 'prefill', which needs input_ids + loss_mask, but the task "
            "carries messages (enqueue tokenizes conversations in prefill mode)"
        )
    ids = list(task.input_ids)
    if task.loss_mask is not None:
        mask = list(task.loss_mask)
    elif task.loss_mask_policy == "all":
        mask = [1] * len(ids)
    else:
        raise Rejected(
            f"task has input_ids but no loss_mask (loss_mask_policy "
            f"{task.loss_mask_policy!r}); send a loss_mask or policy 'all'"
        )
    if not ids:
        raise Rejected("task has no input_ids")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise Rejected(
            f"{len(bad)} input id(s) outside the target vocabulary [0, {vocab_size}), e.g. "
            f"{bad[:3]}: tokenized with another tokenizer?"
        )
    if any(m not in (0, 1) for m in mask):
        raise Rejected("loss_mask values must be 0 or 1")
    return ids[: spec.max_length], mask[: spec.max_length]


def generation_prompt(task: PromptTask, tokenizer: Any, spec: RunSpec) -> GenerationPrompt:
    """Decode mode: the conversation up to its first assistant turn, and room for a reply."""
    if task.messages is None:
        raise Rejected(
            "capture.mode is 'decode', which needs the conversation (messages), but the "
            "task carries only token ids"
        )
    try:
        ids = generation_prompt_ids(tokenizer, task.messages, chat_template=spec.chat_template)
    except Exception as exc:  # ChatTemplateError and tokenizer failures
        raise Rejected(f"cannot template the prompt: {exc}") from exc
    room = min(spec.capture.max_new_tokens, spec.max_length - len(ids))
    if room <= 0:
        raise Rejected(
            f"the prompt is {len(ids)} tokens: no room to generate a reply under "
            f"max_length={spec.max_length}"
        )
    return GenerationPrompt(ids, room)


def decode_groups(lengths: Sequence[int], *, batch_size: int) -> list[list[int]]:
    """Indices of the prompts to generate for together: the longest together, so a batch pads
    little (a sampled row draws with its own seed, so grouping does not change its reply)."""
    ordered = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    size = max(1, batch_size)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def with_reply(prompt: GenerationPrompt, reply: Sequence[int]) -> tuple[list[int], list[int]]:
    """The prompt followed by the reply as generated (cut to its room), loss on the reply."""
    reply = list(reply[: prompt.room])
    return prompt.input_ids + reply, [0] * len(prompt.input_ids) + [1] * len(reply)


def check_supervised(
    task: PromptTask, ids: Sequence[int], mask: Sequence[int], min_loss_tokens: int
) -> None:
    """At least ``min_loss_tokens`` supervised tokens, and at least one: else nothing to learn."""
    supervised = sum(mask)
    least = max(min_loss_tokens, 1)
    if supervised < least:
        raise Rejected(
            f"prompt {task.prompt_id!r} has {supervised} supervised (loss-masked) tokens of "
            f"{len(ids)}, fewer than min_loss_tokens={least}"
        )


def right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, longest]`` ids padded with ``pad_id`` on the right, and the attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def pack(
    prepared: list[Prepared], *, batch_size: int, max_batch_tokens: int
) -> list[list[Prepared]]:
    """Longest first into forwards of <= ``batch_size`` rows and <= ``max_batch_tokens`` padded
    tokens (rows x longest row); a sample longer than the budget is forwarded alone."""
    chunks: list[list[Prepared]] = []
    current: list[Prepared] = []
    for item in sorted(prepared, key=lambda p: len(p.input_ids), reverse=True):
        if current:
            width = len(current[0].input_ids)  # the longest: sorted descending
            if len(current) >= batch_size or (len(current) + 1) * width > max_batch_tokens:
                chunks.append(current)
                current = []
        current.append(item)
    if current:
        chunks.append(current)
    return chunks
