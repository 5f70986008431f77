"""Data-parallel trainer throughput: ``specforge train`` with 1 rank vs 2 gloo ranks (torchrun),
DDP and FSDP.

One embedded nats-server, a ``file://`` feature store and the seeded tiny Llama target of
``bench/pipeline.py`` (hidden 128), all in a temp dir. Two runs get identical captured samples
(same seed: ``N_TRAIN`` train + ``N_EVAL`` eval samples of 64-128 random tokens, loss mask on the
last 2/3), published by ``tests/support.py::seed_captured_run`` (SampleRefs, vocab map,
EnqueueSummary, EndOfSplit markers — what enqueue + capture would leave). Then, to the end of
data (1 epoch):

- run A: ``specforge train --run-id A`` (the CLI as a subprocess), 1 rank, batch ``BATCH``,
  ``OMP_NUM_THREADS=2`` / ``--threads 2``;
- run B: ``python -m torch.distributed.run --nproc-per-node 2 -m specforge_cli train
  --run-id B``: 2 gloo ranks, each batch ``BATCH // 2`` (same global batch),
  ``OMP_NUM_THREADS=1`` / ``--threads 1`` each;
- run C: as B with ``--fsdp`` (parameters and optimizer state sharded over the 2 ranks).

samples/s comes from each rank's final JSON log line (``"training done"``: its ``samples`` and
``samples_per_s``, wall from the first fetch to the final checkpoint, step-0 and final checkpoint
writes included). For 2 ranks the rate is both ranks' samples over the slower rank's wall.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.pipeline import TARGET, bench_spec  # the pipeline suite's tiny target and run
from bench.report import BenchReport
from specforge_common.bus import BusConfig, open_bus
from specforge_common.contracts import (
    RunSpec,
)
from specforge_common.log import configure_logging
from specforge_common.nats_server import NatsServer
from tests.support import seed_captured_run

N_TRAIN = 96
N_EVAL = 4
MIN_LEN, MAX_LEN = 64, 128
SEED = 0
BATCH = 4  # global batch: run A's batch, 2 x run B's per-rank batch
WORLD = 2
TIMEOUT_S = 120  # per training command
# Interleaved repetitions (A, B, A, B) on the same two runs, retrained from scratch with
# --no-resume; the best repetition of each counts (interference only slows a case down).
REPS = 3
ROOT = Path(__file__).resolve().parent.parent


async def _seed(url: str, specs: list[RunSpec]) -> list[int]:
    """Capture the same samples into each run (as enqueue + capture would); train tokens each."""
    bus = await open_bus(BusConfig(servers=(url,), name="bench-distributed"))
    try:
        tokens = []
        for spec in specs:
            refs = await seed_captured_run(bus, spec, n_train=N_TRAIN, n_eval=N_EVAL,
                                           min_len=MIN_LEN, max_len=MAX_LEN, seed=SEED)  # fmt: skip
            tokens.append(sum(r.num_tokens for r in refs["train"]))
        return tokens
    finally:
        await bus.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(run_id: str, url: str, ranks: int, work: Path, fsdp: bool = False) -> dict[str, float]:
    """One training command to the end of data; its ranks' "training done" lines, combined."""
    threads = 2 // ranks
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": str(threads), "SPECFORGE_LOG_FORMAT": "json",
            "SPECFORGE_LOG_LEVEL": "INFO"}  # fmt: skip
    train = ["-m", "specforge_cli", "train", "--run-id", run_id, "--nats", url,
             "--device", "cpu", "--threads", str(threads), "--spec-timeout", "30",
             "--no-resume", *(["--fsdp"] if fsdp else [])]  # fmt: skip
    if ranks == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-port", str(_free_port()), *train]  # fmt: skip
    log_path = work / f"train-{run_id}.log"
    start = time.perf_counter()
    with open(log_path, "wb") as log_file:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                              timeout=TIMEOUT_S, check=False)  # fmt: skip
    command_wall = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])} ... exited {proc.returncode}: {text[-3000:]}")
    done = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "training done":
            done.append(record)
    if len(done) != ranks:
        raise RuntimeError(
            f"expected {ranks} 'training done' lines, got {len(done)}: {text[-3000:]}"
        )
    samples = sum(int(r["samples"]) for r in done)
    walls = [r["samples"] / r["samples_per_s"] for r in done if r["samples_per_s"] > 0]
    tokens = sum(r["tokens_per_s"] * r["samples"] / r["samples_per_s"] for r in done)
    wall = max(walls)
    return {"samples/s": samples / wall, "tokens/s": tokens / wall, "samples": samples,
            "steps": int(done[0]["step"]), "wall": wall, "command wall": command_wall,
            "data wait": max(float(r["data_wait"]) for r in done),
            "per rank samples/s": [float(r["samples_per_s"]) for r in done]}  # fmt: skip


def run() -> BenchReport:
    from transformers.utils import logging as hf_logging

    configure_logging("json", level="WARNING")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    threads_before = torch.get_num_threads()
    load = os.getloadavg()[0]
    suite_start = time.perf_counter()
    try:
        from specforge_common.targets.tiny import make_tiny_target

        with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp, NatsServer() as server:
            work = Path(tmp)
            target_dir = make_tiny_target(work / "target", arch="llama", seed=0, **TARGET)
            spec_a = bench_spec(
                "bench-dist-a", target_dir, work, batch_size=BATCH, max_length=MAX_LEN
            )
            spec_b = bench_spec(
                "bench-dist-b", target_dir, work, batch_size=BATCH // WORLD, max_length=MAX_LEN
            )
            spec_c = bench_spec(
                "bench-dist-c", target_dir, work, batch_size=BATCH // WORLD, max_length=MAX_LEN
            )
            tokens = asyncio.run(_seed(server.url, [spec_a, spec_b, spec_c]))
            ones, twos, shards = [], [], []
            for _ in range(REPS):
                ones.append(_train(spec_a.run_id, server.url, 1, work))
                twos.append(_train(spec_b.run_id, server.url, WORLD, work))
                shards.append(_train(spec_c.run_id, server.url, WORLD, work, fsdp=True))
    finally:
        torch.set_num_threads(threads_before)
        if bars:
            hf_logging.enable_progress_bar()
    load_end = os.getloadavg()[0]
    suite_wall = time.perf_counter() - suite_start

    s, t = "samples/s", "tokens/s"
    one, two, sharded = (max(reps, key=lambda r: r[s]) for reps in (ones, twos, shards))
    report = BenchReport("distributed")
    report.add("1 rank (batch 4, 2 threads): samples/s", one[s], s)
    report.add("1 rank (batch 4, 2 threads): tokens/s", one[t], t)
    report.add(f"{WORLD} gloo ranks (batch 2 each, 1 thread each): samples/s", two[s], s)
    report.add(f"{WORLD} gloo ranks (batch 2 each, 1 thread each): tokens/s", two[t], t)
    report.add(f"{WORLD} gloo ranks FSDP (batch 2 each, 1 thread each): samples/s", sharded[s], s)
    report.ratios["2 ranks vs 1 rank throughput"] = two[s] / one[s]
    report.ratios["2 ranks FSDP vs 2 ranks DDP throughput"] = sharded[s] / two[s]
    report.notes.append(
        f"tiny llama target {TARGET}, fp32 CPU, {os.cpu_count()} cores; two runs with "
        f"identical captured samples (seed {SEED}): {N_TRAIN} train samples of "
        f"{MIN_LEN}-{MAX_LEN} random tokens ({tokens[0]:,} tokens), loss mask on the last 2/3; "
        f"draft vocab 256, ttt_length 3, 1 epoch, global batch {BATCH}, checkpoints only at "
        f"step 0 and the end; file:// store, one embedded nats-server"
    )
    report.notes.append(
        f"1 rank: `specforge train --run-id A` subprocess, OMP_NUM_THREADS=2 --threads 2 "
        f"({one['steps']} steps, {one['samples']} samples, {one['wall']:.2f}s trainer wall, "
        f"{one['command wall']:.1f}s command incl. start-up, data wait "
        f"{100 * one['data wait']:.1f}%); {WORLD} ranks: `python -m torch.distributed.run "
        f"--nproc-per-node {WORLD} -m specforge_cli train --run-id B`, gloo, "
        f"OMP_NUM_THREADS=1 --threads 1 each ({two['steps']} steps, {two['samples']} samples, "
        f"slower rank's wall {two['wall']:.2f}s, {two['command wall']:.1f}s command, per-rank "
        f"samples/s {'/'.join(f'{x:.1f}' for x in two['per rank samples/s'])}, max data wait "
        f"{100 * two['data wait']:.1f}%)"
    )
    report.notes.append(
        "samples/s from each rank's final 'training done' JSON log line (wall from the first "
        "fetch to the final checkpoint, step-0 and final checkpoint writes included); 2 ranks: "
        "both ranks' samples over the slower rank's wall"
    )
    report.notes.append(
        f"{REPS} interleaved repetitions (each run retrained from scratch with --no-resume), "
        f"the best of each counts; samples/s per repetition: 1 rank "
        f"{'/'.join(f'{r[s]:.1f}' for r in ones)}, {WORLD} ranks "
        f"{'/'.join(f'{r[s]:.1f}' for r in twos)}, {WORLD} ranks FSDP "
        f"{'/'.join(f'{r[s]:.1f}' for r in shards)}"
    )
    report.notes.append(
        f"no goal: on a {os.cpu_count()}-core machine the two ranks compete for the same cores "
        f"that the single rank uses with 2 threads, so the ratio measures the overhead of gloo "
        f"all-reduces + sharding more than a speed-up; 1-min load average {load:.2f} at the "
        f"start, {load_end:.2f} at the end (the machine may be shared); suite {suite_wall:.0f}s"
    )
    return report
