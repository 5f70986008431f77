"""Serving metrics of a draft: real speculative decoding on a fixed prompt set, per checkpoint.

``ServingEval`` holds the frozen target and the prompts. ``prepare`` computes once what does
not depend on the draft: the target's own greedy continuations (the losslessness reference, at
temperature 0) and a plain target-only decode of the same prompts (the speedup baseline,
measured in this process on the same device). ``evaluate(draft)`` then decodes every prompt
speculatively and returns the EvalResult fields:

- ``serving_acceptance_length``: tokens emitted per target verification, bonus token included;
- ``serving_acceptance_rates``: P(draft position j accepted | positions < j accepted);
- ``lossless``: at temperature 0, whether every output equals the target's greedy output. A
  difference is not an exception here: the result says ``lossless=False`` and names the prompt
  and first differing position in ``metrics``, and the error is logged (a checkpoint must not
  be silently dropped, and the next one is still evaluated);
- ``metrics``: ``k``, ``temperature``, ``draft_ms_per_step``, ``target_ms_per_step``,
  ``tokens_per_s_spec``, ``tokens_per_s_target`` and ``speedup`` (their ratio), and the four
  terms of the speedup bound ``AL x t_plain / (t_verify(k+1) + k x t_draft)`` with it:
  ``plain_step_ms`` (the baseline decode's wall / its tokens), ``verify_ms_per_step`` (one
  verification forward of k+1 tokens, as ``target_ms_per_step``), ``draft_ms_per_token`` (draft
  time / drafted tokens), ``ideal_speedup`` and ``speedup_vs_ideal`` (measured / ideal). A
  speedup below 1 then says which term is to blame: too few tokens accepted, a verification
  much dearer than a plain step, or a draft step too slow for its k.

Prompts come from captured eval samples (``prompts_from_samples``: the tokens before the first
supervised one, i.e. the conversation up to the assistant's reply) or from a dataset file
(``prompts_from_source``, for the standalone ``specforge evaluate --draft``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from specforge_common.log import get_logger
from specforge_common.models.eagle3 import Eagle3Draft
from specforge_common.targets.hf import HFTargetEngine

from .decode_results import ideal_speedup
from .speculative import (
    LosslessnessError,
    evaluate_speculative,
    greedy_references,
    target_generate,
)

__all__ = ["ServingEval", "ServingOutcome", "prompts_from_samples", "prompts_from_source"]

log = get_logger(component="evaluator.serving")


def prompts_from_samples(samples: Sequence[Mapping[str, Tensor]], limit: int) -> list[list[int]]:
    """The prompt of each captured sample (ids before its first loss-masked token), up to
    ``limit``; samples supervised from their first token have no prompt and are skipped."""
    prompts: list[list[int]] = []
    for sample in samples:
        if len(prompts) >= limit:
            break
        supervised = torch.nonzero(sample["loss_mask"]).flatten()
        if supervised.numel() == 0 or int(supervised[0]) == 0:
            continue
        prompts.append([int(t) for t in sample["input_ids"][: int(supervised[0])]])
    return prompts


def prompts_from_source(
    source: str,
    tokenizer: Any,
    limit: int,
    *,
    chat_template: str = "",
    max_length: int = 2048,
    records: int | None = None,
    keep: Callable[[str], bool] | None = None,
) -> list[list[int]]:
    """Prompts from a dataset file (any format ``specforge enqueue`` reads): the templated
    conversation before its first assistant turn, or a pre-tokenized record's ids before its
    first loss-masked token. Records that yield no prompt are skipped with a log line.

    ``records`` reads only the source's first records (a run's ``--limit``) and ``keep`` picks
    records by id, so a caller can rebuild exactly one split of a run, e.g. its held-out eval
    prompts (``keep=lambda id: split_of(id, spec.eval_fraction, spec.seed) == "eval"``)."""
    from specforge_common.data.chat import ChatTemplateError, generation_prompt_ids
    from specforge_common.data.sources import BadRecord, read_conversations

    prompts: list[list[int]] = []
    for record in read_conversations(source, records):
        if len(prompts) >= limit:
            break
        if isinstance(record, BadRecord):
            log.warning("bad record skipped", line=record.line, reason=record.reason)
            continue
        if keep is not None and not keep(record.id):
            continue
        if record.pretokenized:
            mask = record.loss_mask or []
            first = next((i for i, m in enumerate(mask) if m), 0)
            ids = list(record.input_ids or [])[:first]
        else:
            try:
                ids = generation_prompt_ids(tokenizer, record.messages or [],
                                            chat_template=chat_template)  # fmt: skip
            except ChatTemplateError as exc:
                log.warning("record without a prompt skipped", id=record.id, reason=str(exc))
                continue
        if not ids or len(ids) > max_length:
            log.warning("record skipped: empty or longer than max_length", id=record.id,
                        tokens=len(ids), max_length=max_length)  # fmt: skip
            continue
        prompts.append(ids)
    return prompts


@dataclass
class ServingOutcome:
    """What ``evaluate`` measured, as EvalResult fields (``as_fields``)."""

    acceptance_length: float | None
    acceptance_rates: list[float]
    lossless: bool | None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None  # the losslessness failure, for logs and reports

    def as_fields(self) -> dict[str, Any]:
        return {
            "serving_acceptance_length": self.acceptance_length,
            "serving_acceptance_rates": self.acceptance_rates,
            "lossless": self.lossless,
        }


class ServingEval:
    """Speculative decoding of one prompt set with one target, for any number of drafts."""

    def __init__(
        self,
        engine: HFTargetEngine,
        prompts: Sequence[Sequence[int]],
        *,
        num_draft_tokens: int,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> None:
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.engine, self.prompts = engine, [list(p) for p in prompts]
        self.k, self.max_new_tokens = num_draft_tokens, max_new_tokens
        self.temperature, self.seed = temperature, seed
        self.references: list[list[int]] | None = None
        self.baseline_tokens_per_s = math.nan
        self.plain_step_ms = math.nan  # the baseline's wall / tokens: one plain decode step

    def with_draft_tokens(self, num_draft_tokens: int) -> ServingEval:
        """The same prompts at another chain length, sharing what ``prepare`` measured (the
        references and the baseline do not depend on k), so comparing ks costs no second
        baseline decode and every k is measured against the same baseline."""
        other = ServingEval(self.engine, self.prompts, num_draft_tokens=num_draft_tokens,
                            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                            seed=self.seed)  # fmt: skip
        other.references = self.references
        other.baseline_tokens_per_s, other.plain_step_ms = (self.baseline_tokens_per_s,
                                                            self.plain_step_ms)  # fmt: skip
        return other

    @torch.inference_mode()
    def prepare(self) -> None:
        """The greedy references (temperature 0) and the target-only baseline speed."""
        started = time.perf_counter()
        if self.temperature == 0:
            self.references = greedy_references(self.engine, self.prompts,
                                                max_new_tokens=self.max_new_tokens)  # fmt: skip
        tokens, seconds = 0, 0.0
        for i, prompt in enumerate(self.prompts):
            result = target_generate(self.engine, prompt, max_new_tokens=self.max_new_tokens,
                                     temperature=self.temperature, seed=self.seed + i)  # fmt: skip
            tokens += len(result.tokens)
            seconds += result.wall_seconds
        self.baseline_tokens_per_s = tokens / seconds if seconds > 0 else math.nan
        self.plain_step_ms = 1e3 * seconds / tokens if seconds > 0 and tokens else math.nan
        log.info("serving baseline ready", prompts=len(self.prompts),
                 target_tokens_per_s=round(self.baseline_tokens_per_s, 2),
                 plain_step_ms=round(self.plain_step_ms, 3),
                 seconds=round(time.perf_counter() - started, 3))  # fmt: skip

    def evaluate(self, draft: Eagle3Draft) -> ServingOutcome:
        if not self.prompts:
            return ServingOutcome(None, [], None, {"serving/prompts": 0.0})
        if math.isnan(self.baseline_tokens_per_s):
            self.prepare()
        started = time.perf_counter()
        base = {"serving/prompts": float(len(self.prompts)), "serving/k": float(self.k),
                "serving/temperature": float(self.temperature),
                "serving/max_new_tokens": float(self.max_new_tokens)}  # fmt: skip
        try:
            report = evaluate_speculative(
                self.engine, draft, self.prompts, num_draft_tokens=self.k,
                max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                seed=self.seed, references=self.references,
            )  # fmt: skip
        except LosslessnessError as exc:
            log.error("LOSSLESSNESS FAILED: speculative output differs from the target's",
                      prompt=exc.prompt_index, position=exc.position,
                      expected=exc.expected, got=exc.got)  # fmt: skip
            metrics = base | {"serving/first_difference_prompt": float(exc.prompt_index),
                              "serving/first_difference_position": float(exc.position)}  # fmt: skip
            return ServingOutcome(None, [], False, metrics, time.perf_counter() - started,
                                  error=str(exc))  # fmt: skip
        steps = max(report.steps, 1)
        spec_rate = report.tokens / max(report.wall_seconds, 1e-12)
        verify_ms = 1e3 * report.target_seconds / steps
        draft_ms = 1e3 * report.draft_seconds / report.drafted if report.drafted else math.nan
        speedup = spec_rate / self.baseline_tokens_per_s
        ideal = ideal_speedup(report.acceptance_length, self.plain_step_ms, verify_ms, draft_ms,
                              self.k)  # fmt: skip
        metrics = base | {
            "k": float(self.k),
            "temperature": float(self.temperature),
            "draft_ms_per_step": 1e3 * report.draft_seconds / steps,
            "target_ms_per_step": verify_ms,
            "tokens_per_s_spec": spec_rate,
            "tokens_per_s_target": self.baseline_tokens_per_s,
            "speedup": speedup,
            "plain_step_ms": self.plain_step_ms,
            "verify_ms_per_step": verify_ms,
            "draft_ms_per_token": draft_ms,
            "ideal_speedup": ideal,
            "speedup_vs_ideal": speedup / ideal if ideal > 0 else math.nan,
            "serving/steps": float(report.steps),
            "serving/tokens": float(report.tokens),
            "serving/drafted": float(report.drafted),
        }
        rates = report.per_position_acceptance()
        return ServingOutcome(report.acceptance_length, rates, report.lossless, metrics,
                              time.perf_counter() - started)  # fmt: skip
