"""Capture on CUDA in bf16: the features equal the fp32 CPU capture, and cost (almost) nothing
over a bare forward.

Target: SmolLM2-135M-Instruct's exact architecture (``bench.capture.smollm2_config``: 30 layers,
hidden 576, 9 / 3 heads, vocab 49152, tied, rope theta 1e5) with seeded random weights; its
98 MB GGUF is larger than all a device call can carry (64 MiB).

1. Features: ``HFTargetEngine.capture`` of one right-padded batch (rows of different lengths)
   by the bf16 CUDA engine and by an fp32 CPU engine of the same weights. Per real token and per
   captured tensor (each aux layer, the final hidden state): ``||gpu - cpu|| / ||cpu||``; the
   max and the mean over tokens must stay within ``goals.FEATURE_REL_ERR_*``.
2. Overhead: ``capture`` vs the bare base-model forward (``engine.base``, no hooks, no feature
   copy) of the same bf16 batch, interleaved repetitions in this process (order alternating),
   each synchronized; the ratio of the medians, and capture tokens/s.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch

from bench.capture import smollm2_config
from bench.gpu import goals
from bench.gpu.part import Context, main, sync

EQUAL_ROWS, EQUAL_LEN = 4, 512  # the CPU reference forward: ~2k tokens, a few seconds
TIME_ROWS, TIME_LEN = 8, 1024
REPS, WARMUP = 20, 3
SMOKE_EQUAL_LEN, SMOKE_TIME_LEN, SMOKE_REPS = 48, 64, 3


def smoke_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def right_padded(rows: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random ids with rows of lengths ``length``, then shorter: right padding, as capture sees."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, rows):
        mask[row, length - row * length // (2 * rows) :] = 0
    return ids, mask


def relative_errors(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per real token: ``||got - want|| / ||want||`` over the hidden dim, in fp32 on the CPU."""
    got, want = got.float().cpu(), want.float().cpu()
    real = mask.bool()
    return (got - want)[real].norm(dim=-1) / want[real].norm(dim=-1)


def features(ctx: Context, gpu, cpu, vocab: int) -> None:
    length = SMOKE_EQUAL_LEN if ctx.smoke else EQUAL_LEN
    ids, mask = right_padded(EQUAL_ROWS, length, vocab, seed=1)
    got, want = gpu.capture(ids, mask), cpu.capture(ids, mask)
    H = gpu.info.hidden_size
    errors = {}
    for slot, layer in enumerate(gpu.aux_layer_ids):
        part = slice(slot * H, (slot + 1) * H)
        errors[f"aux_layer_{layer}"] = relative_errors(
            got.aux_hidden_states[..., part], want.aux_hidden_states[..., part], mask
        )
    errors["final_hidden"] = relative_errors(got.hidden_states, want.hidden_states, mask)
    summary = {name: {"max": float(e.max()), "mean": float(e.mean())} for name, e in errors.items()}
    ctx.metric("feature_relative_error", summary)
    ctx.metric("feature_tokens_compared", int(mask.sum()))
    worst_max = max(s["max"] for s in summary.values())
    worst_mean = max(s["mean"] for s in summary.values())
    print(
        f"capture features vs fp32 CPU: max {worst_max:.4f}, mean {worst_mean:.4f} ({summary})",
        flush=True,
    )
    precision = str(ctx.lowp).removeprefix("torch.")
    ctx.must(
        f"features max per-token relative error ({precision} vs fp32 CPU)",
        worst_max,
        "<=",
        goals.FEATURE_REL_ERR_MAX,
    )
    ctx.must(
        f"features mean per-token relative error ({precision} vs fp32 CPU)",
        worst_mean,
        "<=",
        goals.FEATURE_REL_ERR_MEAN,
    )


def overhead(ctx: Context, gpu, vocab: int) -> None:
    length = SMOKE_TIME_LEN if ctx.smoke else TIME_LEN
    ids, mask = right_padded(TIME_ROWS, length, vocab, seed=2)
    ids, mask = ids.to(ctx.device), mask.to(ctx.device)

    @torch.inference_mode()
    def bare():
        return gpu.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    def capture():
        return gpu.capture(ids, mask)

    variants = {"bare": bare, "capture": capture}
    times: dict[str, list[float]] = {name: [] for name in variants}
    reps = SMOKE_REPS if ctx.smoke else REPS
    for rep in range(WARMUP + reps):
        order = list(variants.items())
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            sync(ctx.device)
            started = time.perf_counter()
            out = fn()
            sync(ctx.device)
            if rep >= WARMUP:
                times[name].append(time.perf_counter() - started)
            del out
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["capture"] / median["bare"]
    tokens = TIME_ROWS * length
    ctx.metric("overhead_batch", [TIME_ROWS, length])
    ctx.metric("bare_forward_ms", median["bare"] * 1e3)
    ctx.metric("capture_ms", median["capture"] * 1e3)
    ctx.metric("capture_tok_s", tokens / median["capture"])
    ctx.metric("capture_over_bare", ratio)
    ctx.metric(
        "capture_over_bare_spread",
        {name: [min(v) * 1e3, max(v) * 1e3] for name, v in times.items()},
    )
    print(
        f"capture {TIME_ROWS}x{length}: {median['capture'] * 1e3:.2f} ms vs bare "
        f"{median['bare'] * 1e3:.2f} ms -> {ratio:.3f}x, {tokens / median['capture']:,.0f} "
        "tok/s",
        flush=True,
    )
    ctx.must(
        "capture time / bare forward",
        ratio,
        "<=",
        goals.CAPTURE_OVERHEAD_MUST,
        kind="performance",
        unit="x",
    )
    ctx.goal("capture time / bare forward", ratio, "<=", goals.CAPTURE_OVERHEAD_GOAL, unit="x")


def run(ctx: Context) -> None:
    from transformers import LlamaForCausalLM

    from specforge_common.targets import HFTargetEngine

    config = smoke_config() if ctx.smoke else smollm2_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).float()
    gpu = HFTargetEngine(copy.deepcopy(model).to(ctx.device, ctx.lowp))
    cpu = HFTargetEngine(model)  # fp32 on the CPU: the reference
    ctx.metric(
        "target",
        "tiny Llama (smoke)"
        if ctx.smoke
        else "SmolLM2-135M-Instruct architecture, seeded random weights (the 98 MB GGUF "
        "does not fit the 64 MiB a device call carries)",
    )
    ctx.metric("dtype", str(ctx.lowp))
    ctx.metric("aux_layer_ids", list(gpu.aux_layer_ids))
    features(ctx, gpu, cpu, config.vocab_size)
    ctx.save()
    del cpu, model
    overhead(ctx, gpu, config.vocab_size)


if __name__ == "__main__":
    sys.exit(main("capture", run))
