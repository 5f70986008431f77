"""Decode mode ("train with decode"): the target writes the first assistant reply of each
conversation itself; what a sample is made of is in ``prepare``.

Generation runs in a worker thread, in batches of ``capture.batch_size`` prompts of similar
length (longest first), and keeps the features of every token as it goes
(``TargetEngine.generate_and_capture``): a decode-mode sample needs no second forward. A sampled
prompt draws with its own seed, so its reply does not depend on its batch mates. A task that
cannot be prompted is rejected; a group whose generation fails goes to the failure policy, like
a failed forward.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from torch import Tensor

from specforge_common.bus import Delivery
from specforge_common.contracts import PromptTask, RunSpec
from specforge_common.targets import TargetEngine

from .failures import Failures
from .ledger import CaptureStats
from .metrics import CaptureMetrics
from .prepare import (
    GenerationPrompt,
    Rejected,
    decode_groups,
    decode_seed,
    generation_prompt,
    with_reply,
)

# A delivery, the token ids and loss mask of its conversation (reply included), and the features
# of those tokens: (aux hidden states [T, 3H], final hidden states [T, H]).
Replied = tuple[Delivery[PromptTask], list[int], list[int], tuple[Tensor, Tensor]]


class Decoder:
    """Has the target reply to each conversation of a fetched group."""

    def __init__(
        self,
        spec: RunSpec,
        engine: TargetEngine,
        *,
        failures: Failures,
        stats: CaptureStats,
        metrics: CaptureMetrics,
        tokenizer: Any = None,
    ) -> None:
        self.spec = spec
        self.engine = engine
        self.failures = failures
        self.stats = stats
        self.metrics = metrics
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        """The spec's tokenizer if it names one, else the target's (loaded on first use)."""
        if self._tokenizer is None:
            if self.spec.target.tokenizer:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.spec.target.tokenizer)
            else:
                self._tokenizer = self.engine.tokenizer  # type: ignore[attr-defined]
        return self._tokenizer

    async def write_replies(self, deliveries: list[Delivery[PromptTask]]) -> list[Replied]:
        """Let the target write the first assistant reply of each conversation."""
        prompts: list[tuple[Delivery[PromptTask], GenerationPrompt]] = []
        for delivery in deliveries:
            try:
                prompt = generation_prompt(delivery.record, self.tokenizer, self.spec)
            except Rejected as exc:
                await self.failures.reject(delivery, str(exc))
                continue
            prompts.append((delivery, prompt))
        if not prompts:
            return []

        started = time.perf_counter()
        out: list[Replied] = []
        capture = self.spec.capture
        lengths = [len(p.input_ids) for _, p in prompts]
        groups = decode_groups(lengths, batch_size=capture.batch_size)
        for group in ([prompts[i] for i in indices] for indices in groups):
            try:
                group_started = time.perf_counter()
                generated = await asyncio.to_thread(self._generate, group)
                self.metrics.forward(time.perf_counter() - group_started, mode="decode")
            except Exception as exc:
                await self.failures.fail([d for d, _ in group], exc, stage="generate")
                continue
            for (delivery, prompt), row in zip(group, generated, strict=True):
                ids, mask = with_reply(prompt, row.reply)
                n = len(ids)
                self.stats.generated_tokens += n - len(prompt.input_ids)
                out.append((delivery, ids, mask,
                            (row.aux_hidden_states[:n], row.hidden_states[:n])))  # fmt: skip
        self.stats.generate_s += time.perf_counter() - started
        return out

    def _generate(self, group: list[tuple[Delivery[PromptTask], GenerationPrompt]]) -> list[Any]:
        """Worker thread: the target's replies to one group of prompts, with their features."""
        capture = self.spec.capture
        seeds = [decode_seed(self.spec.seed, d.record.prompt_id) for d, _ in group]
        return self.engine.generate_and_capture(
            [p.input_ids for _, p in group],
            max_new_tokens=[p.room for _, p in group],
            temperature=capture.temperature,
            seeds=seeds if capture.temperature > 0 else None,
        )
