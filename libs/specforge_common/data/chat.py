"""Chat templating with a loss mask on the assistant turns, for any chat template.

The mask is found without per-template regexes. For each assistant turn ``i`` the template is
rendered twice: ``messages[:i]`` with the generation prompt and ``messages[:i+1]`` without it.
When the template is *prefix-stable* (each rendering is a prefix of the next, as ChatML, Llama 3
and most templates are), the characters the template emits for the assistant turn are exactly
``[len(prefix_with_generation_prompt), len(rendering_through_turn_i))`` of the full rendering.
The full rendering is tokenized once with offsets, and every token overlapping a span gets 1.

What the span covers, decided once for every template: the assistant's content **and its
end-of-turn token(s)** (``<|im_end|>`` in ChatML), but **not** the whitespace the template emits
after the end-of-turn token (ChatML's ``\\n`` between turns). Generation stops at the end-of-turn
token, so the separator after it is never drafted at serving time, and it belongs to the
template's turn layout, not to the reply. An empty reply therefore supervises just the
end-of-turn token.

Templates that are not prefix-stable (e.g. ones that rewrite earlier assistant turns) fall back
to locating the turn's content in the full rendering (after the previous span), followed by the
tokenizer's EOS token when the template puts it right after the content; when the content cannot
be found, :class:`ChatTemplateError` says which turn and why.

This module imports no torch; it needs a *fast* (Rust) tokenizer for character offsets.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

from ..contracts import Message

LossMaskPolicy = Literal["assistant", "last_turn"]
MessageLike = Message | Mapping[str, Any]

__all__ = [
    "ChatTemplateError",
    "assistant_spans",
    "generation_prompt_ids",
    "split_of",
    "tokenize_conversation",
]


class ChatTemplateError(ValueError):
    """A conversation could not be templated, or its assistant turns could not be located."""


def _as_dicts(messages: Sequence[MessageLike]) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(messages):
        if isinstance(message, Message):
            out.append({"role": message.role, "content": message.content})
        elif isinstance(message, Mapping) and "role" in message and "content" in message:
            out.append({"role": str(message["role"]), "content": str(message["content"] or "")})
        else:
            raise ChatTemplateError(f"message {i} is not a {{role, content}} message: {message!r}")
    return out


def _render(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool = False,
    chat_template: str = "",
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template or None,
        )
    except Exception as exc:  # jinja2 errors, "no chat template" ValueError, template raise()
        raise ChatTemplateError(f"cannot apply the chat template: {exc}") from exc
    if not isinstance(text, str):
        raise ChatTemplateError(f"the chat template rendered a {type(text).__name__}, not text")
    return text


def _locate(full: str, content: str, cursor: int, eos: str | None, turn: int) -> tuple[int, int]:
    """Fallback for templates that are not prefix-stable: find the content after ``cursor``."""
    for candidate in (content, content.strip()):
        if not candidate:
            continue
        start = full.find(candidate, cursor)
        if start >= 0:
            end = start + len(candidate)
            if eos and full.startswith(eos, end):
                end += len(eos)
            return start, end
    why = "it is empty" if not content.strip() else "its content does not appear verbatim"
    raise ChatTemplateError(
        f"the chat template is not prefix-stable (rendering messages[:{turn}] with the "
        f"generation prompt is not a prefix of the full conversation) and assistant turn "
        f"{turn} cannot be located in the rendering because {why}"
    )


def assistant_spans(
    tokenizer: Any,
    messages: Sequence[MessageLike],
    *,
    chat_template: str = "",
    last_only: bool = False,
    stop_at: int | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the ``[start, end)`` character span of every assistant turn
    (content + end-of-turn token, trailing separator whitespace excluded), in order.

    ``last_only``: just the last assistant turn. ``stop_at``: skip turns starting at or after
    that character (they would be truncated away; saves two renders per turn).
    """
    msgs = _as_dicts(messages)
    full = _render(tokenizer, msgs, chat_template=chat_template)
    return full, _spans(tokenizer, msgs, full, chat_template, last_only, stop_at)


def _spans(
    tokenizer: Any,
    msgs: list[dict[str, str]],
    full: str,
    chat_template: str,
    last_only: bool,
    stop_at: int | None,
) -> list[tuple[int, int]]:
    eos = getattr(tokenizer, "eos_token", None)
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if last_only:
        turns = turns[-1:]
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i in turns:
        try:
            prefix = _render(
                tokenizer, msgs[:i], add_generation_prompt=True, chat_template=chat_template
            )
            through = _render(tokenizer, msgs[: i + 1], chat_template=chat_template)
        except ChatTemplateError:
            prefix = through = None  # e.g. a template that cannot render a partial chat
        if (
            prefix is not None
            and through is not None
            and through.startswith(prefix)
            and full.startswith(through)
            and len(prefix) >= cursor
        ):
            start = len(prefix)
            end = start + len(full[start : len(through)].rstrip())
        else:
            # Search after everything before this turn, when that much renders stably, so a
            # reply quoted in an earlier message is not mistaken for the reply.
            try:
                before = _render(tokenizer, msgs[:i], chat_template=chat_template)
            except ChatTemplateError:
                before = ""
            if full.startswith(before):
                cursor = max(cursor, len(before))
            if stop_at is not None and cursor >= stop_at:
                break
            start, end = _locate(full, msgs[i]["content"], cursor, eos, i)
        if stop_at is not None and start >= stop_at:
            break
        spans.append((start, end))
        cursor = end
    return spans


def _offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; loss masks need character "
            "offsets (load it with use_fast=True)"
        )
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoding["input_ids"], encoding["offset_mapping"]


class Tokenized(NamedTuple):
    input_ids: list[int]
    loss_mask: list[int]
    total_tokens: int  # of the whole conversation, before the cut to max_length


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[MessageLike],
    *,
    max_length: int,
    policy: LossMaskPolicy = "assistant",
    chat_template: str = "",
) -> tuple[list[int], list[int]]:
    """``(input_ids, loss_mask)`` of the chat-templated conversation, truncated to
    ``max_length``. The mask is 1 on every token overlapping an assistant turn's span (content
    + end-of-turn token; with ``policy="last_turn"`` only the last assistant turn), else 0.
    ``chat_template`` (Jinja text), when non-empty, replaces the tokenizer's own template."""
    tokenized = tokenize_conversation_counted(
        tokenizer, messages, max_length=max_length, policy=policy, chat_template=chat_template
    )
    return tokenized.input_ids, tokenized.loss_mask


def tokenize_conversation_counted(
    tokenizer: Any,
    messages: Sequence[MessageLike],
    *,
    max_length: int,
    policy: LossMaskPolicy = "assistant",
    chat_template: str = "",
) -> Tokenized:
    """``tokenize_conversation`` plus the length before the cut, for reporting truncation."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if policy not in ("assistant", "last_turn"):
        raise ValueError(f"unknown loss mask policy {policy!r}; expected assistant or last_turn")
    msgs = _as_dicts(messages)
    full = _render(tokenizer, msgs, chat_template=chat_template)
    # The whole text is tokenized (cutting it first could change the token at the cut), but
    # only the first max_length tokens are masked, and turns past them are not located.
    all_ids, all_offsets = _offsets(tokenizer, full)
    input_ids = list(all_ids[:max_length])
    offsets = all_offsets[:max_length]
    stop_at = offsets[-1][1] if offsets else 0
    spans = _spans(tokenizer, msgs, full, chat_template, policy == "last_turn", stop_at)
    loss_mask = [0] * len(input_ids)
    if spans:
        # Token offsets are non-decreasing: each span's tokens are one slice, found by bisection.
        starts = [s for s, _ in offsets]
        ends = [e for _, e in offsets]
        for a, b in spans:
            first = bisect.bisect_right(ends, a)  # first token ending after a
            stop = bisect.bisect_left(starts, b)  # first token starting at or after b
            if stop > first:
                loss_mask[first:stop] = [1] * (stop - first)
    return Tokenized(input_ids, loss_mask, len(all_ids))


def generation_prompt_ids(
    tokenizer: Any, messages: Sequence[MessageLike], *, chat_template: str = ""
) -> list[int]:
    """Token ids of the messages *before* the first assistant turn, templated with the
    generation prompt: what decode-mode capture feeds the target to generate a reply."""
    msgs = _as_dicts(messages)
    first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
    if first == 0:
        raise ChatTemplateError("the conversation has no message before its first assistant turn")
    text = _render(tokenizer, msgs[:first], add_generation_prompt=True, chat_template=chat_template)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_of(prompt_id: str, eval_fraction: float, seed: int) -> Literal["train", "eval"]:
    """``"eval"`` for a deterministic ``eval_fraction`` of prompt ids (sha256 of seed and id),
    the same on every machine and every re-enqueue."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction else "train"
