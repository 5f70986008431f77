"""Real speculative decoding (batch size 1): an HF target verifies chains drafted by EAGLE-3.

Public API (all functions run under ``torch.inference_mode()``; prompts are token-id lists):

* ``evaluate_speculative(engine, draft, prompts, *, num_draft_tokens, max_new_tokens,
  temperature=0.0, seed=None, stop_token_ids=None, check_lossless=True) -> SpeculativeReport`` —
  many prompts, metrics aggregated; at temperature 0 every output is compared token for token
  with ``engine.generate(..., temperature=0)`` (an independent implementation: HF generate) and
  the first difference raises ``LosslessnessError``.
* ``speculative_generate(engine, draft, prompt, *, num_draft_tokens, max_new_tokens,
  temperature=0.0, seed=None, stop_token_ids=None) -> SpeculativeResult`` — one prompt.
* ``target_generate(engine, prompt, *, max_new_tokens, ...) -> TargetDecodeResult`` — the same
  KV-cache loop without a draft: the timing baseline (and a greedy reference).
* ``greedy_references`` — the target's greedy outputs, computed once for a caller that checks
  many drafts; ``first_difference`` — where two outputs part.

The acceptance rules are ``acceptance.py``'s, the results and their metric conventions
``decode_results.py``'s, the target with its KV cache ``target_session.py``'s.

One round (``k = num_draft_tokens``; the target KV cache holds every token but the last one
emitted, ``x``; the draft's step-0 cache holds every position whose next token is known):

1. draft: ``IncrementalDraft.extend`` with the positions accepted last round, then ``k`` chain
   steps from the last position propose ``d_1..d_k`` (argmax at temperature 0, else sampled from
   the temperature-scaled draft distribution ``q``, draft vocab mapped to target ids by ``d2t``);
2. verify: one target forward over ``[x, d_1..d_k]`` with the KV cache gives the target
   distributions ``p`` at the k+1 positions and their aux hidden states;
3. accept: ``greedy_accept`` at temperature 0, ``speculative_accept`` (speculative sampling,
   which keeps the target's distribution) above it; either accepts a prefix of the drafts and
   adds one token of the target's (the correction, or the bonus after all k);
4. crop the target cache to the accepted tokens; their aux states (next tokens: the accepted
   drafts and the emitted target token) extend the draft cache at the start of the next round.

Near ``max_new_tokens`` a round drafts only ``remaining - 1`` tokens (nothing it could emit is
drafted). Output stops at ``max_new_tokens`` or after the first stop token (kept), exactly as
``HFTargetEngine.generate`` cuts its rows; stop tokens default to ``engine.info.eos_token_ids``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from specforge_common.log import get_logger
from specforge_common.models.dflash import DFlashDraft
from specforge_common.models.eagle3 import Eagle3Draft
from specforge_common.targets.hf import HFTargetEngine

from .acceptance import greedy_accept, sample, speculative_accept
from .decode_results import SpeculativeReport, SpeculativeResult, TargetDecodeResult
from .draft_cache import IncrementalDraft
from .target_session import TargetSession

__all__ = [
    "LosslessnessError",
    "evaluate_speculative",
    "first_difference",
    "greedy_references",
    "speculative_generate",
    "target_generate",
]

log = get_logger(component="evaluator.speculative")


# --- many prompts, checked against the target ----------------------------------------------


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


def evaluate_speculative(
    engine: HFTargetEngine,
    draft: Eagle3Draft | DFlashDraft,
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


def first_difference(expected: Sequence[int], got: Sequence[int]) -> int | None:
    """Index of the first position where the two differ (a missing token counts), else None."""
    for i in range(max(len(expected), len(got))):
        a = expected[i] if i < len(expected) else None
        b = got[i] if i < len(got) else None
        if a != b:
            return i
    return None


# --- decoding loops ------------------------------------------------------------------------


@torch.inference_mode()
def speculative_generate(
    engine: HFTargetEngine,
    draft: Eagle3Draft | DFlashDraft,
    prompt: Sequence[int] | Tensor,
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> SpeculativeResult:
    """Decode ``prompt`` with ``draft`` proposing ``num_draft_tokens`` per verification step (a
    block drafter: ``block_speculative.block_speculative_generate``)."""
    if isinstance(draft, DFlashDraft):
        from .block_speculative import block_speculative_generate  # it imports this module

        return block_speculative_generate(
            engine, draft, prompt, num_draft_tokens=num_draft_tokens,
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
            stop_token_ids=stop_token_ids,
        )  # fmt: skip
    _check_args(max_new_tokens, temperature)
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if draft.config.vocab_size != engine.info.vocab_size:
        raise ValueError(
            f"draft target vocab {draft.config.vocab_size} != target vocab {engine.info.vocab_size}"
        )
    device, k = engine.device, num_draft_tokens
    clock, stops, generator, ids = _start(engine, prompt, seed, stop_token_ids)
    draft_vocab_ids = draft.draft_to_target(
        torch.arange(draft.config.draft_vocab_size, device=draft.d2t.device)
    ).to(device)
    incremental = IncrementalDraft(draft)

    started = clock()
    with TargetSession(engine, with_aux=True) as target:
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

            accepted, nxt, aux = verify_round(target, tokens[-1], drafted, q, temperature,
                                              generator)  # fmt: skip
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


def verify_round(
    target: TargetSession,
    last: int,
    drafted: list[int],
    q: Tensor | None,
    temperature: float,
    generator: torch.Generator,
) -> tuple[int, int, Tensor]:
    """One target forward over ``[last, *drafted]``, the acceptance rule, the cache cropped to
    what was accepted: (accepted drafts, the target's next token, the captured layers)."""
    logits, layers = target.forward(torch.tensor([last, *drafted], device=target.engine.device))
    assert layers is not None
    if temperature == 0:
        accepted, nxt = greedy_accept(logits.argmax(dim=-1), drafted)
    else:
        p = torch.softmax(logits / temperature, dim=-1)
        q = q if q is not None else p.new_zeros(0, p.shape[-1])  # nothing drafted
        accepted, nxt = speculative_accept(p, q, drafted, generator)
    target.crop(len(drafted) - accepted)
    return accepted, nxt, layers


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
            index = sample(q, generator)
            q_rows.append(q)
        tokens.append(int(draft_vocab_ids[index]))
    if not q_rows:
        return tokens, None
    q_full = torch.zeros(len(q_rows), vocab_size, device=draft_vocab_ids.device)
    q_full[:, draft_vocab_ids] = torch.stack(q_rows).to(q_full.device)
    return tokens, q_full


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
    clock, stops, generator, ids = _start(engine, prompt, seed, stop_token_ids)
    started = clock()
    with TargetSession(engine, with_aux=False) as target:
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


# --- decoding helpers ----------------------------------------------------------------------


def _check_args(max_new_tokens: int, temperature: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


def _start(
    engine: HFTargetEngine,
    prompt: Sequence[int] | Tensor,
    seed: int | None,
    stop_token_ids: Sequence[int] | None,
) -> tuple[_Clock, set[int], torch.Generator, Tensor]:
    """What both loops need before the prefill: clock, stop tokens, RNG and the prompt ids."""
    stops = set(engine.info.eos_token_ids if stop_token_ids is None else stop_token_ids)
    generator = _generator(engine.device, seed)
    return _Clock(engine.device), stops, generator, _prompt_tensor(prompt, engine.device)


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


def _choose(logits: Tensor, temperature: float, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    return sample(torch.softmax(logits / temperature, dim=-1), generator)


def _cut_at_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens
