"""When the capture of a run is complete, and when a worker may leave.

When a fetch comes back empty, the ``EnqueueSummary`` exists and the consumer has nothing
pending or unacked, every prompt's SampleRef is in the samples stream; the worker publishes
``EndOfSplit`` for both splits (``msg_id = end:<run>:<split>``: the first worker's marker wins).
A worker told to exit when done leaves only once no trainer of the run is still training (no
``TrainerProgress`` at all, or every rank's says ``done``): until then it stays up to serve
re-capture requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from specforge_common.bus import Bus
from specforge_common.contracts import SPLITS, EndOfSplit, EnqueueSummary, TrainerProgress
from specforge_common.subjects import RunSubjects, enqueue_key, progress_prefix

from .ledger import CaptureStats
from .names import DURABLE, SERVICE


class EndOfData:
    """Announces the end of both splits once the prompt queue is drained for good."""

    def __init__(
        self,
        bus: Bus,
        *,
        run_id: str,
        spec_hash: str,
        producer_id: str,
        stats: CaptureStats,
        log: Any,
        progress: Callable[[str], None],
    ) -> None:
        self.bus = bus
        self.run_id = run_id
        self.spec_hash = spec_hash
        self.producer_id = producer_id
        self.subjects = RunSubjects(run_id)
        self.stats = stats
        self.log = log
        self.progress = progress
        self._waiting_logged = False
        self._lingering_logged = False

    async def reached(self, max_deliver: int) -> bool:
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
            await self._dead_letter_leftovers(lag.max_deliver or max_deliver)
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
        self.progress("prompt queue drained: end of split published")
        return True

    async def _dead_letter_leftovers(self, max_deliver: int) -> None:
        """With every prompt delivered and settled, a prompt still in the work queue was given
        up after ``max_deliver`` deliveries while no worker heard the advisory (they had all
        died on it): dead-letter it now, before the end of the split is announced."""
        if not (await self.bus.stream_state(self.run_id, "prompts")).messages:
            return
        seqs = await self.bus.stored_sequences(self.run_id, "prompts", self.subjects.prompts)
        for seq in seqs:
            if await self.bus.dead_letter_given_up(
                self.run_id, "prompts", seq, max_deliver, service=SERVICE
            ):
                self.stats.dead_lettered += 1
                self.log.error("prompt left in the queue after max_deliver: dead-lettered", seq=seq)

    async def trainers_done(self) -> bool:
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
            self.log.info(
                "end of data; staying up to re-capture evicted samples until the trainers finish",
                training_ranks=training,
            )
            self._lingering_logged = True
        return not training
