"""Soak: many prompts through 4 capture processes and a trainer, watching memory and lag.

``python -m bench soak [--prompts 20000] [--captures 4]`` (on demand, never in ``make test``).
One embedded nats-server, a ``file://`` store and a tiny target in a temp dir. The run is
published the way enqueue does it (``bench.pipeline``'s pre-tokenized PromptTasks, vocab map
and EnqueueSummary); then ``specforge capture --exit-when-done`` x N and ``specforge train``
run as separate processes until the trainer's final checkpoint. Every ``--every`` seconds the
harness samples each process's RSS from ``/proc/<pid>/status`` and the lag (prompts not yet
captured, samples captured but not yet trained). At the end it checks the invariants from the
bus and the trained-samples log: every prompt has exactly one SampleRef (none lost or doubled)
and every train sample was trained exactly once (1 epoch).

RSS "flat": over the samples taken while a process works (a capture once samples flow, the
trainer once it trains), the max RSS of the last third over that of the middle third (growth <
``RSS_GROWTH_LIMIT`` passes; the first third is warm-up: allocator pools, prefetch buffers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import pipeline
from bench.report import RESULTS_DIR
from specforge_common.bus import BusConfig, BusError, open_bus
from specforge_common.contracts import SampleRef, TrainerProgress
from specforge_common.nats_server import NatsServer
from specforge_common.step_log import read_step_log, trained_samples_path
from specforge_common.subjects import progress_key
from specforge_common.targets import make_tiny_target

RSS_GROWTH_LIMIT = 1.10  # last-third max RSS / middle-third max RSS
SPECFORGE = [sys.executable, "-m", "specforge_cli"]


def rss_kib(pid: int) -> int | None:
    """Resident set size of a live process, from /proc (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def growth(series: list[int]) -> float | None:
    """Max of the last third over max of the middle third (None: too few samples)."""
    n = len(series)
    if n < 6:
        return None
    middle, last = series[n // 3 : 2 * n // 3], series[2 * n // 3 :]
    return max(last) / max(middle)


async def _spawn(command: str, *args: str, log: Path) -> asyncio.subprocess.Process:
    out = log.open("wb")
    return await asyncio.create_subprocess_exec(
        *SPECFORGE, command, *args, "--device", "cpu", "--threads", "1",
        stdout=out, stderr=out,
    )  # fmt: skip


async def soak(prompts: int, captures: int, every: float, work: Path) -> dict[str, Any]:
    target = make_tiny_target(work / "target", seed=0, **pipeline.TARGET)
    run = f"soak-{int(time.time())}"
    spec = pipeline.bench_spec(run, target, work, batch_size=8)
    pipeline.N_PROMPTS, pipeline.MIN_LEN, pipeline.MAX_LEN = prompts, 16, 48
    with NatsServer(store_dir=work / "jetstream") as server:
        url = server.url
        async with await open_bus(BusConfig(servers=(url,), name="soak")) as bus:
            tokens = await pipeline._publish_run(bus, spec, seed=0)
            logs = work / "logs"
            logs.mkdir()
            started = time.monotonic()
            procs = {
                f"capture-{i}": await _spawn(
                    "capture",
                    "--run",
                    run,
                    "--nats",
                    url,
                    "--exit-when-done",
                    "--producer-id",
                    f"capture-{i}",
                    log=logs / f"capture-{i}.log",
                )  # fmt: skip
                for i in range(captures)
            }
            procs["trainer"] = await _spawn("train", "--run", run, "--nats", url,
                                            log=logs / "trainer.log")  # fmt: skip
            rss: dict[str, list[int]] = {name: [] for name in procs}
            working: dict[str, list[int]] = {name: [] for name in procs}  # after warm-up
            timeline: list[dict[str, Any]] = []
            captured_at: float | None = None
            while any(p.returncode is None for p in procs.values()):
                t = round(time.monotonic() - started, 1)
                for name, proc in procs.items():
                    if proc.returncode is None and (kib := rss_kib(proc.pid)) is not None:
                        rss[name].append(kib)
                pending = await bus.stream_depth(run, "prompts")  # work queue: acked ones go
                progress = await bus.get_record(progress_key(run, 0), TrainerProgress)
                try:
                    published = await bus.stream_depth(run, "samples")
                except BusError:  # no capture has created it yet
                    published = 0
                trained = progress.samples_consumed if progress else 0
                for name, series in rss.items():  # capturing / training, model loaded
                    if series and (trained if name == "trainer" else published):
                        working[name].append(series[-1])
                point = {
                    "t": t,
                    "prompts_pending": pending,
                    "samples": published,
                    "trained": trained,
                    "rss_mib": {n: round(v[-1] / 1024, 1) for n, v in rss.items() if v},
                }
                timeline.append(point)  # fmt: skip
                if captured_at is None and point["prompts_pending"] == 0:
                    captured_at = time.monotonic() - started
                try:
                    await asyncio.wait_for(
                        asyncio.gather(*(p.wait() for p in procs.values())), every
                    )
                except TimeoutError:
                    pass
            wall = time.monotonic() - started
            codes = {name: p.returncode for name, p in procs.items()}
            per_prompt: Counter[str] = Counter()
            split_of: dict[str, str] = {}
            for split in ("train", "eval"):
                async for _, record in bus.replay(run, split):
                    if isinstance(record, SampleRef):
                        per_prompt[record.prompt_id] += 1
                        split_of[record.sample_id] = split
    entries = read_step_log(trained_samples_path(work / "runs", run))
    per_sample = Counter(s for e in entries for s in e["samples"])
    train_ids = {s for s, split in split_of.items() if split == "train"}
    return {
        "prompts": prompts,
        "captures": captures,
        "prompt_tokens": tokens,
        "exit_codes": codes,
        "wall_s": round(wall, 1),
        "capture_done_s": round(captured_at or wall, 1),
        "capture_prompts_per_s": round(prompts / (captured_at or wall), 1),
        "end_to_end_prompts_per_s": round(prompts / wall, 1),
        "lost": prompts - len(per_prompt),
        "doubled": sum(1 for n in per_prompt.values() if n > 1),
        "train_samples": len(train_ids),
        "trained_not_once": sum(1 for s in train_ids if per_sample[s] != 1)
        + sum(1 for s in per_sample if s not in train_ids),
        "max_prompts_pending": max(p["prompts_pending"] for p in timeline),
        "max_train_lag": max(p["samples"] - p["trained"] for p in timeline),
        "rss_max_mib": {n: round(max(v) / 1024, 1) for n, v in rss.items() if v},
        "rss_growth": {n: growth(v) for n, v in working.items()},
        "timeline": timeline,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__)
    parser.add_argument("--prompts", type=int, default=20_000)
    parser.add_argument("--captures", type=int, default=4)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="specforge-soak-") as tmp:
        result = asyncio.run(soak(args.prompts, args.captures, args.every, Path(tmp)))
    flat = all(g is None or g < RSS_GROWTH_LIMIT for g in result["rss_growth"].values())
    ok = (not result["lost"] and not result["doubled"] and not result["trained_not_once"]
          and all(c == 0 for c in result["exit_codes"].values()))  # fmt: skip
    result |= {"rss_flat": flat, "ok": ok}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k != "timeline"}
    print(json.dumps(summary, indent=2))
    print(f"  -> {args.out}")
    return 0 if ok else 1
