"""EAGLE-3 train step on CPU: SDPA (memory-efficient) attention vs the plain reference path.

Config from the issue: draft hidden 1024, draft vocab 8000, target vocab 32000, seq 1024,
TTT 7, batch 1, fp32. Each case runs in its own process so its peak RSS (``ru_maxrss``) above
the state after setup is the step's own peak memory.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import time

from bench.report import BenchReport

CONFIG = dict(hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=32000, draft_vocab=8000,
              seq=1024, ttt=7, steps=2)  # fmt: skip


def bench_dims():
    """The issue's CPU bench draft: hidden 1024, target vocab 32000, draft vocab 8000."""
    from bench.eagle3_step import DraftDims

    c = CONFIG
    return DraftDims(
        hidden=c["hidden"], intermediate=c["intermediate"], heads=c["heads"],
        kv_heads=c["kv_heads"], vocab=c["vocab"], draft_vocab=c["draft_vocab"],
    )  # fmt: skip


def bench_draft_config():
    return bench_dims().config()


def _case(attention: str, queue: multiprocessing.Queue) -> None:
    import torch

    from bench.eagle3_step import adamw, make_strategy, random_batch, random_draft, random_head

    c, dims, cpu = CONFIG, bench_dims(), torch.device("cpu")
    draft = random_draft(dims, cpu, seed=0)
    head = random_head(dims, cpu, torch.float32)
    batch = random_batch(dims, c["seq"], cpu, torch.float32)
    strategy, _ = make_strategy(draft, head, c["ttt"], {"attention": attention})
    optimizer = adamw([p for p in draft.parameters() if p.requires_grad])

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = strategy(batch)
        out.loss.backward()
        optimizer.step()
        return out.loss.item()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up: allocator, optimizer state (its peak counts, its time does not)
    started = time.perf_counter()
    for _ in range(c["steps"]):
        step()
    elapsed = (time.perf_counter() - started) / c["steps"]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(json.dumps({"seconds": elapsed, "peak_mib": (after - before) / 1024,
                          "rss_mib": after / 1024}))  # fmt: skip


def _measure(attention: str) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(attention, queue))
    proc.start()
    result = json.loads(queue.get(timeout=1200))
    proc.join()
    return result


def run() -> BenchReport:
    report = BenchReport("train_step")
    tokens = CONFIG["seq"]
    results = {}
    for attention in ("reference", "sdpa"):
        results[attention] = _measure(attention)
    for attention, r in results.items():
        report.add(f"{attention}: train step tokens/s", tokens / r["seconds"], "tok/s")
        report.add(f"{attention}: step peak memory above setup", r["peak_mib"], "MiB")
        report.add(f"{attention}: process peak RSS", r["rss_mib"], "MiB")
    ref, sdpa = results["reference"], results["sdpa"]
    report.ratios["sdpa_vs_reference_speed"] = ref["seconds"] / sdpa["seconds"]
    report.ratios["reference_vs_sdpa_peak_rss"] = ref["rss_mib"] / sdpa["rss_mib"]
    report.notes.append(
        "config: " + ", ".join(f"{k}={v}" for k, v in CONFIG.items()) + "; fp32, batch 1, 2 threads"
    )
    return report
