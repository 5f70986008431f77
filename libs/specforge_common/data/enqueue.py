"""``enqueue``: a dataset's records -> ``PromptTask``s on a run's prompts stream, + vocab map.

Per record: the split is ``split_of(id, spec.eval_fraction, spec.seed)``. In prefill mode a
conversation is chat-templated and masked here (``tokenize_conversation``) and sent as
``input_ids`` + ``loss_mask`` (``loss_mask_policy="given"``); pre-tokenized rows are validated,
truncated to ``max_length`` and passed through. Rows with fewer than ``spec.min_loss_tokens``
supervised tokens are skipped with their cause (no assistant turn; the prompt alone fills
``max_length``; too few supervised tokens left after the cut; too few even uncut), and the rows
that lost tokens to the cut are counted with the longest cut (``EnqueueReport.truncated_rows``,
``longest_cut``). In decode mode the conversation is sent as ``messages`` (the
capture worker generates the replies); rows without a user turn before the first assistant
turn, rows whose prompt alone fills ``max_length``, and pre-tokenized rows are skipped.

Every prompt is published with ``Nats-Msg-Id = prompt:<run>:<prompt id>``, so enqueuing the same
data again adds nothing while the stream's duplicate window (``BusConfig.duplicate_window_s``,
1 h by default) remembers the ids: those PubAcks come back ``duplicate`` and are counted. A
re-enqueue *after* the window re-adds the prompts to the queue; capture then recomputes the same
deterministic sample ids and the feature store keeps the first copy, so only the bus log repeats.

Every prompt also goes to the run's prompt log (``sf.<run>.promptlog.<key>``, msg id
``log:prompt:<run>:<prompt id>``), just before its work-queue copy: the queue forgets a prompt
once captured, the log keeps it, so a sample whose features are later evicted from the store can
be captured again from its prompt (see ``specforge_trainer.recapture``).

The draft vocabulary map is built from the loss-masked tokens of the **train** split. In decode
mode the replies do not exist yet, so the dataset's own assistant turns (templated and masked the
same way) stand in for them: an approximation of the target's own distribution. It is stored in
the feature store as ``<run>-vocab-map`` and named by the ``EnqueueSummary`` written last
(create-only: a re-enqueue keeps the first summary and its map, and says so).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bus import Bus, Published
from ..contracts import EnqueueSummary, PromptTask, RunSpec, Split
from ..log import get_logger
from ..subjects import RunSubjects, enqueue_key
from .chat import (
    ChatTemplateError,
    generation_prompt_ids,
    split_of,
    tokenize_conversation,
    tokenize_conversation_counted,
)
from .sources import BadRecord, SourceRecord, read_conversations

__all__ = [
    "EnqueueError",
    "EnqueueReport",
    "enqueue",
    "prompt_log_msg_id",
    "prompt_msg_id",
    "publish_prompts",
    "target_vocab_size",
]

PUBLISH_CHUNK = 256


class EnqueueError(RuntimeError):
    """Enqueue cannot produce a usable run (e.g. nothing to train on, vocab sizes disagree)."""


@dataclass
class EnqueueReport:
    run_id: str
    source: str
    records: int = 0  # read from the source, good or bad
    published: int = 0  # new prompts in the queue
    duplicates: int = 0  # already published under the same msg id (dedup window)
    train: int = 0  # prompts (new or duplicate) per split
    eval: int = 0
    skipped: list[BadRecord] = field(default_factory=list)
    truncated_source: bool = False
    truncation: str = ""
    truncated_rows: int = 0  # prompts cut to max_length (prefill mode)
    longest_cut: int = 0  # the most tokens one of them lost
    vocab_map_hash: str = ""
    tokens_counted: int = 0  # supervised train tokens behind this enqueue's vocab map
    summary_written: bool = False  # False: an earlier enqueue's summary (and map) was kept
    seconds: float = 0.0

    @property
    def prompts(self) -> int:
        return self.train + self.eval


def prompt_msg_id(run_id: str, prompt_id: str) -> str:
    return f"prompt:{run_id}:{prompt_id}"


def prompt_log_msg_id(run_id: str, prompt_id: str) -> str:
    return f"log:{prompt_msg_id(run_id, prompt_id)}"


async def publish_prompts(bus: Bus, tasks: list[PromptTask]) -> list[Published]:
    """Publish each task to its run's prompt log, then to its work queue (pipelined); returns
    the work-queue publications, in order."""
    items = []
    runs: dict[str, RunSubjects] = {}
    for task in tasks:
        run, prompt = task.run_id, task.prompt_id
        if (subjects := runs.get(run)) is None:
            subjects = runs[run] = RunSubjects(run)
        items.append((subjects.prompt_log(prompt), task, prompt_log_msg_id(run, prompt)))
        items.append((subjects.prompts, task, prompt_msg_id(run, prompt)))
    return (await bus.publish_many(items))[1::2]


def target_vocab_size(spec: RunSpec) -> int:
    """The target model's vocab size from its config (the lm_head rows), which can differ from
    ``len(tokenizer)`` (padded embeddings, unused added tokens)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec.target.path, revision=spec.target.revision or None)
    size = getattr(config, "vocab_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "vocab_size", None)
    if not size:
        raise EnqueueError(f"the target config at {spec.target.path} has no vocab_size")
    return int(size)


def load_tokenizer(spec: RunSpec) -> Any:
    from transformers import AutoTokenizer

    name = spec.target.tokenizer or spec.target.path
    return AutoTokenizer.from_pretrained(name, revision=spec.target.revision or None)


def _count(counter: Any, ids: list[int], mask: list[int]) -> None:
    """``TokenCounter.update`` without the per-record list -> tensor conversion (10x faster on
    Python lists): the same counts in the same first-seen order."""
    counter.counts.update([t for t, m in zip(ids, mask, strict=True) if m])


class _Skip(Exception):
    pass


def _prefill_task(
    record: SourceRecord, spec: RunSpec, tokenizer: Any, vocab_size: int
) -> tuple[list[int], list[int], int]:
    """``(input_ids, loss_mask, tokens cut)``; a row that cannot supervise is skipped with its
    cause."""
    if record.pretokenized:
        assert record.input_ids is not None and record.loss_mask is not None
        too_big = next((t for t in record.input_ids if t >= vocab_size), None)
        if too_big is not None:
            raise _Skip(f"token id {too_big} is outside the target vocab [0, {vocab_size})")
        ids = record.input_ids[: spec.max_length]
        mask = record.loss_mask[: spec.max_length]
        full_mask, total = record.loss_mask, len(record.input_ids)
    else:
        assert record.messages is not None
        if not any(m.role == "assistant" for m in record.messages):
            raise _Skip("no assistant turn: nothing to supervise")
        ids, mask, total = tokenize_conversation_counted(
            tokenizer,
            record.messages,
            max_length=spec.max_length,
            policy=spec.loss_mask_policy,
            chat_template=spec.chat_template,
        )
        full_mask = None
    supervised = sum(mask)
    if supervised < spec.min_loss_tokens:
        raise _Skip(_unsupervised_reason(record, spec, tokenizer, supervised, total, full_mask))
    return ids, mask, total - len(ids)


def _unsupervised_reason(
    record: SourceRecord,
    spec: RunSpec,
    tokenizer: Any,
    supervised: int,
    total: int,
    full_mask: list[int] | None,
) -> str:
    """Why a row has too few supervised tokens: the prompt alone fills ``max_length``, the cut
    left too few, or the conversation supervises too few even uncut."""
    least = f"min_loss_tokens={spec.min_loss_tokens}"
    if total <= spec.max_length:
        return f"only {supervised} supervised tokens in the whole conversation ({least})"
    if full_mask is None:  # the cut fell inside the conversation: where did supervision start?
        assert record.messages is not None
        _, full_mask, _ = tokenize_conversation_counted(
            tokenizer,
            record.messages,
            max_length=total,
            policy=spec.loss_mask_policy,
            chat_template=spec.chat_template,
        )
    first = next((i for i, m in enumerate(full_mask) if m), None)
    if first is None:
        return f"no supervised token in the whole conversation ({least})"
    if first >= spec.max_length:
        return (f"the prompt alone is {first} tokens, at or past max_length={spec.max_length}: "
                "no supervised token left")  # fmt: skip
    return (f"only {supervised} supervised tokens left after truncation to "
            f"max_length={spec.max_length} (of {sum(full_mask)}; {least})")  # fmt: skip


def _check_decode(record: SourceRecord, spec: RunSpec, tokenizer: Any) -> None:
    if record.pretokenized:
        raise _Skip("pre-tokenized rows cannot be used in decode mode (no messages to prompt)")
    assert record.messages is not None
    first = next((i for i, m in enumerate(record.messages) if m.role == "assistant"), None)
    before = record.messages if first is None else record.messages[:first]
    if not any(m.role == "user" for m in before):
        raise _Skip("no user turn before the first assistant turn (nothing to prompt with)")
    prompt = generation_prompt_ids(tokenizer, record.messages, chat_template=spec.chat_template)
    if len(prompt) >= spec.max_length:
        raise _Skip(
            f"the prompt alone is {len(prompt)} tokens, leaving no room to generate within "
            f"max_length={spec.max_length}"
        )


async def enqueue(
    bus: Bus,
    spec: RunSpec,
    source: str | Path,
    *,
    limit: int | None = None,
    tokenizer: Any = None,
    progress_every: int = 1000,
    chunk_size: int = PUBLISH_CHUNK,
) -> EnqueueReport:
    """Publish ``source``'s records as the run's prompts, then its vocab map and summary."""
    from ..eagle3.vocab import TokenCounter, VocabMap, build_vocab_map, stored_tensors
    from ..featurestore import open_store

    started = time.perf_counter()
    run = spec.run_id
    log = get_logger(service="enqueue", run=run)
    reader = read_conversations(source, limit)
    report = EnqueueReport(run_id=run, source=reader.name)
    vocab_size = target_vocab_size(spec)
    draft_vocab_size = spec.draft_vocab_size(vocab_size)
    if draft_vocab_size > vocab_size:
        raise EnqueueError(
            f"draft.draft_vocab_size={draft_vocab_size} exceeds the target vocab size {vocab_size}"
        )
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    await bus.ensure_streams(run)
    spec_hash = spec.spec_hash()
    decode_mode = spec.capture.mode == "decode"
    counter = TokenCounter()
    seen: dict[str, int] = {}  # prompt id -> line, to report ids repeated within the source
    batch: list[PromptTask] = []
    log.info(
        "enqueue started",
        source=reader.name,
        mode=spec.capture.mode,
        limit=limit,
        spec_hash=spec_hash,
    )

    async def flush() -> None:
        if not batch:
            return
        for published in await publish_prompts(bus, batch):
            if published.duplicate:
                report.duplicates += 1
            else:
                report.published += 1
        batch.clear()

    def skip(line: int, reason: str) -> None:
        report.skipped.append(BadRecord(line, reason))
        log.debug("record skipped", line=line, reason=reason)

    for item in reader:
        report.records += 1
        if report.records % progress_every == 0:
            log.info(
                "enqueue progress",
                records=report.records,
                prompts=report.prompts,
                skipped=len(report.skipped),
                rate=round(report.records / (time.perf_counter() - started), 1),
            )
        if isinstance(item, BadRecord):
            skip(item.line, item.reason)
            continue
        if item.id in seen:
            skip(item.line, f"duplicate id {item.id!r} (first at line {seen[item.id]})")
            continue
        seen[item.id] = item.line
        split: Split = split_of(item.id, spec.eval_fraction, spec.seed)
        try:
            if decode_mode:
                _check_decode(item, spec, tokenizer)
                task = PromptTask(
                    run_id=run,
                    prompt_id=item.id,
                    split=split,
                    messages=item.messages,
                    loss_mask_policy=spec.loss_mask_policy,
                    run_spec_hash=spec_hash,
                )
                if split == "train":
                    ids, mask = tokenize_conversation(
                        tokenizer,
                        item.messages or [],
                        max_length=spec.max_length,
                        policy=spec.loss_mask_policy,
                        chat_template=spec.chat_template,
                    )
                    _count(counter, ids, mask)
            else:
                ids, mask, cut = _prefill_task(item, spec, tokenizer, vocab_size)
                if cut > 0:
                    report.truncated_rows += 1
                    report.longest_cut = max(report.longest_cut, cut)
                task = PromptTask(
                    run_id=run,
                    prompt_id=item.id,
                    split=split,
                    input_ids=ids,
                    loss_mask=mask,
                    loss_mask_policy="given",
                    run_spec_hash=spec_hash,
                )
                if split == "train":
                    _count(counter, ids, mask)
        except _Skip as exc:
            skip(item.line, str(exc))
            continue
        except ChatTemplateError as exc:
            skip(item.line, f"chat template: {exc}")
            continue
        if split == "train":
            report.train += 1
        else:
            report.eval += 1
        batch.append(task)
        if len(batch) >= chunk_size:
            await flush()
    await flush()
    report.truncated_source = reader.truncated
    report.truncation = reader.truncation
    report.tokens_counted = counter.num_tokens

    existing = await bus.get_record(enqueue_key(run), EnqueueSummary)
    if existing is None:
        if report.train == 0:
            raise EnqueueError(
                f"no train prompts came out of {reader.name} ({report.records} records read, "
                f"{len(report.skipped)} skipped); the enqueue summary is not written, so the run "
                "can still be started by another enqueue"
            )
        vocab_map = build_vocab_map(counter.counts, vocab_size, draft_vocab_size)
        store = open_store(spec.store_uri)
        try:
            tensors = stored_tensors(vocab_map, counter.counts)
            location = store.put(f"{run}-vocab-map", tensors)
            stored = store.get(location)
            if VocabMap(d2t=stored["d2t"], t2d=stored["t2d"]) != vocab_map:
                # Left by an enqueue that died before writing its summary: nobody used it yet.
                log.warning("replacing a vocab map left by an unfinished enqueue")
                store.delete(location)
                location = store.put(f"{run}-vocab-map", tensors)
        finally:
            store.close()
        summary = EnqueueSummary(
            run_id=run,
            sources=[reader.name],
            train=report.train,
            eval=report.eval,
            skipped=len(report.skipped),
            vocab_map=location,
            vocab_map_hash=vocab_map.hash(),
            tokens_counted=report.tokens_counted,
            run_spec_hash=spec_hash,
        )
        report.summary_written = await bus.put_record(enqueue_key(run), summary, create_only=True)
        if not report.summary_written:  # another enqueue finished first
            existing = await bus.get_record(enqueue_key(run), EnqueueSummary)
        else:
            report.vocab_map_hash = vocab_map.hash()
    if existing is not None:
        report.vocab_map_hash = existing.vocab_map_hash
        log.info(
            "an earlier enqueue summary exists; it and its vocab map stay",
            vocab_map_hash=existing.vocab_map_hash,
            first_sources=existing.sources,
        )
    report.seconds = time.perf_counter() - started
    log.info(
        "enqueue finished",
        records=report.records,
        published=report.published,
        duplicates=report.duplicates,
        train=report.train,
        eval=report.eval,
        skipped=len(report.skipped),
        truncated_source=report.truncated_source,
        truncated_rows=report.truncated_rows,
        longest_cut=report.longest_cut,
        vocab_map_hash=report.vocab_map_hash,
        summary_written=report.summary_written,
        seconds=round(report.seconds, 2),
    )
    return report
