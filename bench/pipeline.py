"""End to end on a tiny target: capture samples/s, trainer samples/s and the trainer's data wait.

One embedded nats-server, a ``file://`` feature store and a seeded tiny Llama target (hidden
128, 8 layers, 4/2 heads, MLP 256, vocab 512), all in a temp dir. Each run is published the way
enqueue does it, without a dataset: the RunSpec, ``N_PROMPTS`` pre-tokenized PromptTasks (random
ids, 64-128 tokens, loss mask on the last 2/3, every ``EVAL_EVERY``-th one in the eval split),
then the draft vocab map (from the train split's loss-masked tokens) and the ``EnqueueSummary``.

- capture alone: ``CaptureWorker(..., exit_when_done=True).run()`` in this process, timed from
  start to exit (the target is loaded before the clock starts);
- (a) ready data: ``Trainer(bus, run).run()`` in this process after that capture finished, so
  every sample is already in the store: the trainer's own rate and its data-wait fraction;
- both of these with 2 torch threads and again with 1 (the control for (b));
- (b) coupled: another run whose capture is a subprocess (``specforge capture --exit-when-done
  --threads 1``, its ``main()`` called directly) while the trainer runs here with 1 torch
  thread. Both in one event loop would not be representative (capture's forwards and the
  trainer's steps would share one process and one loop), so they are two processes, one core
  each. The trainer's clock starts once the first SampleRef is in the stream, so the capture
  process's import/load time is not counted as wait.

Threads: ``torch.set_num_threads`` is per OS thread once a thread has used torch, and the
services compute in ``asyncio.to_thread``, so every measurement runs with a fresh default
executor whose threads set the count themselves (see ``_torch_threads``).

The samples/s and data wait are the trainer's own ``TrainResult`` (wall from its first fetch to
its final checkpoint, which includes the step-0 and final checkpoints; wait = time blocked in
the sample stream / (compute + wait)). ``REPS`` repetitions, each on fresh runs: rates are the
best repetition's, data waits the median repetition's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench.report import BenchReport
from specforge_common.bus import Bus, BusConfig, open_bus
from specforge_common.contracts import (
    DraftSpec,
    EnqueueSummary,
    EvalSpec,
    PromptTask,
    RunSpec,
    SampleRef,
    TargetSpec,
    TrainSpec,
)
from specforge_common.featurestore import open_store
from specforge_common.log import configure_logging
from specforge_common.nats_server import NatsServer
from specforge_common.subjects import RunSubjects, enqueue_key

N_PROMPTS = 200
EVAL_EVERY = 25  # every 25th prompt goes to the eval split: 192 train, 8 eval
MIN_LEN, MAX_LEN = 64, 128
THREADS_ALONE = 2  # torch threads when capture or trainer has the machine to itself
THREADS_COUPLED = 1  # torch threads of each process in the coupled run (2 cores, 2 processes)
# Rates: the best repetition (interference only slows a case down). Data wait: the median
# repetition, so one stall caused by another process on the machine neither hides nor dominates.
REPS = 3
GOAL_BUSY = 0.95  # 1 - data-wait fraction with ready data
TARGET = dict(
    vocab_size=512,
    hidden_size=128,
    num_layers=8,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=256,
)
ROOT = Path(__file__).resolve().parent.parent


def bench_spec(
    run_id: str, target_dir: Path, work: Path, *, batch_size: int = 4, max_length: int = 128
) -> RunSpec:
    """The tiny-target run the pipeline and distributed suites train: 1 epoch, checkpoints only
    at step 0 and the end, a file:// store and outputs under ``work``."""
    return RunSpec(
        run_id=run_id,
        target=TargetSpec(path=str(target_dir)),
        draft=DraftSpec(draft_vocab_size=256),
        train=TrainSpec(
            learning_rate=3e-3,
            ttt_length=3,
            warmup_ratio=0.0,
            batch_size=batch_size,
            epochs=1,
            checkpoint_every=100_000,  # only the step-0 and the final checkpoint
            log_every=10,
        ),
        eval=EvalSpec(max_samples=8),
        max_length=max_length,
        store_uri=f"file://{work / 'features'}",
        output_dir=str(work / "runs"),
    )


async def _publish_run(bus: Bus, spec: RunSpec, seed: int) -> int:
    """What enqueue does: spec, prompt tasks, vocab map, summary. Returns the prompt tokens."""
    from specforge_common.eagle3.vocab import TokenCounter, build_vocab_map

    run = spec.run_id
    subjects: RunSubjects = await bus.ensure_streams(run)
    await bus.put_run_spec(spec)
    spec_hash = spec.spec_hash()
    rng = random.Random(seed)
    vocab = TARGET["vocab_size"]
    counter = TokenCounter()
    tasks: list[PromptTask] = []
    splits = {"train": 0, "eval": 0}
    tokens = 0
    for i in range(N_PROMPTS):
        split = "eval" if i % EVAL_EVERY == EVAL_EVERY - 1 else "train"
        length = rng.randint(MIN_LEN, MAX_LEN)
        ids = [rng.randrange(3, vocab) for _ in range(length)]  # no special tokens
        mask = [0] * (length // 3) + [1] * (length - length // 3)  # the "assistant" part
        tasks.append(
            PromptTask(
                run_id=run,
                prompt_id=f"p{i:04d}",
                split=split,
                input_ids=ids,
                loss_mask=mask,
                loss_mask_policy="given",
                run_spec_hash=spec_hash,
            )
        )
        splits[split] += 1
        tokens += length
        if split == "train":
            counter.update(ids, mask, spec.max_length)
    await bus.publish_many((subjects.prompts, t, f"prompt:{run}:{t.prompt_id}") for t in tasks)
    # Vocab map + EnqueueSummary exactly as tests/support.py::seed_captured_run writes them.
    store = open_store(spec.store_uri)
    vocab_map = build_vocab_map(counter.counts, vocab, spec.draft.draft_vocab_size)
    vocab_location = store.put(f"{run}-vocab-map", {"d2t": vocab_map.d2t, "t2d": vocab_map.t2d})
    summary = EnqueueSummary(
        run_id=run,
        sources=["bench"],
        train=splits["train"],
        eval=splits["eval"],
        skipped=0,
        vocab_map=vocab_location,
        vocab_map_hash=vocab_map.hash(),
        tokens_counted=counter.num_tokens,
        run_spec_hash=spec_hash,
    )
    await bus.put_record(enqueue_key(run), summary, create_only=True)
    return tokens


async def _sample_times(bus: Bus, run: str) -> list[float]:
    """``created_at`` of every SampleRef of the run (both splits)."""
    out = []
    for split in ("train", "eval"):
        async for _seq, record in bus.replay(run, split):
            if isinstance(record, SampleRef):
                out.append(record.created_at)
    return out


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for this thread AND the threads the services compute in.

    torch's thread count is per OS thread once a thread has used it: a later
    ``torch.set_num_threads`` in the main thread does not reach the event loop's default
    executor, where ``asyncio.to_thread`` runs capture's forwards and the trainer's steps. So
    each measurement gets a fresh default executor whose threads set ``n`` themselves.
    """
    torch.set_num_threads(n)
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(thread_name_prefix=f"bench-{n}t", initializer=torch.set_num_threads,
                              initargs=(n,))  # fmt: skip
    loop.set_default_executor(pool)
    try:
        yield
    finally:
        loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="bench-idle"))
        pool.shutdown(wait=True)


async def _capture_alone(bus: Bus, spec: RunSpec, engine) -> dict[str, float]:
    """The in-process capture worker on a freshly published run, timed from start to exit."""
    from specforge_capture.worker import CaptureWorker

    store = open_store(spec.store_uri)
    worker = CaptureWorker(bus, spec, engine, store, producer_id="bench", exit_when_done=True)
    start, wall_start = time.perf_counter(), time.time()
    stats = await worker.run()
    wall = time.perf_counter() - start
    times = await _sample_times(bus, spec.run_id)
    return {"samples/s": stats.prompts_captured / wall, "tokens/s": stats.tokens / wall,
            "wall": wall, "forward_s": stats.forward_s, "last": max(times) - wall_start,
            "span samples/s": _span_rate(times)}  # fmt: skip


def _span_rate(times: list[float]) -> float:
    """SampleRefs per second between the first and the last one's ``created_at``."""
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else float("nan")


def _train_result(res: Any, batch_size: int) -> dict[str, float]:
    """The TrainResult's rates and waits, plus where the waiting happened: each 10-step log
    window's wait (its fraction x its wall) and the rest, which is the first batch's fetch."""
    windows_wait, previous = 0.0, 0
    for entry in res.history:
        samples = (entry["step"] - previous) * batch_size
        previous = entry["step"]
        windows_wait += entry["data_wait"] * samples / max(entry["samples_per_s"], 1e-9)
    return {"samples/s": res.samples_per_s, "tokens/s": res.tokens_per_s,
            "wait": res.data_wait_fraction, "wait_s": res.stream["wait_s"],
            "first batch wait_s": max(res.stream["wait_s"] - windows_wait, 0.0),
            "steps": res.step, "samples": res.samples_consumed,
            "window wait max": max((e["data_wait"] for e in res.history), default=0.0)}  # fmt: skip


async def _train_alone(bus: Bus, run: str) -> dict[str, float]:
    """The in-process trainer on a run whose capture already finished (ready data)."""
    from specforge_trainer.loop import Trainer

    trainer = Trainer(bus, run)
    await trainer.setup()  # loads the target head/embedding; outside TrainResult's clock anyway
    return _train_result(await trainer.run(), trainer.spec.train.batch_size)


async def _coupled(bus: Bus, url: str, spec: RunSpec, work: Path) -> dict[str, float]:
    """Capture as a subprocess and the trainer here, concurrently."""
    from specforge_trainer.loop import Trainer

    trainer = Trainer(bus, spec.run_id)
    await trainer.setup()
    log_path = work / f"capture-{spec.run_id}.log"
    cmd = [sys.executable, "-m", "specforge_cli", "capture", "--run", spec.run_id,
           "--nats", url,
           "--exit-when-done", "--threads", str(THREADS_COUPLED)]  # fmt: skip
    env = os.environ | {"SPECFORGE_LOG_LEVEL": "WARNING"}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=log_file)
        try:
            deadline = time.monotonic() + 60
            while await bus.stream_depth(spec.run_id, "samples") == 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"capture subprocess produced no sample (rc={proc.poll()}): "
                        f"{log_path.read_text()[-2000:]}"
                    )
                await asyncio.sleep(0.05)
            trained_from = time.time()
            res = await trainer.run()
            rc = await asyncio.to_thread(proc.wait, 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if rc != 0:
        raise RuntimeError(f"capture subprocess exited {rc}: {log_path.read_text()[-2000:]}")
    out = _train_result(res, trainer.spec.train.batch_size)
    times = await _sample_times(bus, spec.run_id)
    out["capture samples/s"] = _span_rate(times)
    out["overlap"] = max(times) - trained_from  # trainer time with capture still running
    return out


async def _measure(url: str, target_dir: Path, work: Path) -> dict[str, list[dict[str, float]]]:
    """Every measurement, once per repetition, each on its own freshly published run."""
    from specforge_common.targets import HFTargetEngine

    m: dict[str, list[dict[str, float]]] = {}
    tokens: list[float] = []
    bus = await open_bus(BusConfig(servers=(url,), name="bench-pipeline"))
    try:
        engine = HFTargetEngine.from_pretrained(target_dir)
        for rep in range(REPS):
            specs = {
                t: bench_spec(f"bench-pipe-{t}-{rep}", target_dir, work) for t in ("a2", "a1", "b")
            }
            for i, spec in enumerate(specs.values()):
                tokens.append(await _publish_run(bus, spec, seed=10 * rep + i))
            for threads, tag in ((THREADS_ALONE, "a2"), (THREADS_COUPLED, "a1")):
                with _torch_threads(threads):
                    capture = await _capture_alone(bus, specs[tag], engine)
                    trained = await _train_alone(bus, specs[tag].run_id)
                m.setdefault(f"capture {threads}t", []).append(capture)
                m.setdefault(f"train {threads}t", []).append(trained)
            with _torch_threads(THREADS_COUPLED):
                m.setdefault("coupled", []).append(await _coupled(bus, url, specs["b"], work))
    finally:
        await bus.close()
    m["tokens"] = [{"min": min(tokens), "max": max(tokens)}]
    return m


def run() -> BenchReport:
    from transformers.utils import logging as hf_logging

    # The services' info lines and HF's progress bars would bury the table. Services' modules
    # are imported lazily, after this, so their module-level loggers get this level too.
    configure_logging("json", level="WARNING")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    threads_before = torch.get_num_threads()
    load = os.getloadavg()[0]
    try:
        from specforge_common.targets.tiny import make_tiny_target

        with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp, NatsServer() as server:
            work = Path(tmp)
            target_dir = make_tiny_target(work / "target", arch="llama", seed=0, **TARGET)
            m = asyncio.run(_measure(server.url, target_dir, work))
    finally:
        load_end = os.getloadavg()[0]
        torch.set_num_threads(threads_before)
        if bars:
            hf_logging.enable_progress_bar()

    def best(key: str) -> dict[str, float]:
        return max(m[key], key=lambda r: r["samples/s"])

    def per_rep(key: str, field: str = "samples/s", scale: float = 1.0) -> str:
        return "/".join(f"{scale * r[field]:.1f}" for r in m[key])

    def median_wait(key: str) -> dict[str, float]:
        return sorted(m[key], key=lambda r: r["wait"])[len(m[key]) // 2]

    c2, c1, t2, t1, b = (best(k) for k in ("capture 2t", "capture 1t", "train 2t", "train 1t",
                                           "coupled"))  # fmt: skip
    w2, w1, wb = (median_wait(k) for k in ("train 2t", "train 1t", "coupled"))
    t, s = "tokens/s", "samples/s"
    report = BenchReport("pipeline")
    report.add(f"capture alone, {THREADS_ALONE} threads: samples/s", c2[s], s)
    report.add(f"capture alone, {THREADS_ALONE} threads: tokens/s", c2[t], t)
    report.add(f"capture alone, {THREADS_COUPLED} thread: samples/s", c1[s], s)
    report.add(f"trainer (a) ready data, {THREADS_ALONE} threads: samples/s", t2[s], s)
    report.add(f"trainer (a) ready data, {THREADS_ALONE} threads: tokens/s", t2[t], t)
    report.add(f"trainer (a) ready data, {THREADS_ALONE} threads: data wait", 100 * w2["wait"], "%")
    report.add(f"trainer (a) ready data, {THREADS_COUPLED} thread: samples/s", t1[s], s)
    report.add(
        f"trainer (a) ready data, {THREADS_COUPLED} thread: data wait", 100 * w1["wait"], "%"
    )
    report.add("trainer (b) with capture running: samples/s", b[s], s)
    report.add("trainer (b) with capture running: tokens/s", b[t], t)
    report.add("trainer (b) with capture running: data wait", 100 * wb["wait"], "%")
    report.add("capture (b) next to the trainer: samples/s *", b["capture samples/s"], s)

    name = "trainer busy fraction (ready data)"
    report.ratios[name] = 1.0 - w2["wait"]
    report.goals[name] = GOAL_BUSY

    tokens = m["tokens"][0]
    report.notes.append(
        f"tiny llama target {TARGET}, fp32 CPU; per run {N_PROMPTS} prefill prompts "
        f"({N_PROMPTS - N_PROMPTS // EVAL_EVERY} train / {N_PROMPTS // EVAL_EVERY} eval), "
        f"{MIN_LEN}-{MAX_LEN} random tokens ({int(tokens['min']):,}-{int(tokens['max']):,} "
        f"per run), loss mask on the last 2/3; max_length 128, draft vocab 256, train batch 4, "
        f"ttt_length 3, 1 epoch, checkpoints only at step 0 and the end; capture batch 4; "
        f"file:// store and JetStream file storage in a temp dir; a fresh run per measurement"
    )
    per_rep_rates = (
        f"capture {THREADS_ALONE}t {per_rep('capture 2t')}, {THREADS_COUPLED}t "
        f"{per_rep('capture 1t')}; trainer (a) {THREADS_ALONE}t {per_rep('train 2t')}, "
        f"{THREADS_COUPLED}t {per_rep('train 1t')}, (b) {per_rep('coupled')}"
    )
    per_rep_waits = (
        f"(a) {THREADS_ALONE}t {per_rep('train 2t', 'wait', 100)}, {THREADS_COUPLED}t "
        f"{per_rep('train 1t', 'wait', 100)}, (b) {per_rep('coupled', 'wait', 100)}"
    )
    report.notes.append(
        f"{REPS} repetitions: rates are the best repetition's (tokens/s from the same one), "
        f"data wait the median repetition's; 1-min load average {load:.2f} at the start, "
        f"{load_end:.2f} at the end, on {os.cpu_count()} cores (the machine may be shared). "
        f"Per repetition, samples/s: {per_rep_rates}; data wait %: {per_rep_waits}"
    )
    report.notes.append(
        f"threads: torch.set_num_threads({THREADS_ALONE}) or ({THREADS_COUPLED}) as each row "
        f"says, in the main thread and in fresh executor threads (torch's count is per thread, "
        f"asyncio.to_thread runs the compute); capture and trainer in this process, alone; "
        f"(b): trainer here with torch.set_num_threads({THREADS_COUPLED}) while capture runs "
        f"as a `specforge capture --threads {THREADS_COUPLED} --exit-when-done` subprocess "
        f"(the command's main() run directly) on "
        f"the same 2 cores; the trainer's clock starts at the first SampleRef (capture's "
        f"import/load time is not wait)"
    )
    tails = {k: "/".join(f"{r['wall'] - r['last']:.2f}" for r in m[k]) for k in m if "capture" in k}
    report.notes.append(
        f"capture alone ({THREADS_ALONE} threads): {c2['wall']:.2f}s start to exit, "
        f"{c2['forward_s']:.2f}s of it in forwards, the last SampleRef at {c2['last']:.2f}s; "
        f"the tail after it is the empty fetch (1 s timeout) that detects the end of data, the "
        f"end-of-split markers and shutdown: per repetition {tails['capture 2t']}s "
        f"({THREADS_ALONE}t), {tails['capture 1t']}s ({THREADS_COUPLED}t). * = SampleRefs "
        f"over their created_at span (no start-up, no tail): {c2['span samples/s']:.1f} "
        f"samples/s for capture alone {THREADS_ALONE}t, {c1['span samples/s']:.1f} for "
        f"{THREADS_COUPLED}t"
    )
    report.notes.append(
        f"where the trainer waits (median repetitions): (a) {THREADS_ALONE}t "
        f"{int(w2['steps'])} steps, {w2['wait_s']:.3f}s blocked in total, "
        f"{w2['first batch wait_s']:.3f}s of it for the first batch (replay subscription + "
        f"first store reads), max over its 10-step log windows "
        f"{100 * w2['window wait max']:.2f}%; (b) {wb['wait_s']:.3f}s blocked, "
        f"{wb['first batch wait_s']:.3f}s for the first batch, window max "
        f"{100 * wb['window wait max']:.2f}%, capture still running for the first "
        f"{wb['overlap']:.1f}s of the trainer's run"
    )
    report.notes.append(
        "trainer samples/s and data wait are the TrainResult's: wall from the first fetch to "
        "the final checkpoint (step-0 and final checkpoint writes included), wait = time "
        "blocked in the sample stream / (compute + wait)"
    )
    return report
