"""Re-capture: a sample whose features vanished from the store is captured again from its prompt.

A store that evicts (mooncake://) turns a lost sample into ``FeatureMissingError``. Instead of
dropping the sample, the trainer (``SampleStream``):

1. looks for re-captured SampleRefs of that sample id on ``sf.<run>.samples.recaptured`` (a
   replayed or resumed stream may meet a sample that was already re-captured) and uses the
   newest one if its features are still there;
2. otherwise reads the prompt back from the prompt log (``Bus.prompt_task``) and publishes it to
   ``sf.<run>.prompts.recapture`` with ``recapture=True`` and ``attempt = n`` (the n-th
   re-capture of this sample; msg id ``recapture:<sample id>:<n>``, so a restarted trainer asking
   again is a duplicate, not a second capture);
3. follows the recaptured subject from where its scan stopped until a SampleRef of that sample id
   arrives (capture publishes it with msg id ``recaptured:<sample id>:<n>``), at most
   ``timeout_s`` seconds, saying so in the log while it waits.

:class:`RecaptureError` (the caller dead-letters the sample) when
the prompt is not in the log or the wait timed out. After a timeout nobody is likely to answer
(no capture worker for the run, e.g. a replay of a finished run): for the next ``timeout_s``
seconds further samples are not asked for, unless an answer shows up in the meantime, so a store
that lost everything costs one wait, not one per sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec

from specforge_common.aio import cancel_and_wait
from specforge_common.bus import Bus
from specforge_common.contracts import SampleRef
from specforge_common.subjects import RunSubjects

WAIT_LOG_EVERY_S = 30.0


class RecaptureError(Exception):
    """The sample could not be captured again (no prompt to capture, or nobody answered)."""


class Recapturer:
    """Re-captured SampleRefs of one run: looks them up and asks capture for new ones."""

    def __init__(
        self,
        bus: Bus,
        run_id: str,
        *,
        timeout_s: float,
        log: Any,
        wait_log_every_s: float = WAIT_LOG_EVERY_S,
    ) -> None:
        self.bus, self.run_id, self.timeout_s, self.log = bus, run_id, timeout_s, log
        self.wait_log_every_s = wait_log_every_s
        self.subjects = RunSubjects(run_id)
        self._stream = self.subjects.stream("samples")
        self._known: dict[str, dict[int, SampleRef]] = {}  # sample id -> seq -> recaptured ref
        self._scanned = 0  # the recaptured subject is read up to this samples-stream sequence
        self._scan_lock = asyncio.Lock()
        self._quiet_until = 0.0  # monotonic: no new requests before (a request went unanswered)

    def _add(self, seq: int, ref: SampleRef) -> None:
        found = self._known.setdefault(ref.sample_id, {})
        if seq not in found:
            found[seq] = ref
            self._quiet_until = 0.0  # capture answers again

    async def known(self, sample_id: str) -> list[SampleRef]:
        """Every re-captured SampleRef of ``sample_id`` in the log so far, oldest first."""
        async with self._scan_lock:
            start = self._scanned + 1
            async for seq, ref in self.bus.read_log(
                self._stream, self.subjects.recaptured, SampleRef, start
            ):
                self._add(seq, ref)
                self._scanned = max(self._scanned, seq)
        found = self._known.get(sample_id, {})
        return [found[seq] for seq in sorted(found)]

    async def request(self, ref: SampleRef, attempt: int) -> SampleRef:
        """Ask for ``ref``'s prompt to be captured again (the ``attempt``-th time) and wait for
        the new SampleRef. Call ``known`` first: the wait starts where its scan stopped."""
        task = await self.bus.prompt_task(self.run_id, ref.prompt_id)
        if task is None:
            raise RecaptureError(f"prompt {ref.prompt_id!r} is not in the prompt log")
        quiet = self._quiet_until - time.monotonic()
        if quiet > 0:
            raise RecaptureError(
                f"an earlier re-capture request went unanswered for {self.timeout_s:g}s; not "
                f"asking again for another {quiet:.0f}s"
            )
        async with self._scan_lock:
            start = self._scanned + 1
            found = self._known.get(ref.sample_id, {})
        if len(found) >= attempt:  # answered since the caller's scan (an earlier request)
            return found[max(found)]
        request = msgspec.structs.replace(task, recapture=True, attempt=attempt)
        await self.bus.publish(self.subjects.recapture_prompts, request,
                               msg_id=f"recapture:{ref.sample_id}:{attempt}")  # fmt: skip
        self.log.warning("features missing: prompt sent to capture again",
                         sample_id=ref.sample_id, prompt_id=ref.prompt_id,
                         attempt=attempt)  # fmt: skip
        waiting = asyncio.create_task(self._follow(ref.sample_id, start))
        started = time.monotonic()
        try:
            while True:
                left = self.timeout_s - (time.monotonic() - started)
                if left <= 0:
                    self._quiet_until = time.monotonic() + self.timeout_s
                    raise RecaptureError(
                        f"no re-captured SampleRef of {ref.sample_id} within {self.timeout_s:g}s "
                        "(is a capture worker running for this run?)"
                    )
                done, _ = await asyncio.wait({waiting}, timeout=min(left, self.wait_log_every_s))
                if done:
                    new = waiting.result()
                    self.log.info("sample re-captured", sample_id=ref.sample_id, attempt=attempt,
                                  waited_s=round(time.monotonic() - started, 2))  # fmt: skip
                    return new
                self.log.info("waiting for a re-captured sample", sample_id=ref.sample_id,
                              waited_s=round(time.monotonic() - started, 1))  # fmt: skip
        finally:
            await cancel_and_wait(waiting)

    async def _follow(self, sample_id: str, start: int) -> SampleRef:
        reader = self.bus.read_log(self._stream, self.subjects.recaptured, SampleRef, start,
                                   follow=True, idle_timeout=1.0)  # fmt: skip
        async with contextlib.aclosing(reader) as records:
            async for seq, ref in records:
                self._add(seq, ref)
                if ref.sample_id == sample_id:
                    return ref
        raise RecaptureError("the recaptured log ended while following it")  # follow never ends
