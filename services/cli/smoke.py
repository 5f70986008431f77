"""``specforge smoke``: the data path end to end without a model, in one command.

Starts an embedded nats-server, creates a run, writes synthetic hidden states of a
SmolLM2-135M-sized target (hidden 576, three aux layers + the final one) into a ``file://``
store, publishes their SampleRefs, consumes and verifies every sample as a trainer would, and
replays the samples log from sequence 1. It exercises the contracts, the bus and the store; the
model-driven pipeline (``specforge run``) builds on exactly this path; use this to check a
deployment's NATS and store quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

HIDDEN = 576  # SmolLM2-135M-Instruct


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=200, help="number of samples (200)")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest sample (512)")
    parser.add_argument("--workdir", help="where the store lives (default: a temporary dir)")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    if args.workdir:
        return asyncio.run(_smoke(args, Path(args.workdir)))
    with tempfile.TemporaryDirectory(prefix="specforge-smoke-") as workdir:
        return asyncio.run(_smoke(args, Path(workdir)))


async def _smoke(args: argparse.Namespace, workdir: Path) -> int:
    import torch

    from specforge_common.bus import BusConfig, open_bus
    from specforge_common.contracts import EndOfSplit, RunSpec, SampleRef, TargetSpec
    from specforge_common.featurestore import open_store
    from specforge_common.log import get_logger
    from specforge_common.nats_server import NatsServer

    run_id = f"smoke-{int(time.time())}"
    log = get_logger(command="smoke", run=run_id)
    generator = torch.Generator().manual_seed(args.seed)
    store = open_store(f"file://{workdir / 'features'}")

    with NatsServer(store_dir=workdir / "jetstream") as server:
        log.info("embedded nats-server up", url=server.url)
        async with await open_bus(BusConfig(servers=(server.url,), name="smoke")) as bus:
            subjects = await bus.ensure_streams(run_id)
            spec = await bus.put_run_spec(
                RunSpec(
                    run_id=run_id,
                    target=TargetSpec(path="synthetic-smollm2-135m"),
                    store_uri=store.uri,
                    seed=args.seed,
                )  # fmt: skip
            )
            spec_hash = spec.spec_hash()

            # Capture side: features to the store, SampleRefs to the bus.
            started, nbytes, published = time.perf_counter(), 0, []
            for i in range(args.samples):
                tokens = int(torch.randint(16, args.max_tokens + 1, (1,), generator=generator))
                tensors = {
                    "input_ids": torch.randint(0, 49152, (tokens,), generator=generator),
                    "loss_mask": torch.ones(tokens, dtype=torch.int64),
                    "aux_hidden_states": torch.randn(tokens, 3 * HIDDEN, generator=generator),
                    "hidden_states": torch.randn(tokens, HIDDEN, generator=generator),
                }
                sample_id = f"{run_id}-{i:06d}"
                location = store.put(sample_id, tensors)
                nbytes += location.nbytes
                ref = SampleRef(sample_id=sample_id, run_id=run_id, prompt_id=f"p{i}",
                                split="train", producer="smoke-capture", features=location,
                                num_tokens=tokens, run_spec_hash=spec_hash)  # fmt: skip
                published.append((subjects.samples("train"), ref, sample_id))
                if len(published) == 50 or i == args.samples - 1:
                    await bus.publish_many(published)
                    published = []
                    log.info("captured", samples=i + 1, of=args.samples, mib=nbytes >> 20)
            await bus.publish(subjects.samples("train"), EndOfSplit(
                run_id=run_id, split="train", producer="smoke-capture",
                samples_published=args.samples, run_spec_hash=spec_hash))  # fmt: skip
            capture_s = time.perf_counter() - started

            # Trainer side: consume, fetch and verify every sample, ack.
            consumer = await bus.work_consumer(
                run_id, "samples", "smoke-trainer", SampleRef | EndOfSplit, service="smoke",
                filter_subject=subjects.samples("train"),
            )  # fmt: skip
            started, seen, tokens_seen, done = time.perf_counter(), 0, 0, False
            while not done:
                for delivery in await consumer.fetch(batch=64, timeout=5.0):
                    record = delivery.record
                    if isinstance(record, EndOfSplit):
                        done = True
                    else:
                        tensors = store.get(record.features)  # size + checksum verified
                        if record.run_spec_hash != spec_hash:
                            raise RuntimeError(f"sample {record.sample_id} is from another spec")
                        tokens_seen += int(tensors["input_ids"].numel())
                        seen += 1
                    await delivery.ack()
                log.info("consumed", samples=seen, of=args.samples)
            await consumer.close()
            consume_s = time.perf_counter() - started

            replayed = [seq async for seq, rec in bus.replay(run_id, "train")
                        if isinstance(rec, SampleRef)]  # fmt: skip
            in_order = replayed == sorted(replayed) and len(replayed) == args.samples

    print(f"\nsmoke run {run_id}")
    print(f"  samples captured   {args.samples} ({nbytes / 2**20:.1f} MiB of features, "
          f"{args.samples / capture_s:.0f} samples/s)")  # fmt: skip
    print(f"  samples consumed   {seen} ({tokens_seen} tokens, checksums verified, "
          f"{seen / consume_s:.0f} samples/s)")  # fmt: skip
    print(f"  replay from seq 1  {len(replayed)} samples, in order: {in_order}")
    print(f"  feature store      {store.uri}")
    ok = seen == args.samples and in_order
    print("  result             " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1
