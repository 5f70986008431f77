"""What becomes of a prompt that cannot be captured, so that no failure stops the run.

A task that can never succeed (``Rejected``) is dead-lettered with the reason at once. A failure
that may be transient (a forward, store or publish) naks its prompts with exponential backoff;
a prompt delivered ``max_deliver`` times that fails again is dead-lettered. One that never fails
but never gets settled either (it crashes, hangs or OOM-kills the worker every time) is given
up by JetStream after ``max_deliver`` deliveries; every worker listens for that advisory,
dead-letters the prompt with the reason and deletes it from the queue (one worker wins).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from specforge_common.aio import in_background
from specforge_common.bus import Bus, Delivery
from specforge_common.contracts import PromptTask

from .ledger import CaptureStats, Held
from .names import DURABLE, SERVICE
from .prepare import sample_id_for


class Failures:
    """Settles the prompts of one worker that failed: dead letter or nak with backoff."""

    def __init__(
        self,
        bus: Bus,
        run_id: str,
        spec_hash: str,
        *,
        stats: CaptureStats,
        held: Held,
        log: Any,
        backoff_s: tuple[float, float],
        max_deliver: int,
    ) -> None:
        self.bus = bus
        self.run_id = run_id
        self.spec_hash = spec_hash
        self.stats = stats
        self.held = held
        self.log = log
        self.backoff_s = backoff_s
        # The consumer's delivery limit (-1: JetStream retries forever); the worker sets the
        # shared consumer's once it knows it.
        self.max_deliver = max_deliver

    async def reject(self, delivery: Delivery[PromptTask], reason: str) -> None:
        """A permanent failure of one task: dead-letter it with the reason."""
        self.held.release(delivery)
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

    async def fail(
        self, deliveries: list[Delivery[PromptTask]], exc: BaseException, *, stage: str
    ) -> None:
        """A possibly transient failure: nak with backoff, dead-letter after max_deliver."""
        base, cap = self.backoff_s
        for delivery in deliveries:
            self.held.release(delivery)
            try:
                n = delivery.deliveries
            except Exception:
                n = 1
            if 0 < self.max_deliver <= n:
                self.stats.dead_lettered += 1
                reason = (
                    f"{stage} failed on delivery {n} of max_deliver={self.max_deliver}: {exc!r}"
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

    @asynccontextmanager
    async def dead_lettering_given_up(self) -> AsyncIterator[None]:
        """While the block runs, dead-letter every prompt JetStream gives up on."""
        async with in_background(self._dead_letter_given_up()):
            yield

    async def _dead_letter_given_up(self) -> None:
        try:
            async for seq, deliveries in self.bus.given_up(self.run_id, "prompts", DURABLE):
                try:
                    done = await self.bus.dead_letter_given_up(
                        self.run_id, "prompts", seq, deliveries, service=SERVICE
                    )
                    if done:
                        self.stats.dead_lettered += 1
                        self.log.error(
                            "prompt given up after max_deliver: dead-lettered",
                            seq=seq,
                            deliveries=deliveries,
                        )
                except Exception as exc:
                    self.log.warning(
                        "cannot dead-letter a given-up prompt", seq=seq, error=repr(exc)
                    )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.warning("not watching for given-up prompts", error=repr(exc))
