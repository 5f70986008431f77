"""EAGLE-3 training step at Llama-3.1-8B draft dims on CUDA, against the reference numbers.

The step is the trainer's (``bench/eagle3_step.py``): fp32 master weights, bf16 autocast around
the forward as ``specforge_trainer.loop`` does on CUDA, backward, clip at 0.5, AdamW. Batch 1,
random features in bf16 (what capture stores on CUDA), TTT 7, T = 4096 and 2048. Per case:
tokens/s from the host wall time of whole synchronized steps; forward / backward / optimizer
milliseconds from CUDA events (their sum can be below the wall time where the host stalls the
queue); peak memory = ``torch.cuda.max_memory_allocated`` over the steps (weights, AdamW state,
activations). Cases: the trainer's configuration first (``attention="auto"`` where this tree
has it, else the ``TrainSpec`` default), then ``sdpa`` for contrast while time is left.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from typing import Any

import torch

from bench.eagle3_step import (
    LLAMA31_8B,
    DraftDims,
    adamw,
    clip,
    make_strategy,
    random_batch,
    random_draft,
    random_head,
    trainer_options,
)
from bench.gpu import goals
from bench.gpu.part import Context, main, sync
from bench.gpu.timing import Marks, medians

TTT = 7
DEVICE_LENGTHS = (4096, 2048)  # the must-number first
SMOKE_DIMS = DraftDims(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512, draft_vocab=256)
SMOKE_LENGTHS = (128, 64)  # stand in for 4096 and 2048
WARMUP, STEPS = 2, 5  # warm-up covers compilation (flex) and the optimizer state's allocation
SMOKE_WARMUP, SMOKE_STEPS = 1, 2
CASE_SECONDS = 45  # a sdpa contrast case starts only with this much of the budget left


def time_case(ctx: Context, dims: DraftDims, length: int, options: dict[str, Any]) -> dict:
    """Build a fresh draft, step it ``WARMUP + STEPS`` times; the case's numbers."""
    device, cuda = ctx.device, ctx.device.type == "cuda"
    draft = random_draft(dims, device)
    head = random_head(dims, device, ctx.lowp)
    batch = random_batch(dims, length, device, ctx.lowp)
    strategy, dropped = make_strategy(draft, head, TTT, options)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = adamw(params)

    def step() -> tuple[torch.Tensor, dict[str, float], float]:
        marks = Marks(device)
        sync(device)
        started = time.perf_counter()
        marks.mark("start")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # as the trainer
            loss = strategy(batch).loss
        marks.mark("forward_ms")
        loss.backward()
        marks.mark("backward_ms")
        clip(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.mark("optimizer_ms")
        sync(device)
        return loss.detach(), marks.durations_ms(), (time.perf_counter() - started) * 1e3

    if cuda:
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
    warm, steps = (SMOKE_WARMUP, SMOKE_STEPS) if ctx.smoke else (WARMUP, STEPS)
    compile_started = time.perf_counter()
    for _ in range(warm):
        step()
    warmup_s = time.perf_counter() - compile_started
    runs, walls, losses = [], [], []
    for _ in range(steps):
        loss, phases, wall = step()
        runs.append(phases)
        walls.append(wall)
        losses.append(float(loss))
    phases = medians(runs)
    wall_ms = sorted(walls)[len(walls) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    case = {
        "length": length,
        "options": {k: v for k, v in options.items() if k not in dropped},
        "dropped_options": dropped,
        "tok_s": length / (wall_ms / 1e3),
        "wall_ms": wall_ms,
        **phases,
        "events_ms": sum(phases.values()),
        "peak_gib": peak,
        "warmup_s": warmup_s,
        "losses": losses,
        "loss_finite": all(math.isfinite(x) for x in losses),
    }
    return case


def free(device: torch.device) -> None:
    """Give the last case's tensors back before the next case allocates its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(ctx: Context) -> None:
    dims = SMOKE_DIMS if ctx.smoke else LLAMA31_8B
    lengths = SMOKE_LENGTHS if ctx.smoke else DEVICE_LENGTHS
    reference_of = dict(zip(lengths, DEVICE_LENGTHS, strict=True))  # smoke: long / short roles
    trainer = trainer_options(ctx.device)
    cases = [("trainer", trainer, length) for length in lengths]
    if trainer["attention"] != "sdpa":
        contrast = trainer | {"attention": "sdpa"}
        cases += [("sdpa", contrast, length) for length in lengths]
    ctx.metric("dims", vars(dims))
    ctx.metric("ttt_length", TTT)
    ctx.metric("trainer_options", trainer)
    ctx.metric("cases", {})
    for label, options, length in cases:
        name = f"{label}@{length}"
        if label != "trainer" and ctx.time_left() < CASE_SECONDS:
            ctx.note(f"{name} skipped: {ctx.time_left():.0f} s of the part's budget left")
            continue
        try:
            case = time_case(ctx, dims, length, options)
        except Exception as exc:  # out of memory, a failed compile: the next case still runs
            case = {"length": length, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                    "loss_finite": False}  # fmt: skip
        free(ctx.device)
        reference = reference_of[length]
        if "tok_s" in case:
            case["tok_s_ratio_vs_reference"] = case["tok_s"] / goals.REFERENCE_TOK_S[reference]
        if case.get("peak_gib") is not None and reference == 4096:
            case["peak_ratio_vs_reference"] = case["peak_gib"] / goals.REFERENCE_PEAK_GIB_4096
        ctx.result.metrics["cases"][name] = case
        print(f"train_step {name}: {_summary(case)}", flush=True)
        if label == "trainer":
            ctx.must(f"loss finite @{length} (trainer config)", float(case["loss_finite"]), "==", 1)
            ratio = case.get("tok_s_ratio_vs_reference")
            note = f"reference {goals.REFERENCE_TOK_S[reference]:.0f} tok/s"
            name_ = f"tok/s ratio vs reference @{reference} (trainer config)"
            ctx.must(name_, ratio, ">=", goals.TRAIN_MUST_TOK_S_RATIO, kind="performance",
                     unit="x", note=note)  # fmt: skip
            ctx.goal(name_, ratio, ">=", goals.TRAIN_GOAL_TOK_S_RATIO, unit="x", note=note)
            if reference == 4096:
                peak = case.get("peak_ratio_vs_reference")
                note = f"reference {goals.REFERENCE_PEAK_GIB_4096} GiB"
                name_ = "peak memory ratio vs reference @4096 (trainer config)"
                ctx.must(name_, peak, "<=", goals.TRAIN_MUST_PEAK_RATIO_4096, kind="performance",
                         unit="x", note=note)  # fmt: skip
                ctx.goal(name_, peak, "<=", goals.TRAIN_GOAL_PEAK_RATIO_4096, unit="x", note=note)
        ctx.save()
    if ctx.smoke:
        ctx.note(
            "smoke: tiny dims on CPU; lengths 128 / 64 stand in for 4096 / 2048, so the "
            "ratios against the reference mean nothing"
        )


def _summary(case: dict) -> str:
    if "error" in case:
        return case["error"]
    peak = "-" if case["peak_gib"] is None else f"{case['peak_gib']:.1f} GiB"
    return (
        f"{case['tok_s']:,.0f} tok/s, wall {case['wall_ms']:.1f} ms (fwd "
        f"{case['forward_ms']:.1f} / bwd {case['backward_ms']:.1f} / opt "
        f"{case['optimizer_ms']:.1f}), peak {peak}, warm-up {case['warmup_s']:.1f} s, "
        f"dropped {case['dropped_options'] or 'none'}"
    )


if __name__ == "__main__":
    sys.exit(main("train_step", run))
