"""Real speculative decoding (batch size 1): an HF target verifies chains drafted by EAGLE-3.

Public API (all functions run under ``torch.inference_mode()``; prompts are token-id lists):

* ``speculative_generate(engine, draft, prompt, *, num_draft_tokens, max_new_tokens,
  temperature=0.0, seed=None, stop_token_ids=None) -> SpeculativeResult`` — one prompt.
* ``target_generate(engine, prompt, *, max_new_tokens, ...) -> TargetDecodeResult`` — the same
  KV-cache loop without a draft: the timing baseline (and a greedy reference).
* ``evaluate_speculative(engine, draft, prompts, *, num_draft_tokens, max_new_tokens,
  temperature=0.0, seed=None, stop_token_ids=None, check_lossless=True) -> SpeculativeReport`` —
  many prompts, metrics aggregated; at temperature 0 every output is compared token for token
  with ``engine.generate(..., temperature=0)`` (an independent implementation: HF generate) and
  the first difference raises ``LosslessnessError``.
* ``greedy_accept`` / ``speculative_accept`` — the acceptance rules, exposed for tests.

One round (``k = num_draft_tokens``; the target KV cache holds every token but the last one
emitted, ``x``; the draft's step-0 cache holds every position whose next token is known):

1. draft: ``IncrementalDraft.extend`` with the positions accepted last round, then ``k`` chain
   steps from the last position propose ``d_1..d_k`` (argmax at temperature 0, else sampled from
   the temperature-scaled draft distribution ``q``, draft vocab mapped to target ids by ``d2t``);
2. verify: one target forward over ``[x, d_1..d_k]`` with the KV cache gives the target
   distributions ``p`` at the k+1 positions and their aux hidden states;
3. accept: temperature 0 accepts while the target argmax equals the draft token and then emits
   the target's own token (the correction, or the bonus after all k); temperature > 0 is
   speculative sampling (Leviathan et al. 2023, Chen et al. 2023): accept ``d_i`` with
   probability ``min(1, p(d_i)/q(d_i))``, on rejection sample ``normalize(max(0, p - q))``,
   after all k sample the bonus from ``p``. ``p`` and ``q`` are over the full target vocab
   (``q`` is 0 outside the draft vocab), so the output is distributed exactly as the target's;
4. crop the target cache to the accepted tokens; their aux states (next tokens: the accepted
   drafts and the emitted target token) extend the draft cache at the start of the next round.

Near ``max_new_tokens`` a round drafts only ``remaining - 1`` tokens (nothing it could emit is
drafted). Output stops at ``max_new_tokens`` or after the first stop token (kept), exactly as
``HFTargetEngine.generate`` cuts its rows; stop tokens default to ``engine.info.eos_token_ids``.

Metric conventions (``docs/eagle3.md``, "Acceptance length: simulated vs serving"):

* **serving acceptance length** = tokens emitted per verification step, the target's own token
  included (the bonus), counted after the stop/max cut. The first token, which the prefill
  forward emits, is not a verification step and is not counted: ``(len(tokens) - 1) / steps``.
  It is comparable to ``1 + simulated acceptance length`` of the offline metrics.
* **per-position acceptance** ``[j]`` = P(draft position j accepted | positions < j accepted),
  over the rounds that drafted position j and reached it.
* draft seconds / target seconds per verification step; ``prefill_seconds`` covers the target
  prefill and the draft's step 0 over the prompt; ``wall_seconds`` everything.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from specforge_common.log import get_logger
from specforge_common.models.eagle3 import Eagle3Draft
from specforge_common.targets.hf import HFTargetEngine

from .draft_cache import IncrementalDraft

__all__ = [
    "LosslessnessError",
    "SpeculativeReport",
    "SpeculativeResult",
    "TargetDecodeResult",
    "evaluate_speculative",
    "first_difference",
    "greedy_accept",
    "greedy_references",
    "speculative_accept",
    "speculative_generate",
    "target_generate",
]

log = get_logger(component="evaluator.speculative")


class LosslessnessError(AssertionError):
    """Greedy speculative output differs from the target's own greedy output."""

    def __init__(
        self, prompt_index: int, position: int, expected: int | None, got: int | None
    ) -> None:
        self.prompt_index, self.position = prompt_index, position
        self.expected, self.got = expected, got
        super().__init__(
            f"speculative decoding is not lossless on prompt {prompt_index}: first difference at "
            f"generated position {position}: target greedy token {expected}, speculative token "
            f"{got} (None = output ended)"
        )


# --- results -------------------------------------------------------------------------------


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


# --- acceptance rules ----------------------------------------------------------------------


def greedy_accept(target_argmax: Tensor, draft_tokens: Sequence[int]) -> tuple[int, int]:
    """``target_argmax`` ``[k+1]`` at ``[x, d_1..d_k]``: accept the longest prefix of drafts the
    target predicts itself; return (accepted count, the target's token after it)."""
    k = len(draft_tokens)
    predicted = target_argmax.tolist()
    accepted = 0
    while accepted < k and predicted[accepted] == draft_tokens[accepted]:
        accepted += 1
    return accepted, int(predicted[accepted])


def _sample(probs: Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def speculative_accept(
    p: Tensor, q: Tensor, draft_tokens: Sequence[int], generator: torch.Generator
) -> tuple[int, int]:
    """Speculative sampling. ``p`` ``[k+1, V]`` target distributions at ``[x, d_1..d_k]``, ``q``
    ``[k, V]`` the draft distributions each ``d_i`` was sampled from (full target vocab).
    Returns (accepted count, the next token: residual sample on rejection, else the bonus)."""
    k = len(draft_tokens)
    for i, token in enumerate(draft_tokens):
        u = torch.rand((), generator=generator, device=p.device)
        if bool(u * q[i, token] < p[i, token]):  # probability min(1, p/q); q(d_i) > 0
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: rejection is then impossible
            residual = p[i]
        return i, _sample(residual, generator)
    return k, _sample(p[k], generator)


# --- the target with a KV cache ------------------------------------------------------------


class _TargetSession:
    """An HF CausalLM decoding one sequence with a ``DynamicCache``; optionally captures the aux
    layer outputs (hooks, as ``HFTargetEngine.capture`` does: id N-1 = post-norm final state)."""

    def __init__(self, engine: HFTargetEngine, *, with_aux: bool) -> None:
        from transformers import DynamicCache

        self.engine = engine
        self.model = engine.model
        self.cache = DynamicCache(config=self.model.config)
        self.with_aux = with_aux
        self._aux: list[Tensor | None] = [None, None, None]
        self._handles: list[Any] = []

    def __enter__(self) -> _TargetSession:
        if self.with_aux:
            last = self.engine.info.num_layers - 1
            for slot, layer in enumerate(self.engine.aux_layer_ids):
                module = self.engine.base if layer == last else self.engine.layers[layer]
                self._handles.append(module.register_forward_hook(self._grab(slot)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _grab(self, slot: int):
        def hook(_module: Any, _args: Any, output: Any) -> None:
            state = getattr(output, "last_hidden_state", None)
            if state is None:
                state = output[0] if isinstance(output, (tuple, list)) else output
            self._aux[slot] = state

        return hook

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def forward(self, ids: Tensor, *, logits_to_keep: int = 0) -> tuple[Tensor, Tensor | None]:
        """Append ``ids`` ``[n]``: fp32 logits ``[n or logits_to_keep, V]`` and aux ``[n, 3H]``."""
        out = self.model(
            input_ids=ids.to(self.engine.device)[None],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        aux = None
        if self.with_aux:
            aux = torch.cat([a[0] for a in self._aux if a is not None], dim=-1)
            self._aux = [None, None, None]
        return out.logits[0].float(), aux

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            self.cache.crop(-tokens_to_remove)


# --- decoding loops ------------------------------------------------------------------------


class _Clock:
    """Wall time that waits for queued GPU work, so per-phase seconds are real."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _prompt_tensor(prompt: Sequence[int] | Tensor, device: torch.device) -> Tensor:
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("the prompt needs at least one token")
    return ids


def _check_args(max_new_tokens: int, temperature: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


def _choose(logits: Tensor, temperature: float, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    return _sample(torch.softmax(logits / temperature, dim=-1), generator)


def _stops(engine: HFTargetEngine, stop_token_ids: Sequence[int] | None) -> set[int]:
    return set(engine.info.eos_token_ids if stop_token_ids is None else stop_token_ids)


def _cut_at_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens


@torch.inference_mode()
def target_generate(
    engine: HFTargetEngine,
    prompt: Sequence[int] | Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> TargetDecodeResult:
    """Plain decoding with the same cache path as ``speculative_generate``, one token a step."""
    _check_args(max_new_tokens, temperature)
    clock, stops = _Clock(engine.device), _stops(engine, stop_token_ids)
    generator = _generator(engine.device, seed)
    ids = _prompt_tensor(prompt, engine.device)
    started = clock()
    with _TargetSession(engine, with_aux=False) as target:
        logits, _ = target.forward(ids, logits_to_keep=1)
        tokens = [_choose(logits[-1], temperature, generator)]
        result = TargetDecodeResult(tokens, prefill_seconds=clock() - started)
        while len(tokens) < max_new_tokens and tokens[-1] not in stops:
            t0 = clock()
            logits, _ = target.forward(torch.tensor([tokens[-1]], device=engine.device))
            tokens.append(_choose(logits[-1], temperature, generator))
            result.step_seconds.append(clock() - t0)
    result.wall_seconds = clock() - started
    return result


def _propose(
    draft: IncrementalDraft,
    hidden: Tensor,
    k: int,
    temperature: float,
    generator: torch.Generator,
    draft_vocab_ids: Tensor,
    vocab_size: int,
) -> tuple[list[int], Tensor | None]:
    """Draft ``k`` tokens from the step-0 output ``hidden`` of the last accepted position.
    Returns target ids and, when sampling, their distributions over the full target vocab."""
    tokens: list[int] = []
    q_rows: list[Tensor] = []
    for j in range(k):
        if j > 0:
            hidden = draft.chain_step(tokens[-1], hidden, j)
        logits = draft.draft.compute_logits(hidden).float()  # [V_d]
        if temperature == 0:
            index = int(logits.argmax())
        else:
            q = torch.softmax(logits / temperature, dim=-1)
            index = _sample(q, generator)
            q_rows.append(q)
        tokens.append(int(draft_vocab_ids[index]))
    if not q_rows:
        return tokens, None
    q_full = torch.zeros(len(q_rows), vocab_size, device=draft_vocab_ids.device)
    q_full[:, draft_vocab_ids] = torch.stack(q_rows).to(q_full.device)
    return tokens, q_full


@torch.inference_mode()
def speculative_generate(
    engine: HFTargetEngine,
    draft: Eagle3Draft,
    prompt: Sequence[int] | Tensor,
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> SpeculativeResult:
    """Decode ``prompt`` with ``draft`` proposing ``num_draft_tokens`` per verification step."""
    _check_args(max_new_tokens, temperature)
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if draft.config.vocab_size != engine.info.vocab_size:
        raise ValueError(
            f"draft target vocab {draft.config.vocab_size} != target vocab {engine.info.vocab_size}"
        )
    device, k = engine.device, num_draft_tokens
    clock, stops = _Clock(device), _stops(engine, stop_token_ids)
    generator = _generator(device, seed)
    ids = _prompt_tensor(prompt, device)
    draft_vocab_ids = draft.draft_to_target(
        torch.arange(draft.config.draft_vocab_size, device=draft.d2t.device)
    ).to(device)
    incremental = IncrementalDraft(draft)

    started = clock()
    with _TargetSession(engine, with_aux=True) as target:
        logits, aux = target.forward(ids, logits_to_keep=1)
        assert aux is not None
        tokens = [_choose(logits[-1], temperature, generator)]
        result = SpeculativeResult(tokens, num_draft_tokens=k)
        hidden = incremental.extend(aux, torch.cat([ids[1:], torch.tensor(tokens, device=device)]))
        hidden = hidden[-1]  # step-0 output at the last prompt position: drafts token n+1
        result.prefill_seconds = clock() - started
        # Positions accepted by the last round (aux states, next tokens), not yet in the draft.
        aux_new: Tensor | None = None
        next_new: Tensor | None = None

        while len(tokens) < max_new_tokens and tokens[-1] not in stops:
            t0 = clock()
            if aux_new is not None and next_new is not None:
                hidden = incremental.extend(aux_new, next_new)[-1]
            k_round = min(k, max_new_tokens - len(tokens) - 1)
            drafted, q = _propose(incremental, hidden, k_round, temperature, generator,
                                  draft_vocab_ids, engine.info.vocab_size)  # fmt: skip
            incremental.clear_chain()
            t1 = clock()

            verify = torch.tensor([tokens[-1], *drafted], device=device)
            logits, aux = target.forward(verify)
            assert aux is not None
            if temperature == 0:
                accepted, nxt = greedy_accept(logits.argmax(dim=-1), drafted)
            else:
                p = torch.softmax(logits / temperature, dim=-1)
                q = q if q is not None else p.new_zeros(0, p.shape[-1])  # k_round == 0
                accepted, nxt = speculative_accept(p, q, drafted, generator)
            target.crop(k_round - accepted)
            new = [*drafted[:accepted], nxt]
            emitted = _cut_at_stop(new, stops)
            tokens.extend(emitted)
            aux_new = aux[: accepted + 1]
            next_new = torch.tensor(new, device=device)
            t2 = clock()

            result.drafted.append(k_round)
            result.accepted.append(accepted)
            result.emitted.append(len(emitted))
            result.draft_seconds.append(t1 - t0)
            result.target_seconds.append(t2 - t1)
    result.wall_seconds = clock() - started
    return result


def first_difference(expected: Sequence[int], got: Sequence[int]) -> int | None:
    """Index of the first position where the two differ (a missing token counts), else None."""
    for i in range(max(len(expected), len(got))):
        a = expected[i] if i < len(expected) else None
        b = got[i] if i < len(got) else None
        if a != b:
            return i
    return None


def greedy_references(
    engine: HFTargetEngine,
    prompts: Sequence[Sequence[int] | Tensor],
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """The target's own greedy continuation of each prompt, by ``engine.generate`` (HF's
    generate: an implementation independent of this module's loop)."""
    out = []
    for prompt in prompts:
        ids = _prompt_tensor(prompt, engine.device)[None]
        out.append(list(engine.generate(
            ids, torch.ones_like(ids), max_new_tokens=max_new_tokens, temperature=0.0,
            stop_token_ids=stop_token_ids,
        )[0]))  # fmt: skip
    return out


def evaluate_speculative(
    engine: HFTargetEngine,
    draft: Eagle3Draft,
    prompts: Sequence[Sequence[int] | Tensor],
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    check_lossless: bool = True,
    references: Sequence[Sequence[int]] | None = None,
) -> SpeculativeReport:
    """Speculative decoding over ``prompts``; at temperature 0 (and ``check_lossless``) each
    output must equal ``engine.generate``'s greedy output, else ``LosslessnessError``.
    ``references`` are those greedy outputs computed earlier (``greedy_references``), for a
    caller that checks many drafts against one target.

    Prompt ``i`` samples with seed ``seed + i`` (when a seed is given), so results do not depend
    on which prompts ran before.
    """
    results: list[SpeculativeResult] = []
    checking = check_lossless and temperature == 0
    for index, prompt in enumerate(prompts):
        result = speculative_generate(
            engine, draft, prompt, num_draft_tokens=num_draft_tokens,
            max_new_tokens=max_new_tokens, temperature=temperature,
            seed=None if seed is None else seed + index, stop_token_ids=stop_token_ids,
        )  # fmt: skip
        if checking:
            expected = (
                list(references[index]) if references is not None else greedy_references(
                    engine, [prompt], max_new_tokens=max_new_tokens,
                    stop_token_ids=stop_token_ids)[0]
            )  # fmt: skip
            position = first_difference(expected, result.tokens)
            if position is not None:
                raise LosslessnessError(
                    index,
                    position,
                    expected[position] if position < len(expected) else None,
                    result.tokens[position] if position < len(result.tokens) else None,
                )
        results.append(result)
    report = SpeculativeReport(
        num_draft_tokens, temperature, results, lossless=True if checking else None
    )
    log.info(
        "speculative decoding evaluated",
        prompts=len(results),
        k=num_draft_tokens,
        temperature=temperature,
        serving_acceptance_length=report.acceptance_length,
        lossless=report.lossless,
    )
    return report
