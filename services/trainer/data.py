"""Training data: the samples log of a run, read in stream order, as right-padded batches.

``SampleStream`` replays ``sf.<run>.samples.train`` from a start sequence and follows it while
capture is still producing (a resumed trainer starts mid-epoch: ``first_epoch`` and
``start_seq``), skips ``SampleRef``s stamped with another run-spec hash, fetches each
sample's tensors from the feature store in worker threads a few samples ahead of the trainer,
and stops at the ``EndOfSplit`` marker. Later epochs replay from sequence 1 up to the marker (the
features must still be in the store). A sample whose tensors are missing (evicted) is captured
again from its prompt (``recapture.Recapturer``: at most ``recapture_timeout_s`` seconds) and
keeps its place in the order; its ``StreamSample.ref`` is then the re-captured SampleRef (same
sample id, new features location and checksum), its ``seq`` the original one. A sample that
cannot be re-captured, or whose tensors are corrupt (and were never re-captured) or malformed,
is dead-lettered with the reason and skipped; the rest of the run goes on.

Sharding (``rank``, ``world_size``, no coordinator): rank ``r`` keeps the SampleRefs whose
position in the split (the i-th SampleRef of this run's spec in the split, in stream order,
i = 0, 1, ...) satisfies ``i % world_size == r``. Positions, not stream sequences, so the eval
samples interleaved in the same stream do not unbalance the ranks. A sharded stream always
replays from sequence 1 to count positions (reading refs only) and fetches nothing before
``start_seq``.

Epoch shuffle (``shuffle_window > 1``): epochs after the first are read through a seeded window
buffer of ``shuffle_window`` refs (each incoming ref replaces a randomly drawn buffered one, which
is emitted; the rest is emitted shuffled at the marker), so each epoch's order is a pure function
of (this rank's stream order, ``shuffle_seed``, epoch); epoch 0 stays in stream order. A shuffled
epoch is always replayed from sequence 1; ``start_index`` skips the first items of the first
epoch's order (``StreamSample.index`` numbers them, dead-lettered ones included) for a resume.
The trainer sets it from ``TrainSpec.shuffle_window`` and the run's seed.

``BatchReader`` groups samples into batches of ``batch_size`` (never across an epoch boundary;
the last, partial batch of an epoch is used) and looks one sample ahead, so a batch knows whether
it is the last one of the run. ``collate`` right-pads a batch into a ``TrainBatch``.

The time the trainer spends blocked on bus or store is accumulated in ``StreamStats.wait_s``.
(The module is a little over 450 lines: ``SampleStream`` is one job — ordering, sharding,
prefetch, re-capture and dead letters of the samples it hands out — and splits no further.)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from specforge_common.aio import cancel_and_wait
from specforge_common.batch import (
    FEATURE_KEYS,
    SampleError,
    TrainBatch,
    check_sample,
    collate,
    sample_seed,
)
from specforge_common.bus import Bus
from specforge_common.contracts import EndOfSplit, SampleRef, Split, encode
from specforge_common.featurestore import FeatureStore, FeatureStoreError
from specforge_common.featurestore.errors import FeatureCorruptError, FeatureMissingError
from specforge_common.log import get_logger
from specforge_common.subjects import RunSubjects

from .recapture import RecaptureError, Recapturer

__all__ = [
    "FEATURE_KEYS",
    "BatchReader",
    "SampleError",
    "SampleStream",
    "StreamBatch",
    "StreamSample",
    "StreamStats",
    "check_sample",
    "collate",
]

FETCH_RETRIES = 2  # extra attempts for store errors other than missing / corrupt (I/O hiccups)
FETCH_RETRY_DELAY_S = 0.5
WAIT_LOG_EVERY_S = 30.0  # a trainer waiting on capture says so this often
RECAPTURE_TIMEOUT_S = 300.0  # how long a sample whose features vanished waits to be re-captured


@dataclass
class StreamSample:
    seq: int  # samples-stream sequence of its SampleRef
    epoch: int
    ref: SampleRef
    tensors: dict[str, torch.Tensor]
    index: int = -1  # position in its epoch's order (of this rank's shard)

    @property
    def num_tokens(self) -> int:
        return int(self.tensors["input_ids"].shape[0])


@dataclass
class StreamStats:
    samples: int = 0  # yielded to the trainer
    skipped_foreign: int = 0  # SampleRefs / markers stamped with another run-spec hash
    dead_lettered: int = 0  # features missing (and not re-captured), corrupt or malformed
    recaptured: int = 0  # features missing, captured again from the prompt
    wait_s: float = 0.0  # time the consumer was blocked on bus or store
    end_sequence: int | None = None  # sequence of the EndOfSplit marker
    epochs_done: int = 0


@dataclass
class _Pending:
    seq: int
    epoch: int
    ref: SampleRef
    # -> (the ref whose features were read: ``ref`` or a re-captured one, its tensors)
    future: asyncio.Future[tuple[SampleRef, dict[str, torch.Tensor]]]
    index: int = -1


@dataclass
class _Failed:
    error: BaseException


_END = object()


class SampleStream:
    """Samples of one split in stream order, ``epochs`` times, prefetched; see the module doc.

    Use as ``async with SampleStream(...) as stream: while (s := await stream.next()): ...``.
    """

    def __init__(
        self,
        bus: Bus,
        store: FeatureStore,
        run_id: str,
        *,
        spec_hash: str,
        epochs: int = 1,
        start_seq: int = 1,
        first_epoch: int = 0,
        split: Split = "train",
        prefetch: int = 8,
        fetch_threads: int = 2,
        aux_size: int | None = None,
        hidden_size: int | None = None,
        method: str = "eagle3",
        service: str = "trainer",
        rank: int = 0,
        world_size: int = 1,
        shuffle_window: int = 0,
        shuffle_seed: int = 0,
        start_index: int = 0,
        recapture_timeout_s: float = RECAPTURE_TIMEOUT_S,
    ) -> None:
        self.shuffle_window, self.shuffle_seed = shuffle_window, shuffle_seed
        self.start_index = start_index
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.rank, self.world_size = rank, world_size
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if not 0 <= first_epoch <= epochs:
            raise ValueError(f"first_epoch must be in [0, {epochs}], got {first_epoch}")
        self.bus, self.store, self.run_id, self.spec_hash = bus, store, run_id, spec_hash
        self.epochs, self.start_seq, self.split = epochs, start_seq, split
        self.first_epoch = first_epoch
        self.prefetch = max(1, prefetch)
        self.aux_size, self.hidden_size, self.service = aux_size, hidden_size, service
        self.method = method
        self.subjects = RunSubjects(run_id)
        self.stats = StreamStats()
        self.log = get_logger(service=service, run=run_id, component="sample-stream")
        self._fetch_threads = max(1, fetch_threads)
        # recapture_timeout_s <= 0: a missing sample is dead-lettered at once.
        self.recapture_timeout_s = recapture_timeout_s
        self._recapturer = Recapturer(bus, run_id, timeout_s=recapture_timeout_s, log=self.log)
        self._loads: set[asyncio.Task[Any]] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[Any] | None = None
        self._producer: asyncio.Task[None] | None = None
        self._finished = False

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._pool = ThreadPoolExecutor(self._fetch_threads, thread_name_prefix="sample-fetch")
        self._queue = asyncio.Queue(maxsize=self.prefetch)
        self._producer = asyncio.create_task(self._produce(), name=f"sample-stream-{self.run_id}")

    async def close(self) -> None:
        if self._producer is not None:
            await cancel_and_wait(self._producer)
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if isinstance(item, _Pending):
                    item.future.cancel()
        for load in list(self._loads):  # also those taken off the queue or never queued
            load.cancel()
        if self._loads:
            await asyncio.gather(*self._loads, return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    async def __aenter__(self) -> SampleStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> SampleStream:
        return self

    async def __anext__(self) -> StreamSample:
        sample = await self.next()
        if sample is None:
            raise StopAsyncIteration
        return sample

    # --- consumer side ---------------------------------------------------------------------

    async def next(self) -> StreamSample | None:
        """The next good sample, or None once the marker of the last epoch was passed."""
        if self._finished:
            return None
        await self.start()
        assert self._queue is not None
        started = time.perf_counter()
        try:
            while True:
                if not self._queue.empty():  # the usual case: prefetched, no task switch
                    item = self._queue.get_nowait()
                else:
                    try:
                        item = await asyncio.wait_for(self._queue.get(), WAIT_LOG_EVERY_S)
                    except asyncio.TimeoutError:
                        self.log.info("waiting for samples", split=self.split,
                                      waited_s=round(time.perf_counter() - started, 1))  # fmt: skip
                        continue
                if item is _END:
                    self._finished = True
                    return None
                if isinstance(item, _Failed):
                    self._finished = True
                    raise item.error
                try:
                    ref, tensors = item.future.result() if item.future.done() else await item.future
                except (FeatureStoreError, SampleError) as exc:
                    await self._dead_letter(item, exc)
                    continue
                self.stats.samples += 1
                return StreamSample(item.seq, item.epoch, ref, tensors, item.index)
        finally:
            self.stats.wait_s += time.perf_counter() - started

    async def _dead_letter(self, item: _Pending, exc: BaseException) -> None:
        self.stats.dead_lettered += 1
        subject = self.subjects.samples(self.split)
        reason = f"{type(exc).__name__}: {exc}"
        self.log.error("sample unusable, dead-lettered and skipped", sample_id=item.ref.sample_id,
                       seq=item.seq, epoch=item.epoch, reason=reason)  # fmt: skip
        await self.bus.dead_letter(self.run_id, subject, encode(item.ref), reason,
                                   service=self.service, seq=item.seq)  # fmt: skip

    # --- producer side ---------------------------------------------------------------------

    def _fetch(self, ref: SampleRef) -> dict[str, torch.Tensor]:
        """Runs in a worker thread: read and validate one sample's tensors."""
        if ref.method != self.method:
            raise SampleError(f"sample {ref.sample_id} holds {ref.method!r} features but this "
                              f"trainer trains on {self.method!r} features")  # fmt: skip
        for attempt in range(FETCH_RETRIES + 1):
            try:
                tensors = self.store.get(ref.features)
                break
            except (FeatureMissingError, FeatureCorruptError):
                raise
            except FeatureStoreError:
                if attempt == FETCH_RETRIES:
                    raise
                time.sleep(FETCH_RETRY_DELAY_S * (attempt + 1))
        check_sample(tensors, aux_size=self.aux_size, hidden_size=self.hidden_size,
                     method=self.method)  # fmt: skip
        return tensors

    async def _load(self, ref: SampleRef) -> tuple[SampleRef, dict[str, torch.Tensor]]:
        """``(ref, tensors)``, or those of a re-captured ref of the same sample when ``ref``'s
        features are missing: the newest re-captured ref in the log whose features are there,
        else a new re-capture (``recapture.Recapturer``).

        Corrupt features are dead-lettered, unless a re-captured ref exists: a
        re-capture writes the same key, and its bytes may differ from the first capture's (GPU
        non-determinism), which the original ref's checksum then rejects.
        """
        loop = asyncio.get_running_loop()
        try:
            return ref, await loop.run_in_executor(self._pool, self._fetch, ref)
        except (FeatureMissingError, FeatureCorruptError) as exc:
            if self.recapture_timeout_s <= 0:
                raise
            first = exc
        known = await self._recapturer.known(ref.sample_id)
        new, tensors = (known[-1] if known else None), None
        if new is not None:
            try:
                tensors = await loop.run_in_executor(self._pool, self._fetch, new)
            except FeatureMissingError:
                new = None  # evicted again
        if new is None:
            if isinstance(first, FeatureCorruptError):
                raise first
            try:
                new = await self._recapturer.request(ref, len(known) + 1)
            except RecaptureError as exc:
                raise FeatureMissingError(f"{first}; not re-captured: {exc}") from exc
            tensors = await loop.run_in_executor(self._pool, self._fetch, new)
        self.stats.recaptured += 1
        self.log.info("using a re-captured sample", sample_id=ref.sample_id,
                      first_capture=type(first).__name__, features=new.features.uri)  # fmt: skip
        assert tensors is not None
        return new, tensors

    async def _produce(self) -> None:
        assert self._queue is not None
        try:
            start = self.start_seq
            for epoch in range(self.first_epoch, self.epochs):
                await self._replay_epoch(epoch, start)
                self.stats.epochs_done = epoch + 1
                start = 1
            await self._queue.put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await self._queue.put(_Failed(exc))

    async def _replay_epoch(self, epoch: int, start: int) -> None:
        assert self._queue is not None and self._pool is not None
        shuffled = self.shuffle_window > 1 and epoch > 0
        sharded = self.world_size > 1
        if shuffled:
            start = 1  # a resume inside a shuffled epoch skips by index instead
        skip = self.start_index if epoch == self.first_epoch else 0
        self.log.info("reading samples", split=self.split, epoch=epoch, start_seq=start,
                      rank=self.rank, world_size=self.world_size, shuffled=shuffled,
                      start_index=skip)  # fmt: skip
        rng = random.Random(f"{self.shuffle_seed}:{epoch}")  # str seeds are stable (sha512)
        window: list[tuple[int, SampleRef]] = []
        emitted = 0

        async def emit(seq: int, ref: SampleRef) -> None:
            nonlocal emitted
            index, emitted = emitted, emitted + 1
            if index < skip:
                return
            load = asyncio.create_task(self._load(ref))
            self._loads.add(load)
            load.add_done_callback(self._loads.discard)
            await self._queue.put(_Pending(seq, epoch, ref, load, index))

        position = 0  # of the next SampleRef in the split (sharded streams only)
        ended = False
        # A message that is no record is dead-lettered and skipped by the bus itself, on every
        # rank alike, so the shard positions stay aligned.
        replay = self.bus.replay(self.run_id, self.split, 1 if sharded else start, follow=True)
        async with contextlib.aclosing(replay) as records:
            async for seq, record in records:
                if record.run_spec_hash != self.spec_hash:
                    self.stats.skipped_foreign += 1
                    self.log.warning(
                        "skipping a record of another run spec", seq=seq,
                        kind=type(record).__name__, record_spec_hash=record.run_spec_hash,
                        spec_hash=self.spec_hash,
                        sample_id=getattr(record, "sample_id", None),
                    )  # fmt: skip
                    continue
                if isinstance(record, EndOfSplit):
                    if self.stats.end_sequence is None:
                        self.stats.end_sequence = seq
                    self.log.info("end of split", split=self.split, epoch=epoch, seq=seq,
                                  samples_published=record.samples_published)  # fmt: skip
                    ended = True
                    break
                if self.stats.end_sequence is not None and seq > self.stats.end_sequence:
                    ended = True  # never past the first marker in later epochs
                    break
                if sharded:
                    mine = position % self.world_size == self.rank
                    position += 1
                    if not mine:
                        continue
                if seq < start:
                    continue
                if not shuffled:
                    await emit(seq, record)
                elif len(window) < self.shuffle_window:
                    window.append((seq, record))
                else:
                    j = rng.randrange(len(window))
                    out, window[j] = window[j], (seq, record)
                    await emit(*out)
        if not ended:
            raise RuntimeError(f"replay of {self.run_id}/{self.split} ended without an EndOfSplit")
        rng.shuffle(window)
        for item in window:
            await emit(*item)


@dataclass
class StreamBatch:
    """Consecutive samples of one epoch; ``last`` when no sample follows it in the run."""

    samples: list[StreamSample]
    last: bool = False
    seed: int = 0  # the run's: with prompt id and epoch, each sample's ``TrainBatch.seeds``
    _batch: TrainBatch | None = field(default=None, repr=False)

    @property
    def epoch(self) -> int:
        return self.samples[0].epoch

    @property
    def last_sequence(self) -> int:
        return self.samples[-1].seq

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.samples)

    def collate(self) -> TrainBatch:
        if self._batch is None:
            seeds = [sample_seed(self.seed, s.ref.prompt_id, s.epoch) for s in self.samples]
            self._batch = collate([s.tensors for s in self.samples], seeds=seeds)
        return self._batch


class BatchReader:
    """Batches of ``batch_size`` from a ``SampleStream``, one sample of look-ahead."""

    def __init__(self, stream: SampleStream, batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.stream, self.batch_size, self.seed = stream, batch_size, seed
        self._peeked: StreamSample | None = None

    async def next(self) -> StreamBatch | None:
        first = self._peeked or await self.stream.next()
        self._peeked = None
        if first is None:
            return None
        samples = [first]
        while True:
            following = await self.stream.next()
            if following is None:
                return StreamBatch(samples, last=True, seed=self.seed)
            if following.epoch != first.epoch or len(samples) == self.batch_size:
                self._peeked = following
                return StreamBatch(samples, seed=self.seed)
            samples.append(following)
