"""What a decode measured: per-prompt results and the many-prompt report, with their metrics.

Metric conventions (``docs/eagle3.md``, "Acceptance length: simulated vs serving"):

* **serving acceptance length** = tokens emitted per verification step, the target's own token
  included (the bonus), counted after the stop/max cut. The first token, which the prefill
  forward emits, is not a verification step and is not counted: ``(len(tokens) - 1) / steps``.
  It is comparable to ``1 + simulated acceptance length`` of the offline metrics.
* **per-position acceptance** ``[j]`` = P(draft position j accepted | positions < j accepted),
  over the rounds that drafted position j and reached it.
* draft seconds / target seconds per verification step; ``prefill_seconds`` covers the target
  prefill and the draft's step 0 over the prompt; ``wall_seconds`` everything.
* **ideal speedup** (``ideal_speedup``) = ``AL x t_plain / (t_verify + k x t_draft)``: what the
  measured acceptance length would buy if a round cost nothing but one verification of k+1
  tokens and k draft steps, against one plain target step per token. The measured speedup
  falls short of it by the prefills, the shorter last rounds and the loop's own overhead, so
  their ratio says how much of the acceptance the implementation turns into speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["SpeculativeReport", "SpeculativeResult", "TargetDecodeResult", "ideal_speedup"]


def ideal_speedup(
    acceptance_length: float, plain_ms: float, verify_ms: float, draft_ms: float, k: int
) -> float:
    """``AL x plain / (verify + k x draft)``: the speedup bound of chains of ``k`` drafts, from
    the serving acceptance length (bonus included), one plain target step, one verification
    forward of k+1 tokens and one draft step (all ms). NaN when a term is unknown or the
    denominator is not positive, so a report shows a gap rather than a made-up number."""
    terms = (acceptance_length, plain_ms, verify_ms, draft_ms)
    if any(math.isnan(t) for t in terms):
        return math.nan
    cost = verify_ms + k * draft_ms
    return acceptance_length * plain_ms / cost if cost > 0 else math.nan


def _per_position(accepted: Sequence[int], drafted: Sequence[int], k: int) -> list[float]:
    """P(position j accepted | positions < j accepted); NaN where position j was never tried."""
    rates = []
    for j in range(k):
        tried = sum(1 for a, d in zip(accepted, drafted, strict=True) if d > j and a >= j)
        hits = sum(1 for a in accepted if a > j)
        rates.append(hits / tried if tried else float("nan"))
    return rates


@dataclass
class SpeculativeResult:
    """One prompt. Lists have one entry per verification step (target forward after prefill)."""

    tokens: list[int]  # generated ids, cut after the first stop token
    num_draft_tokens: int
    drafted: list[int] = field(default_factory=list)  # draft tokens proposed (k, fewer at the end)
    accepted: list[int] = field(default_factory=list)  # of which the target accepted
    emitted: list[int] = field(default_factory=list)  # tokens appended (accepted + 1, stop-cut)
    draft_seconds: list[float] = field(default_factory=list)
    target_seconds: list[float] = field(default_factory=list)
    prefill_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.accepted)

    @property
    def acceptance_length(self) -> float:
        """Serving acceptance length (bonus included, prefill token excluded); NaN if 0 steps."""
        return sum(self.emitted) / self.steps if self.steps else float("nan")

    def per_position_acceptance(self) -> list[float]:
        return _per_position(self.accepted, self.drafted, self.num_draft_tokens)


@dataclass
class TargetDecodeResult:
    """Plain target decoding: one target forward per token after the prefill."""

    tokens: list[int]
    step_seconds: list[float] = field(default_factory=list)
    prefill_seconds: float = 0.0
    wall_seconds: float = 0.0


@dataclass
class SpeculativeReport:
    """Metrics over many prompts: counts are pooled before ratios are taken."""

    num_draft_tokens: int
    temperature: float
    results: list[SpeculativeResult]
    lossless: bool | None  # None: not checked (temperature > 0 or check_lossless=False)

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.results)

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens) for r in self.results)

    @property
    def acceptance_length(self) -> float:
        """Serving acceptance length pooled over all verification steps of all prompts."""
        steps = self.steps
        return sum(sum(r.emitted) for r in self.results) / steps if steps else float("nan")

    @property
    def drafted(self) -> int:
        """Draft tokens proposed over all rounds (k a round, fewer near ``max_new_tokens``)."""
        return sum(sum(r.drafted) for r in self.results)

    def per_position_acceptance(self) -> list[float]:
        accepted = [a for r in self.results for a in r.accepted]
        drafted = [d for r in self.results for d in r.drafted]
        return _per_position(accepted, drafted, self.num_draft_tokens)

    @property
    def draft_seconds(self) -> float:
        return sum(sum(r.draft_seconds) for r in self.results)

    @property
    def target_seconds(self) -> float:
        return sum(sum(r.target_seconds) for r in self.results)

    @property
    def prefill_seconds(self) -> float:
        return sum(r.prefill_seconds for r in self.results)

    @property
    def wall_seconds(self) -> float:
        return sum(r.wall_seconds for r in self.results)

    def summary(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        out = {
            "serving_acceptance_length": self.acceptance_length,
            "steps": float(self.steps),
            "tokens": float(self.tokens),
            "tokens_per_second": self.tokens / max(self.wall_seconds, 1e-12),
            "draft_seconds_per_step": self.draft_seconds / steps,
            "target_seconds_per_step": self.target_seconds / steps,
            "prefill_seconds": self.prefill_seconds,
            "wall_seconds": self.wall_seconds,
        }
        for j, rate in enumerate(self.per_position_acceptance()):
            out[f"serving_acceptance_rate_{j}"] = rate
        return out
