"""Speculative decoding vs plain target decoding (tokens/s), batch size 1, greedy, on CPU.

Target: the permutation Llama of ``tests/evaluator/perfect_draft.py`` (``TARGET`` below: every
layer still does all its matmuls, so it costs what any Llama of that shape costs), whose greedy
next token is a known permutation. Drafts (one EAGLE-3 layer of the target's width):

- **perfect**: predicts the target exactly, so every round accepts all k drafts (serving
  acceptance length k+1): the upper bound of the speedup for this target/draft cost ratio;
- **random**: a randomly initialised draft, accepted ~never (acceptance length ~1): the lower
  bound, i.e. what drafting costs when it buys nothing.

Baseline: ``target_generate`` (the same KV-cache loop, one target forward per token), measured in
the same run. Each case decodes ``PROMPTS`` prompts of ``PROMPT_LEN`` random ids for
``NEW_TOKENS`` tokens; tokens/s = generated tokens / wall (prefill included). ``REPS``
interleaved repetitions, best one counts. Greedy outputs are checked equal to the baseline's.
"""

from __future__ import annotations

import time

import torch

from bench.report import BenchReport

TARGET = dict(vocab_size=256, hidden_size=256, num_layers=16, intermediate_size=512, num_heads=4,
              num_kv_heads=2)  # fmt: skip
PROMPTS, PROMPT_LEN, NEW_TOKENS = 4, 32, 64
KS = (3, 5)
REPS = 3
THREADS = 1  # a tiny model decodes fastest single-threaded (per-op overhead dominates)


def random_draft_like(perfect):
    """A random draft with the perfect draft's config, target embedding and identity map."""
    from specforge_common.models.eagle3 import Eagle3Draft

    torch.manual_seed(1)
    draft = Eagle3Draft(perfect.config).float().eval()
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(perfect.embed_tokens.weight)
        draft.t2d.fill_(True)
        draft.d2t.zero_()
    return draft


def run() -> BenchReport:
    from specforge_evaluator.speculative import speculative_generate, target_generate
    from tests.evaluator.perfect_draft import make_perfect_draft, make_permutation_target

    torch.set_num_threads(THREADS)
    engine, pi = make_permutation_target(**TARGET)
    drafts = {"perfect": make_perfect_draft(engine, pi)}
    drafts["random"] = random_draft_like(drafts["perfect"])
    gen = torch.Generator().manual_seed(0)
    V = TARGET["vocab_size"]
    prompts = [torch.randint(3, V, (PROMPT_LEN,), generator=gen).tolist() for _ in range(PROMPTS)]

    def baseline() -> tuple[float, list[list[int]], float]:
        started = time.perf_counter()
        outs = [target_generate(engine, p, max_new_tokens=NEW_TOKENS).tokens for p in prompts]
        return time.perf_counter() - started, outs, 1.0

    def speculative(name: str, k: int):
        def case() -> tuple[float, list[list[int]], float]:
            started = time.perf_counter()
            results = [
                speculative_generate(
                    engine, drafts[name], p, num_draft_tokens=k, max_new_tokens=NEW_TOKENS
                )
                for p in prompts
            ]
            wall = time.perf_counter() - started
            emitted = sum(sum(r.emitted) for r in results)
            steps = sum(r.steps for r in results)
            return wall, [r.tokens for r in results], emitted / steps

        return case

    cases = {"target only": baseline}
    for name in drafts:
        for k in KS:
            cases[f"{name} draft k={k}"] = speculative(name, k)
    for case in cases.values():
        case()  # warm-up
    best: dict[str, float] = {}
    acceptance: dict[str, float] = {}
    reference: list[list[int]] | None = None
    for _ in range(REPS):
        for name, case in cases.items():
            wall, outputs, accept = case()
            best[name] = min(best.get(name, float("inf")), wall)
            acceptance[name] = accept
            reference = outputs if reference is None else reference
            if outputs != reference:
                raise AssertionError(f"{name}: greedy output differs from the target's")

    report = BenchReport("speculative")
    tokens = PROMPTS * NEW_TOKENS
    for name, wall in best.items():
        report.add(f"{name}: tokens/s", tokens / wall, "tok/s")
        if name != "target only":
            report.add(f"{name}: serving acceptance length", acceptance[name], "tok/step")
    for name, wall in best.items():
        if name != "target only":
            report.ratios[f"{name} vs target only"] = best["target only"] / wall
    report.notes.append(
        "target: permutation Llama " + ", ".join(f"{k}={v}" for k, v in TARGET.items())
        + f"; {PROMPTS} prompts x {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens each, greedy, "
        f"fp32, {THREADS} torch thread, best of {REPS}"
    )  # fmt: skip
    report.notes.append(
        "serving acceptance length = tokens emitted per verification step, bonus included "
        "(prefill token excluded); perfect = upper bound, random = lower bound"
    )
    return report
