"""The capture loop: PromptTasks -> frozen target -> features in the store + SampleRefs.

One pass of the loop:

1. ``BackpressureGate.wait()`` (pause while the trainers are too far behind).
2. Fetch up to ``capture.batch_size`` PromptTasks from the shared durable consumer "capture".
3. Prepare each task: check run id and spec hash, then prefill (the task's ids and loss mask) or
   decode (the target writes the reply, see below). A task that can never succeed (wrong spec
   hash, malformed, fewer than ``min_loss_tokens`` supervised tokens, template error) is
   dead-lettered with the reason; the rest of the batch goes on.
4. Pack the prepared samples, longest first, into right-padded forwards of at most
   ``batch_size`` rows and ``max_batch_tokens`` padded tokens (rows x longest row); a single
   sample longer than the budget is forwarded alone.
5. Per forward: ``engine.capture`` in a worker thread, which also copies each sample's real
   tokens' features to the CPU. Meanwhile the event loop keeps calling ``in_progress()`` on every
   delivery still held, every ``ack_wait / 3`` seconds.
6. The emit stage (a task fed by a one-slot queue, so it stores, publishes and acks forward k
   while forward k+1 runs): store each sample's tensors (``input_ids``, ``loss_mask`` int64 [T],
   ``aux_hidden_states`` [T, 3H], ``hidden_states`` [T, H], engine dtype, no batch dim), publish
   the SampleRefs with ``Nats-Msg-Id = sample_id`` and, once every PubAck is in, ack the prompts.
   Stopping (SIGTERM) drains this stage first: everything already captured is acked.

A failure in a forward/store/publish naks its prompts with exponential backoff; a multi-row
forward that fails is first retried row by row, so one poison sample cannot take its batch
mates down with it. A prompt delivered ``max_deliver`` times that fails again is dead-lettered.
One that never fails but never gets settled either (it crashes, hangs or OOM-kills the worker
every time) is given up by JetStream after ``max_deliver`` deliveries; every worker listens for
that advisory, dead-letters the prompt with the reason and deletes it from the queue.
A crash anywhere before the ack means redelivery: the sample id is deterministic, the store keeps
the first copy of an id and JetStream drops the duplicate SampleRef (within its duplicate
window), so no sample is lost or doubled.

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

End of data: when a fetch comes back empty, the ``EnqueueSummary`` exists and the consumer has
nothing pending or unacked, every prompt's SampleRef is in the samples stream; the worker
publishes ``EndOfSplit`` for both splits (``msg_id = end:<run>:<split>``: the first worker's
marker wins) and, with ``exit_when_done``, returns once no trainer of the run is still training
(no ``TrainerProgress`` at all, or every rank's says ``done``): until then it stays up to serve
re-capture requests.

Re-capture: a trainer that finds a sample's features missing (evicted from the store) sends its
prompt again, with ``recapture=True``, to ``sf.<run>.prompts.recapture``, which a second durable
consumer ("recapture") reads. A task of its own (serialized with the main loop on the target)
serves it *without* passing the backpressure gate: the trainer waiting for that sample is what
holds the backlog up, so gating it would deadlock. The sample is captured as usual (the store
writes it, its key being gone) and its SampleRef goes to ``sf.<run>.samples.recaptured`` with
``msg_id = recaptured:<sample id>:<attempt>``, never to the split's log (which already has the
original: publishing there again would train it twice); it counts neither in the EndOfSplit
markers nor toward the end of data.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from specforge_common.bus import Bus, Delivery, WorkConsumer
from specforge_common.contracts import (
    SPLITS,
    EndOfSplit,
    EnqueueSummary,
    PromptTask,
    RunSpec,
    SampleRef,
    TrainerProgress,
)
from specforge_common.log import get_logger
from specforge_common.subjects import RunSubjects, enqueue_key, progress_prefix
from specforge_common.targets import TargetEngine

from .backpressure import BackpressureGate

SERVICE = "capture"
DURABLE = "capture"
RECAPTURE_DURABLE = "recapture"  # on sf.<run>.prompts.recapture


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


@dataclass
class CaptureStats:
    prompts_captured: int = 0  # acked after their SampleRef was stored by JetStream
    samples_published: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    recaptured: int = 0  # SampleRefs published on the recaptured subject
    duplicates: int = 0  # SampleRefs JetStream already had (a redelivered prompt)
    dead_lettered: int = 0
    retried: int = 0  # naks after a transient failure
    forwards: int = 0
    emitted: int = 0  # forwards whose samples were stored, published and acked
    tokens: int = 0  # real (unpadded) tokens captured
    padded_tokens: int = 0
    forward_s: float = 0.0
    generate_s: float = 0.0
    generated_tokens: int = 0
    empty_fetches: int = 0
    end_published: bool = False

    def as_log(self) -> dict[str, Any]:
        return {
            "prompts_captured": self.prompts_captured,
            "published_train": self.samples_published["train"],
            "published_eval": self.samples_published["eval"],
            "recaptured": self.recaptured,
            "duplicates": self.duplicates,
            "dead_lettered": self.dead_lettered,
            "retried": self.retried,
            "forwards": self.forwards,
            "tokens": self.tokens,
        }


class CaptureWorker:
    """One capture worker; any number of them share the run's prompt queue."""

    def __init__(
        self,
        bus: Bus,
        spec: RunSpec,
        engine: TargetEngine,
        store: Any,
        *,
        producer_id: str,
        exit_when_done: bool = False,
        ack_wait_s: float | None = None,
        fetch_timeout_s: float = 1.0,
        backoff_s: tuple[float, float] = (1.0, 30.0),
        progress_every: int = 10,
        backpressure_poll_s: float = 1.0,
        pipeline_depth: int = 1,
        tokenizer: Any = None,
    ) -> None:
        self.bus = bus
        self.spec = spec
        self.engine = engine
        self.store = store
        self.producer_id = producer_id
        self.exit_when_done = exit_when_done
        self.ack_wait_s = ack_wait_s
        self.fetch_timeout_s = fetch_timeout_s
        self.backoff_s = backoff_s
        self.progress_every = max(1, progress_every)
        # Forwards whose features wait for the emit stage while the next forward runs; 0 runs
        # store + publish + ack inline after each forward.
        self.pipeline_depth = pipeline_depth
        self._emit_queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self.run_id = spec.run_id
        self.spec_hash = spec.spec_hash()
        self.subjects = RunSubjects(self.run_id)
        self.stats = CaptureStats()
        self.log = get_logger(service=SERVICE, run=self.run_id, producer=producer_id)
        capture = spec.capture
        self.gate = BackpressureGate(
            bus,
            self.run_id,
            high_water=capture.high_water_samples,
            low_water=capture.low_water_samples,
            store=store,
            high_water_bytes=capture.high_water_bytes,
            low_water_bytes=capture.low_water_bytes,
            poll_s=backpressure_poll_s,
            log=self.log,
        )
        self._tokenizer = tokenizer
        self._stop = asyncio.Event()
        self._held: dict[int, Delivery[PromptTask]] = {}  # id -> delivery not yet settled
        self._max_deliver = bus.config.max_deliver
        self._ack_wait = ack_wait_s or bus.config.ack_wait_s
        self._pad_id = engine.info.pad_token_id or 0
        self._started = time.monotonic()
        self._waiting_logged = False
        self._lingering_logged = False
        self._target_lock = asyncio.Lock()  # main loop and re-captures take turns on the target

    # --- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the prompts already fetched (ack them), then return from ``run``."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> CaptureStats:
        await self.bus.ensure_streams(self.run_id)
        consumer: WorkConsumer[PromptTask] = await self.bus.work_consumer(
            self.run_id, "prompts", DURABLE, PromptTask, service=SERVICE,
            ack_wait_s=self.ack_wait_s,
        )  # fmt: skip
        recaptures: WorkConsumer[PromptTask] = await self.bus.work_consumer(
            self.run_id, "prompts", RECAPTURE_DURABLE, PromptTask, service=SERVICE,
            filter_subject=self.subjects.recapture_prompts, ack_wait_s=self.ack_wait_s,
        )  # fmt: skip
        # The consumer may predate this worker (another worker made it): use its settings.
        settings = await self.bus.consumer_lag(self.run_id, "prompts", DURABLE)
        self._ack_wait = settings.ack_wait_s or self._ack_wait
        self._max_deliver = settings.max_deliver or self._max_deliver
        capture = self.spec.capture
        if capture.mode == "decode":
            _ = self.tokenizer  # a missing tokenizer is a setup error: fail now, not per prompt
        self._started = time.monotonic()
        self.log.info(
            "capture worker started",
            mode=capture.mode,
            batch_size=capture.batch_size,
            max_batch_tokens=capture.max_batch_tokens,
            ack_wait_s=self._ack_wait,
            max_deliver=self._max_deliver,
            spec_hash=self.spec_hash,
            device=str(self.engine.device),
            dtype=str(self.engine.dtype).removeprefix("torch."),
        )
        depth = max(self.pipeline_depth, 0)
        self._emit_queue = asyncio.Queue(maxsize=max(depth, 1))
        emitter = asyncio.create_task(self._emit_loop()) if depth else None
        heartbeat = asyncio.create_task(self._heartbeat())
        given_up = asyncio.create_task(self._dead_letter_given_up())
        leaving = asyncio.Event()
        recapturer = asyncio.create_task(self._serve_recaptures(recaptures, leaving))
        try:
            while not self._stop.is_set():
                if not await self.gate.wait(self._stop):
                    break
                try:
                    deliveries = await consumer.fetch(capture.batch_size, self.fetch_timeout_s)
                except Exception as exc:  # a broker hiccup must not kill the worker
                    self.log.warning("fetch failed; retrying", error=repr(exc))
                    await self._sleep(1.0)
                    continue
                if deliveries:
                    async with self._target_lock:
                        await self._process(deliveries)
                    continue
                self.stats.empty_fetches += 1
                if (
                    await self._end_of_data()
                    and self.exit_when_done
                    and await self._trainers_done()
                ):
                    break
        finally:
            leaving.set()
            await recapturer  # returns within one fetch timeout (plus the batch it holds)
            await recaptures.close()
            if emitter is not None:  # settle everything already captured before leaving
                await self._emit_queue.put(None)
                await emitter
            heartbeat.cancel()
            given_up.cancel()
            try:
                await self.bus.flush()  # acks are fire-and-forget: get them out before exit
            except Exception as exc:
                self.log.warning("cannot flush the last acks", error=repr(exc))
            await consumer.close()
            self._log_progress("capture worker stopped")
        return self.stats

    async def _dead_letter_given_up(self) -> None:
        """Prompts JetStream stopped redelivering (every delivery crashed or hung a worker) go
        to the DLQ with the reason and leave the queue; every worker listens, one wins."""
        try:
            async for seq, deliveries in self.bus.given_up(self.run_id, "prompts", DURABLE):
                try:
                    done = await self.bus.dead_letter_given_up(
                        self.run_id, "prompts", seq, deliveries, service=SERVICE
                    )
                    if done:
                        self.stats.dead_lettered += 1
                        self.log.error("prompt given up after max_deliver: dead-lettered",
                                       seq=seq, deliveries=deliveries)  # fmt: skip
                except Exception as exc:
                    self.log.warning("cannot dead-letter a given-up prompt", seq=seq,
                                     error=repr(exc))  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.warning("not watching for given-up prompts", error=repr(exc))

    async def _dead_letter_leftovers(self, max_deliver: int) -> None:
        """With every prompt delivered and settled, a prompt still in the work queue was given
        up after ``max_deliver`` deliveries while no worker heard the advisory (they had all
        died on it): dead-letter it now, before the end of the split is announced."""
        if not (await self.bus.stream_state(self.run_id, "prompts")).messages:
            return
        seqs = await self.bus.stored_sequences(self.run_id, "prompts", self.subjects.prompts)
        for seq in seqs:
            if await self.bus.dead_letter_given_up(self.run_id, "prompts", seq, max_deliver,
                                                   service=SERVICE):  # fmt: skip
                self.stats.dead_lettered += 1
                self.log.error("prompt left in the queue after max_deliver: dead-lettered",
                               seq=seq)  # fmt: skip

    async def _serve_recaptures(
        self, consumer: WorkConsumer[PromptTask], leaving: asyncio.Event
    ) -> None:
        """Capture the prompts trainers ask for again, also while the gate pauses the main loop."""
        while not (leaving.is_set() or self._stop.is_set()):
            try:
                deliveries = await consumer.fetch(self.spec.capture.batch_size,
                                                  self.fetch_timeout_s)  # fmt: skip
                if deliveries:
                    async with self._target_lock:
                        await self._process(deliveries)
            except Exception as exc:  # a broker hiccup must not end re-capture for good
                self.log.warning("re-capture failed; retrying", error=repr(exc))
                await self._sleep(1.0)

    async def _trainers_done(self) -> bool:
        """No trainer of this run left to serve re-captures for: none reported, or all done."""
        try:
            progress = await self.bus.records_by_prefix(
                progress_prefix(self.run_id), TrainerProgress
            )
        except Exception as exc:
            self.log.warning("cannot read trainer progress; staying up", error=repr(exc))
            return False
        training = sorted(p.rank for p in progress.values() if not p.done)
        if training and not self._lingering_logged:
            self.log.info("end of data; staying up to re-capture evicted samples until the "
                          "trainers finish", training_ranks=training)  # fmt: skip
            self._lingering_logged = True
        return not training

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # --- one fetched group -----------------------------------------------------------------

    async def _process(self, deliveries: list[Delivery[PromptTask]]) -> None:
        for delivery in deliveries:
            self._held[id(delivery)] = delivery
        prepared = await self._prepare_all(deliveries)
        for chunk in self._pack(prepared):
            await self._forward(chunk)

    async def _heartbeat(self) -> None:
        """Tell JetStream every held (fetched, not yet settled) delivery is still in the works."""
        interval = max(self._ack_wait / 3.0, 0.05)
        while True:
            await asyncio.sleep(interval)
            for delivery in list(self._held.values()):
                try:
                    await delivery.in_progress()
                except Exception as exc:
                    self.log.debug("in_progress failed", error=repr(exc))

    def _pack(self, prepared: list[Prepared]) -> list[list[Prepared]]:
        """Longest first into forwards of <= batch_size rows and <= max_batch_tokens padded."""
        capture = self.spec.capture
        chunks: list[list[Prepared]] = []
        current: list[Prepared] = []
        for item in sorted(prepared, key=lambda p: len(p.input_ids), reverse=True):
            if current:
                width = len(current[0].input_ids)  # the longest: sorted descending
                if (
                    len(current) >= capture.batch_size
                    or (len(current) + 1) * width > capture.max_batch_tokens
                ):
                    chunks.append(current)
                    current = []
            current.append(item)
        if current:
            chunks.append(current)
        return chunks

    # --- preparing tasks -------------------------------------------------------------------

    async def _prepare_all(self, deliveries: list[Delivery[PromptTask]]) -> list[Prepared]:
        checked: list[Delivery[PromptTask]] = []
        for delivery in deliveries:
            try:
                self._check_task(delivery.record)
            except Rejected as exc:
                await self._reject(delivery, str(exc))
                continue
            checked.append(delivery)
        if self.spec.capture.mode == "decode":
            candidates = await self._decode(checked)
        else:
            candidates = []
            for delivery in checked:
                try:
                    candidates.append(self._prefill(delivery))
                except Rejected as exc:
                    await self._reject(delivery, str(exc))
        ready = []
        for item in candidates:
            supervised = sum(item.loss_mask)
            # At least one supervised token even if min_loss_tokens is 0: nothing to learn.
            if supervised < max(self.spec.min_loss_tokens, 1):
                await self._reject(
                    item.delivery,
                    f"prompt {item.task.prompt_id!r} has {supervised} supervised (loss-masked) "
                    f"tokens of {len(item.input_ids)}, fewer than min_loss_tokens="
                    f"{max(self.spec.min_loss_tokens, 1)}",
                )
                continue
            ready.append(item)
        return ready

    def _check_task(self, task: PromptTask) -> None:
        if task.run_id != self.run_id:
            raise Rejected(f"task is for run {task.run_id!r}, this worker captures {self.run_id!r}")
        if task.run_spec_hash != self.spec_hash:
            raise Rejected(
                f"task run_spec_hash {task.run_spec_hash!r} != the run spec's hash "
                f"{self.spec_hash!r}: it was enqueued under another spec; re-enqueue it"
            )

    def _prefill(self, delivery: Delivery[PromptTask]) -> Prepared:
        task = delivery.record
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
        vocab = self.engine.info.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise Rejected(
                f"{len(bad)} input id(s) outside the target vocabulary [0, {vocab}), e.g. "
                f"{bad[:3]}: tokenized with another tokenizer?"
            )
        if any(m not in (0, 1) for m in mask):
            raise Rejected("loss_mask values must be 0 or 1")
        limit = self.spec.max_length
        return self._prepared(delivery, ids[:limit], mask[:limit])

    def _prepared(self, delivery: Delivery[PromptTask], ids: list[int], mask: list[int]):
        task = delivery.record
        sample_id = sample_id_for(self.run_id, task.prompt_id, self.spec_hash)
        return Prepared(delivery, task, sample_id, ids, mask)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.spec.target.tokenizer:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.spec.target.tokenizer)
            else:
                self._tokenizer = self.engine.tokenizer  # type: ignore[attr-defined]
        return self._tokenizer

    async def _decode(self, deliveries: list[Delivery[PromptTask]]) -> list[Prepared]:
        """Let the target write the first assistant reply of each conversation."""
        from specforge_common.data.chat import generation_prompt_ids

        capture = self.spec.capture
        prompts: list[tuple[Delivery[PromptTask], list[int], int]] = []
        for delivery in deliveries:
            task = delivery.record
            if task.messages is None:
                await self._reject(
                    delivery,
                    "capture.mode is 'decode', which needs the conversation (messages), but the "
                    "task carries only token ids",
                )
                continue
            try:
                ids = generation_prompt_ids(
                    self.tokenizer, task.messages, chat_template=self.spec.chat_template
                )
            except Exception as exc:  # ChatTemplateError and tokenizer failures
                await self._reject(delivery, f"cannot template the prompt: {exc}")
                continue
            room = min(capture.max_new_tokens, self.spec.max_length - len(ids))
            if room <= 0:
                await self._reject(
                    delivery,
                    f"the prompt is {len(ids)} tokens: no room to generate a reply under "
                    f"max_length={self.spec.max_length}",
                )
                continue
            prompts.append((delivery, ids, room))
        if not prompts:
            return []

        started = time.perf_counter()
        out: list[Prepared] = []
        if capture.temperature > 0:
            # One prompt per call: each prompt's reply depends only on its own seed.
            groups = [[p] for p in prompts]
        else:
            ordered = sorted(prompts, key=lambda p: len(p[1]), reverse=True)
            size = max(1, capture.batch_size)
            groups = [ordered[i : i + size] for i in range(0, len(ordered), size)]
        for group in groups:
            try:
                replies = await asyncio.to_thread(self._generate, group)
            except Exception as exc:
                await self._fail([d for d, _, _ in group], exc, stage="generate")
                continue
            for (delivery, ids, room), reply in zip(group, replies, strict=True):
                reply = reply[:room]
                self.stats.generated_tokens += len(reply)
                out.append(self._prepared(delivery, ids + reply, [0] * len(ids) + [1] * len(reply)))
        self.stats.generate_s += time.perf_counter() - started
        return out

    def _generate(
        self, group: list[tuple[Delivery[PromptTask], list[int], int]]
    ) -> list[list[int]]:
        capture = self.spec.capture
        ids, mask = self._right_padded([p[1] for p in group])
        seed = None
        if capture.temperature > 0:
            seed = decode_seed(self.spec.seed, group[0][0].record.prompt_id)
        return self.engine.generate(
            ids,
            mask,
            max_new_tokens=max(room for _, _, room in group),
            temperature=capture.temperature,
            seed=seed,
        )

    def _right_padded(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    # --- capturing one forward -------------------------------------------------------------

    async def _forward(self, chunk: list[Prepared]) -> None:
        """Run one right-padded forward, then hand its features to the emit stage."""
        try:
            ids, mask = self._right_padded([p.input_ids for p in chunk])
            started = time.perf_counter()
            rows = await asyncio.to_thread(self._features, chunk, ids, mask)
            self.stats.forward_s += time.perf_counter() - started
        except Exception as exc:
            if len(chunk) > 1:
                self.log.warning(
                    "forward of a batch failed; retrying its samples one by one",
                    rows=len(chunk),
                    error=repr(exc),
                )
                for item in chunk:
                    await self._forward([item])
                return
            await self._fail([chunk[0].delivery], exc, stage="forward")
            return
        self.stats.forwards += 1
        self.stats.tokens += sum(len(p.input_ids) for p in chunk)
        self.stats.padded_tokens += ids.numel()
        if self.pipeline_depth > 0:
            await self._emit_queue.put((chunk, rows))  # blocks while the emit stage is behind
        else:
            await self._emit(chunk, rows)

    def _features(self, chunk: list[Prepared], ids: torch.Tensor, mask: torch.Tensor):
        """Worker thread: the forward and each sample's real-token features, on the CPU."""
        out = self.engine.capture(ids, mask)
        rows = []
        for row, p in enumerate(chunk):
            n = len(p.input_ids)
            rows.append(
                (_owned(out.aux_hidden_states[row, :n]), _owned(out.hidden_states[row, :n]))
            )
        return rows

    async def _emit_loop(self) -> None:
        """The emit stage: store, publish and ack while the next forward runs."""
        while True:
            item = await self._emit_queue.get()
            if item is None:
                return
            try:
                await self._emit(*item)
            except Exception as exc:  # a bug here must not wedge the pipeline
                self.log.exception("emit stage failed")
                await self._fail([p.delivery for p in item[0]], exc, stage="emit")

    async def _emit(self, chunk: list[Prepared], rows: list[tuple[torch.Tensor, torch.Tensor]]):
        """Store the samples, publish their SampleRefs and, once all are stored, ack."""
        try:
            refs = await asyncio.to_thread(self._store, chunk, rows)
            published = await self.bus.publish_many(
                (self._subject(p), ref, self._msg_id(p)) for p, ref in zip(chunk, refs, strict=True)
            )
        except Exception as exc:
            await self._fail([p.delivery for p in chunk], exc, stage="store/publish")
            return
        await self._ack(chunk)
        for p, pub in zip(chunk, published, strict=True):
            self._held.pop(id(p.delivery), None)
            if pub.duplicate:
                self.stats.duplicates += 1
            elif p.task.recapture:
                self.stats.recaptured += 1
            else:
                self.stats.samples_published[p.task.split] += 1
            (self.log.info if p.task.recapture else self.log.debug)(
                "sample re-captured" if p.task.recapture else "sample captured",
                sample_id=p.sample_id,
                prompt_id=p.task.prompt_id,
                split=p.task.split,
                tokens=len(p.input_ids),
                seq=pub.seq,
                duplicate=pub.duplicate,
            )
        self.stats.prompts_captured += len(chunk)
        self.stats.emitted += 1
        if self.stats.emitted % self.progress_every == 0:
            self._log_progress("capture progress")

    def _subject(self, p: Prepared) -> str:
        """A re-capture goes to the recaptured subject: the split's log has the original."""
        return self.subjects.recaptured if p.task.recapture else self.subjects.samples(p.task.split)

    def _msg_id(self, p: Prepared) -> str:
        return f"recaptured:{p.sample_id}:{p.task.attempt}" if p.task.recapture else p.sample_id

    def _store(self, chunk: list[Prepared], rows: list[tuple[torch.Tensor, torch.Tensor]]):
        """Worker thread: put every sample of a forward in the store; their SampleRefs."""
        refs: list[SampleRef] = []
        for p, (aux, hidden) in zip(chunk, rows, strict=True):
            n = len(p.input_ids)
            tensors = {
                "input_ids": torch.tensor(p.input_ids, dtype=torch.int64),
                "loss_mask": torch.tensor(p.loss_mask, dtype=torch.int64),
                "aux_hidden_states": aux,
                "hidden_states": hidden,
            }
            location = self.store.put(p.sample_id, tensors)
            refs.append(
                SampleRef(
                    sample_id=p.sample_id,
                    run_id=self.run_id,
                    prompt_id=p.task.prompt_id,
                    split=p.task.split,
                    producer=self.producer_id,
                    features=location,
                    num_tokens=n,
                    run_spec_hash=self.spec_hash,
                )
            )
        return refs

    async def _ack(self, chunk: list[Prepared]) -> None:
        """Ack the prompts of a forward whose SampleRefs JetStream has stored."""
        for p in chunk:
            try:
                await p.delivery.ack()
            except Exception as exc:  # redelivered later; the SampleRef dedups
                self.log.warning("ack failed", prompt_id=p.task.prompt_id, error=repr(exc))

    # --- settling failures -----------------------------------------------------------------

    async def _reject(self, delivery: Delivery[PromptTask], reason: str) -> None:
        """A permanent failure of one task: dead-letter it with the reason."""
        self._held.pop(id(delivery), None)
        self.stats.dead_lettered += 1
        self.log.warning(
            "prompt dead-lettered",
            prompt_id=delivery.record.prompt_id,
            sample_id=sample_id_for(self.run_id, delivery.record.prompt_id, self.spec_hash),
            reason=reason,
        )
        try:
            await delivery.dead_letter(reason, SERVICE)
        except Exception as exc:  # it comes back after ack_wait and is rejected again
            self.log.error("cannot dead-letter a prompt", error=repr(exc), reason=reason)

    async def _fail(self, deliveries: list[Delivery[PromptTask]], exc: BaseException, *,
                    stage: str) -> None:  # fmt: skip
        """A possibly transient failure: nak with backoff, dead-letter after max_deliver."""
        base, cap = self.backoff_s
        for delivery in deliveries:
            self._held.pop(id(delivery), None)
            try:
                n = delivery.deliveries
            except Exception:
                n = 1
            if 0 < self._max_deliver <= n:  # max_deliver -1: JetStream retries forever
                self.stats.dead_lettered += 1
                reason = (
                    f"{stage} failed on delivery {n} of max_deliver={self._max_deliver}: {exc!r}"
                )
                self.log.error(
                    "prompt dead-lettered after repeated failures",
                    prompt_id=delivery.record.prompt_id,
                    reason=reason,
                )
                try:
                    await delivery.dead_letter(reason, SERVICE)
                except Exception as dl_exc:
                    self.log.error("cannot dead-letter a prompt", error=repr(dl_exc))
                continue
            delay = min(base * 2 ** (n - 1), cap)
            self.stats.retried += 1
            self.log.warning(
                f"{stage} failed; prompt handed back for retry",
                prompt_id=delivery.record.prompt_id,
                deliveries=n,
                retry_in_s=delay,
                error=repr(exc),
            )
            try:
                await delivery.nak(delay=delay)
            except Exception as nak_exc:  # redelivered after ack_wait anyway
                self.log.warning("nak failed", error=repr(nak_exc))

    # --- end of data -----------------------------------------------------------------------

    async def _end_of_data(self) -> bool:
        """True once the EndOfSplit markers are out (published by this worker or earlier)."""
        if self.stats.end_published:
            return True
        try:
            summary = await self.bus.get_record(enqueue_key(self.run_id), EnqueueSummary)
            if summary is None:
                if not self._waiting_logged:
                    self.log.info("prompt queue empty; waiting for the enqueue summary")
                    self._waiting_logged = True
                return False
            lag = await self.bus.consumer_lag(self.run_id, "prompts", DURABLE)
            if lag.num_pending or lag.num_ack_pending:
                return False
            await self._dead_letter_leftovers(lag.max_deliver or self._max_deliver)
            for split in SPLITS:
                marker = EndOfSplit(
                    run_id=self.run_id,
                    split=split,
                    producer=self.producer_id,
                    samples_published=self.stats.samples_published[split],
                    run_spec_hash=self.spec_hash,
                )
                await self.bus.publish(
                    self.subjects.samples(split), marker, msg_id=f"end:{self.run_id}:{split}"
                )
        except Exception as exc:
            self.log.warning("end-of-data check failed; will retry", error=repr(exc))
            return False
        self.stats.end_published = True
        self._log_progress("prompt queue drained: end of split published")
        return True

    # --- logging ---------------------------------------------------------------------------

    def _log_progress(self, event: str) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        stats = self.stats
        self.log.info(
            event,
            **stats.as_log(),
            tokens_per_s=round(stats.tokens / elapsed, 1),
            forward_tokens_per_s=round(stats.tokens / stats.forward_s, 1) if stats.forward_s else 0,
            padding=round(1 - stats.tokens / stats.padded_tokens, 3) if stats.padded_tokens else 0,
            outstanding=self.gate.last_outstanding,
            elapsed_s=round(elapsed, 1),
        )


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that owns its memory (not a view into the batch's buffer)."""
    if tensor.device.type != "cpu":
        return tensor.to("cpu").contiguous()
    return tensor.clone(memory_format=torch.contiguous_format)
