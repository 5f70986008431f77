"""``specforge evaluate --draft DIR --target DIR --prompts FILE``: judge any SGLang-layout EAGLE-3
draft by real speculative decoding, without a bus, a run or captured features.

The prompts are a dataset file in any format ``specforge enqueue`` reads (each conversation up
to its first assistant turn, templated with the target tokenizer's generation prompt). The
draft proposes ``--k`` tokens per target verification; at temperature 0 every output is checked
token for token against the target's own greedy output. Prints the serving acceptance length
(tokens per verification, bonus token included), the per-position acceptance, the speedup
over plain target decoding measured in the same process and the bound that acceptance length
allows (``ideal = AL x plain step / (verify + k x draft step)``, with its four measured
terms), and writes them as JSON with ``--json``. Exit codes: 0 measured (and lossless at
temperature 0), 1 NOT lossless, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("standalone (no bus): judge one draft by real decoding")
    group.add_argument("--draft", help="an SGLang-layout draft directory (EAGLE-3, DFlash, Domino)")
    group.add_argument("--target", help="the target model directory (HF layout)")
    group.add_argument("--prompts", help="dataset file (.jsonl/.json) or 'sharegpt'")
    group.add_argument("--limit", type=int, default=16, help="prompts to decode (16)")
    group.add_argument("--k", type=int, default=3, help="draft tokens per verification (3)")
    group.add_argument("--max-new-tokens", type=int, default=64, help="per prompt (64)")
    group.add_argument("--temperature", type=float, default=0.0, help="0: greedy + lossless check")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--max-length", type=int, default=2048, help="longest prompt kept (2048)")
    group.add_argument("--json", dest="json_out", help="also write the numbers to this file")


def is_standalone(args: argparse.Namespace) -> bool:
    return any(getattr(args, name, None) for name in ("draft", "target", "prompts"))


def main(args: argparse.Namespace) -> int:
    import torch

    from specforge_common.drafts import captured_layers, load_any_draft
    from specforge_common.eagle3 import CheckpointError
    from specforge_common.log import get_logger
    from specforge_common.targets import HFTargetEngine, default_dtype, load_embedding

    from .serving import ServingEval, prompts_from_source

    log = get_logger(command="evaluate")
    missing = [f"--{n}" for n in ("draft", "target", "prompts") if not getattr(args, n)]
    if missing:
        print(f"specforge evaluate: standalone mode needs {', '.join(missing)} as well")
        return 2
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip
    try:
        draft = load_any_draft(args.draft, embedding=load_embedding(args.target), device=device)
        if device == "cpu":
            draft = draft.float()
        method, layers = captured_layers(draft)
        engine = HFTargetEngine.from_pretrained(args.target, device=device,
                                                dtype=default_dtype(device),
                                                aux_layer_ids=layers,
                                                capture_method=method)  # fmt: skip
        prompts = prompts_from_source(args.prompts, engine.tokenizer, args.limit,
                                      max_length=args.max_length)  # fmt: skip
    except (OSError, ValueError, CheckpointError) as exc:
        print(f"specforge evaluate: {exc}")
        return 2
    if draft.config.vocab_size != engine.info.vocab_size:
        print(f"specforge evaluate: the draft's target vocabulary is {draft.config.vocab_size} "
              f"but the target's is {engine.info.vocab_size}")  # fmt: skip
        return 2
    if not prompts:
        print(f"specforge evaluate: no usable prompt in {args.prompts}")
        return 2
    log.info("decoding", prompts=len(prompts), k=args.k, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, device=device)  # fmt: skip
    serving = ServingEval(engine, prompts, num_draft_tokens=args.k,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          seed=args.seed)  # fmt: skip
    serving.prepare()
    outcome = serving.evaluate(draft)
    numbers = {"draft": str(Path(args.draft).resolve()), "target": str(Path(args.target).resolve()),
               "prompts": len(prompts), "k": args.k, "max_new_tokens": args.max_new_tokens,
               "temperature": args.temperature, "lossless": outcome.lossless,
               "serving_acceptance_length": outcome.acceptance_length,
               "serving_acceptance_rates": outcome.acceptance_rates,
               "metrics": outcome.metrics, "error": outcome.error}  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(numbers, indent=2, allow_nan=True) + "\n")
    print(_summary(numbers))
    return 1 if outcome.lossless is False else 0


def _summary(n: dict) -> str:
    if n["lossless"] is False:
        return f"NOT LOSSLESS: {n['error']}"
    m = n["metrics"]
    rates = " ".join("-" if math.isnan(r) else f"{r:.3f}" for r in n["serving_acceptance_rates"])
    lines = [
        f"draft {n['draft']}",
        f"  {n['prompts']} prompts x {n['max_new_tokens']} new tokens, k = {n['k']}, "
        f"temperature {n['temperature']:g}"
        + (
            "  (lossless: every output equals the target's greedy output)" if n["lossless"] else ""
        ),  # fmt: skip
        f"  serving acceptance length {n['serving_acceptance_length']:.3f} "
        "(tokens per target verification, bonus token included)",
        f"  acceptance per draft position (given the earlier ones accepted): {rates}",
        f"  tokens/s {m['tokens_per_s_spec']:.1f} speculative vs {m['tokens_per_s_target']:.1f} "
        f"target alone: speedup {m['speedup']:.2f}x "
        f"(draft {m['draft_ms_per_step']:.1f} ms + target {m['target_ms_per_step']:.1f} ms "
        "per step)",
        "  " + _ideal_line(n["serving_acceptance_length"], n["k"], m),
    ]
    return "\n".join(lines)


def _ideal_line(acceptance_length: float, k: int, m: dict) -> str:
    """The speedup bound and its four terms, then how much of it was measured: a gap between
    the two is the loop's overhead, a low bound is the acceptance or the step costs."""
    return (
        f"ideal {_x(m['ideal_speedup'])} = AL {acceptance_length:.2f} x plain "
        f"{_ms(m['plain_step_ms'])} / (verify {_ms(m['verify_ms_per_step'])} + {k} x draft "
        f"{_ms(m['draft_ms_per_token'])}); measured {_x(m['speedup'])} = "
        + ("-" if math.isnan(m["speedup_vs_ideal"]) else f"{m['speedup_vs_ideal']:.2f}")
        + " of ideal"
    )


def _x(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def _ms(value: float) -> str:
    """Three significant digits (71.2 ms on SmolLM2, 0.412 ms on a tiny target), no exponent."""
    if math.isnan(value):
        return "- ms"
    return f"{value:.0f} ms" if value >= 100 else f"{value:.3g} ms"
