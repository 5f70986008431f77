"""Speculative decoding on CUDA with a bf16 target: lossless against the target's own greedy
decode, acceptance and tokens/s, through the evaluator's ``ServingEval``.

1. **Permutation target** (``tests/evaluator/perfect_draft.py``: one-hot embeddings, a
   permutation head, every layer's matmuls still run) in bf16: its logits are exact in bf16, so
   greedy speculative decoding must equal HF's greedy ``generate`` token for token. The
   **perfect** draft must be accepted in full (acceptance length k + 1); a **random** draft
   shows what drafting costs when nothing is accepted. Drafts stay fp32, as checkpoints load.
2. **SmolLM2-shaped target** (random weights, see ``capture.py``) with a random draft, verified
   in bf16 and in fp32. A random model's top logits lie close together (the top two of 49152
   draws differ by ~0.1), and a bf16 forward of k+1 tokens rounds differently from a 1-token
   step, so bf16 verification may pick the other of two near-tied tokens: then the output is
   not the greedy decode's. Each first difference is judged in fp64 on the CPU: the logit gap
   between the two tokens there says whether it was a near tie (under ``NEAR_TIE`` of the
   verification precision) or a real bug. The losslessness must-check is made in bf16 where
   bf16 is lossless, else in fp32 (the precision that makes the check meaningful), and says
   which.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch

from bench.capture import smollm2_config
from bench.gpu.part import Context, main

PERMUTATION = dict(vocab_size=1024, hidden_size=1024, num_layers=16, intermediate_size=2048,
                   num_heads=8, num_kv_heads=4)  # fmt: skip
SMOKE_PERMUTATION = dict(vocab_size=64, hidden_size=64, num_layers=5, intermediate_size=128,
                         num_heads=4, num_kv_heads=2)  # fmt: skip
# New tokens = 1 + a multiple of k + 1, so every round of a perfect draft emits k + 1 tokens.
PROMPTS, PROMPT_LEN, NEW_TOKENS, KS = 4, 32, 49, (3, 5)
SMOKE_PROMPTS, SMOKE_PROMPT_LEN, SMOKE_NEW_TOKENS, SMOKE_KS = 2, 16, 13, (3,)
SMOLLM2_K = 3
# A first difference is a near tie when the two tokens' fp64 logits differ by less: bf16 keeps
# 8 bits of mantissa (logits of magnitude ~2 round to 1/64, and the hidden states carry ~2%
# error through 30 layers), fp32 24 bits.
NEAR_TIE = {torch.bfloat16: 0.25, torch.float32: 1e-3}
METRICS = ("tokens_per_s_spec", "tokens_per_s_target", "speedup", "verify_ms_per_step",
           "draft_ms_per_token", "serving/first_difference_prompt",
           "serving/first_difference_position")  # fmt: skip


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sizes(ctx: Context) -> tuple[int, int, int]:
    if ctx.smoke:
        return SMOKE_PROMPTS, SMOKE_PROMPT_LEN, SMOKE_NEW_TOKENS
    return PROMPTS, PROMPT_LEN, NEW_TOKENS


def _prompts(ctx: Context, vocab: int, seed: int) -> list[list[int]]:
    count, length, _ = _sizes(ctx)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def serve(engine, prompts, k: int, new_tokens: int, drafts: dict[str, Any]) -> dict[str, Any]:
    """``ServingEval`` of each draft at chain length ``k``: the evaluator's own numbers, and the
    greedy references they were checked against."""
    from specforge_evaluator.serving import ServingEval

    serving = ServingEval(engine, prompts, num_draft_tokens=k, max_new_tokens=new_tokens)
    serving.prepare()
    out: dict[str, Any] = {"references": serving.references}
    for name, draft in drafts.items():
        outcome = serving.evaluate(draft)
        out[name] = {"lossless": outcome.lossless, "error": outcome.error,
                     "acceptance_length": outcome.acceptance_length,
                     "acceptance_rates": outcome.acceptance_rates,
                     **{key: outcome.metrics.get(key) for key in METRICS}}  # fmt: skip
    return out


def _line(run: dict[str, Any]) -> str:
    return (f"lossless {run['lossless']}, AL {run['acceptance_length']:.2f}, "
            f"{run['tokens_per_s_spec'] or 0:,.0f} tok/s (x{run['speedup'] or 0:.2f} over "
            f"target-only {run['tokens_per_s_target'] or 0:,.0f} tok/s)")  # fmt: skip


def permutation_target(ctx: Context) -> None:
    from bench.speculative import random_draft_like
    from tests.evaluator.perfect_draft import make_perfect_draft, make_permutation_target

    shape = SMOKE_PERMUTATION if ctx.smoke else PERMUTATION
    engine, pi = make_permutation_target(**shape, device=ctx.device, dtype=ctx.lowp)
    perfect = make_perfect_draft(engine, pi)
    drafts = {"perfect": perfect, "random": random_draft_like(perfect)}
    drafts = {name: draft.to(ctx.device) for name, draft in drafts.items()}
    prompts = _prompts(ctx, shape["vocab_size"], seed=0)
    results = {}
    for k in SMOKE_KS if ctx.smoke else KS:
        served = serve(engine, prompts, k, _sizes(ctx)[2], drafts)
        served.pop("references")
        results[f"k={k}"] = served
        for name, run in served.items():
            print(f"decode permutation target, {name} draft k={k}: {_line(run)}", flush=True)
            ctx.must(f"permutation target k={k} {name} draft: lossless in {_name(ctx.lowp)}",
                     float(bool(run["lossless"])), "==", 1)  # fmt: skip
        perfect_run = served["perfect"]
        rates = perfect_run["acceptance_rates"]
        ctx.must(f"permutation target k={k}: perfect draft, every drafted token accepted",
                 float(bool(rates) and all(r == 1.0 for r in rates)), "==", 1,
                 note=f"acceptance length {perfect_run['acceptance_length']}")  # fmt: skip
        ctx.info(f"permutation target k={k}: perfect draft speedup over target-only",
                 perfect_run["speedup"], ">=", 1.0, unit="x")  # fmt: skip
    ctx.metric("permutation_target", {"shape": shape, "dtype": str(ctx.lowp), "results": results})


@torch.inference_mode()
def first_difference_gap(reference_model, prompt: list[int], expected: list[int],
                         got_token: int, position: int) -> dict[str, float]:  # fmt: skip
    """fp64 logits after the common prefix: the gap between the greedy token and the one the
    speculative decode emitted, the top-two gap, and whether fp64 agrees with the greedy one."""
    prefix = torch.tensor([prompt + expected[:position]])
    logits = reference_model(input_ids=prefix, use_cache=False).logits[0, -1]
    top = torch.topk(logits, 2).values
    return {
        "gap": float(logits[expected[position]] - logits[got_token]),
        "top2_gap": float(top[0] - top[1]),
        "fp64_argmax_is_expected": float(int(logits.argmax()) == expected[position]),
    }


def _speculative_tokens(engine, draft, prompt: list[int], k: int, new: int) -> list[int]:
    from specforge_evaluator.speculative import speculative_generate

    result = speculative_generate(engine, draft, prompt, num_draft_tokens=k, max_new_tokens=new)
    return result.tokens


def smollm2_shaped(ctx: Context) -> None:
    from transformers import LlamaForCausalLM

    from bench.gpu.capture import smoke_config
    from bench.speculative import random_draft_like
    from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft
    from specforge_common.targets import HFTargetEngine

    config = smoke_config() if ctx.smoke else smollm2_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).float()
    reference = copy.deepcopy(model).double().eval()  # the fp64 CPU judge of first differences
    precisions = (torch.bfloat16, torch.float32)  # smoke too: a tiny bf16 model is cheap on CPU
    engines = {p: HFTargetEngine(copy.deepcopy(model).to(ctx.device, p)) for p in precisions}
    del model
    info, layers = engines[torch.float32].info, engines[torch.float32].aux_layer_ids
    draft_config = Eagle3Config(
        hidden_size=info.hidden_size, intermediate_size=config.intermediate_size,
        num_attention_heads=info.num_attention_heads,
        num_key_value_heads=info.num_key_value_heads, vocab_size=info.vocab_size,
        draft_vocab_size=info.vocab_size, head_dim=info.head_dim, aux_layer_ids=layers,
    )  # fmt: skip
    with_embedding = Eagle3Draft(draft_config)
    with torch.no_grad():
        with_embedding.embed_tokens.weight.copy_(reference.model.embed_tokens.weight)
    draft = random_draft_like(with_embedding).to(ctx.device)
    prompts = _prompts(ctx, info.vocab_size, seed=1)
    new = _sizes(ctx)[2]
    by_precision: dict[str, Any] = {}
    excused: dict[str, bool] = {}
    for precision, engine in engines.items():
        served = serve(engine, prompts, SMOLLM2_K, new, {"random": draft})
        run = served["random"]
        if not run["lossless"]:
            index = int(run["serving/first_difference_prompt"])
            position = int(run["serving/first_difference_position"])
            expected = served["references"][index]
            got = _speculative_tokens(engine, draft, prompts[index], SMOLLM2_K, new)
            if position < min(len(expected), len(got)):
                gap = first_difference_gap(reference, prompts[index], expected, got[position],
                                           position)  # fmt: skip
            else:  # one output ended early: no second token to weigh
                gap = {"gap": float("inf")}
            run["first_difference"] = gap
            run["near_tie"] = abs(gap["gap"]) < NEAR_TIE[precision]
        excused[_name(precision)] = bool(run["lossless"]) or bool(run.get("near_tie"))
        by_precision[_name(precision)] = run
        print(f"decode SmolLM2-shaped target, {_name(precision)} verification, random draft "
              f"k={SMOLLM2_K}: {_line(run)}"
              + (f", first difference {run['first_difference']}" if "first_difference" in run
                 else ""), flush=True)  # fmt: skip
    bf16 = by_precision["bfloat16"]
    check_in = "bfloat16" if bf16["lossless"] else "float32"
    ctx.metric("smollm2_shaped", {"k": SMOLLM2_K, "by_precision": by_precision,
                                  "lossless_check_precision": check_in})  # fmt: skip
    if not bf16["lossless"]:
        ctx.must("SmolLM2-shaped: bfloat16 differences are near ties (fp64 logit gap)",
                 abs(bf16["first_difference"]["gap"]), "<=", NEAR_TIE[torch.bfloat16],
                 note="a larger gap would be a real verification bug")  # fmt: skip
    ctx.must(f"SmolLM2-shaped: lossless in {check_in} verification", float(excused[check_in]),
             "==", 1, note=f"bfloat16 verification lossless: {bf16['lossless']}; a float32 "
             f"difference counts as a near tie under a fp64 logit gap of "
             f"{NEAR_TIE[torch.float32]}")  # fmt: skip


def run(ctx: Context) -> None:
    permutation_target(ctx)
    ctx.save()
    smollm2_shaped(ctx)


if __name__ == "__main__":
    sys.exit(main("decode", run))
