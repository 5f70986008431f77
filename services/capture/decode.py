"""Decode mode ("train with decode"): before capture, the target writes the first assistant reply
of each conversation itself; what a sample is made of is in ``prepare``.

Generation runs in a worker thread: greedy prompts in batches, longest first; sampled prompts one
at a time, each with its own seed, so a redelivery regenerates the same reply. A task that cannot
be prompted is rejected; a group whose generation fails goes to the failure policy, like a
failed forward.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from specforge_common.bus import Delivery
from specforge_common.contracts import PromptTask, RunSpec
from specforge_common.targets import TargetEngine

from .failures import Failures
from .ledger import CaptureStats
from .prepare import (
    GenerationPrompt,
    Rejected,
    decode_groups,
    decode_seed,
    generation_prompt,
    right_padded,
    with_reply,
)

# A delivery with the token ids and loss mask of its conversation, reply included.
Replied = tuple[Delivery[PromptTask], list[int], list[int]]


class Decoder:
    """Has the target reply to each conversation of a fetched group."""

    def __init__(
        self,
        spec: RunSpec,
        engine: TargetEngine,
        *,
        failures: Failures,
        stats: CaptureStats,
        tokenizer: Any = None,
    ) -> None:
        self.spec = spec
        self.engine = engine
        self.failures = failures
        self.stats = stats
        self._tokenizer = tokenizer
        self._pad_id = engine.info.pad_token_id or 0

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
        groups = decode_groups(
            lengths, temperature=capture.temperature, batch_size=capture.batch_size
        )
        for group in ([prompts[i] for i in indices] for indices in groups):
            try:
                replies = await asyncio.to_thread(self._generate, group)
            except Exception as exc:
                await self.failures.fail([d for d, _ in group], exc, stage="generate")
                continue
            for (delivery, prompt), reply in zip(group, replies, strict=True):
                ids, mask = with_reply(prompt, reply)
                self.stats.generated_tokens += len(ids) - len(prompt.input_ids)
                out.append((delivery, ids, mask))
        self.stats.generate_s += time.perf_counter() - started
        return out

    def _generate(
        self, group: list[tuple[Delivery[PromptTask], GenerationPrompt]]
    ) -> list[list[int]]:
        """Worker thread: the target's replies to one group of prompts."""
        capture = self.spec.capture
        ids, mask = right_padded([p.input_ids for _, p in group], self._pad_id)
        seed = None
        if capture.temperature > 0:
            seed = decode_seed(self.spec.seed, group[0][0].record.prompt_id)
        return self.engine.generate(
            ids,
            mask,
            max_new_tokens=max(p.room for _, p in group),
            temperature=capture.temperature,
            seed=seed,
        )
