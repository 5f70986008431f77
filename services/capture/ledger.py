"""A worker's bookkeeping, shared by the stages that settle prompts: what it counted
(``CaptureStats``, returned by ``CaptureWorker.run`` and logged as progress) and what it holds
(``Held``: deliveries fetched and not yet settled, which the ack heartbeat keeps alive)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from specforge_common.bus import Delivery
from specforge_common.contracts import SPLITS, PromptTask
from specforge_common.progress import Figure


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
    store_bytes: int = 0  # feature bytes written to the store
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

    def figures(self, prompts_total: int | None = None) -> list[Figure]:
        """What a live progress bar shows of this worker; ``prompts_total``: the run's prompts
        (shared by every worker of the run), when known."""
        return [
            Figure("prompts", self.prompts_captured, total=prompts_total, lead=True),
            Figure("tokens", self.tokens),
            Figure("dead-lettered", self.dead_lettered or None),
        ]


class Held:
    """Deliveries fetched and not yet settled (acked, naked or dead-lettered). Calling it lists
    them, which is what ``specforge_common.bus.heartbeat`` asks for."""

    def __init__(self) -> None:
        self._by_id: dict[int, Delivery[PromptTask]] = {}

    def __call__(self) -> list[Delivery[PromptTask]]:
        return list(self._by_id.values())

    def hold(self, deliveries: list[Delivery[PromptTask]]) -> None:
        for delivery in deliveries:
            self._by_id[id(delivery)] = delivery

    def release(self, delivery: Delivery[PromptTask]) -> None:
        self._by_id.pop(id(delivery), None)
