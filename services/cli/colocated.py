"""``specforge run --colocated``: the whole run in this one process, no broker, no shared disk.

Enqueue, capture, trainer and evaluator are the same classes the services run, handed one
in-process ``LocalBus`` and (by default) one ``mem://<run>`` feature store; their compute runs in
worker threads of this process. Nothing else changes: the records, sequences, checkpoints and
events are those of a disaggregated run, so a colocated run is a faithful small copy of one (the
trainer's equivalence test checks that bit for bit). Features and bus contents live only as long
as the process; checkpoints, logs and the report are written under the work directory.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from specforge_common.contracts import RunSpec
from specforge_common.log import get_logger

log = get_logger(command="run", mode="colocated")


async def run_colocated(args: argparse.Namespace, spec: RunSpec, workdir: Path) -> int:
    from specforge_capture.worker import CaptureWorker
    from specforge_common.bus import LocalBus
    from specforge_common.data.enqueue import enqueue
    from specforge_common.featurestore import open_store
    from specforge_common.targets import HFTargetEngine
    from specforge_evaluator.service import Evaluator
    from specforge_trainer.loop import Trainer

    from .watch import RunWatcher, TaskService

    device = args.device
    async with LocalBus() as bus:
        await bus.ensure_streams(spec.run_id)
        await bus.put_run_spec(spec)
        report = await enqueue(bus, spec, args.source, limit=args.limit)
        log.info("prompts enqueued", train=report.train, eval=report.eval,
                 skipped=len(report.skipped), duplicates=report.duplicates)  # fmt: skip
        store = open_store(spec.store_uri)
        engine = await asyncio.to_thread(HFTargetEngine.for_run, spec, device=device)
        jobs = {
            "capture": CaptureWorker(bus, spec, engine, store, producer_id="capture-0",
                                     exit_when_done=True).run(),
            "trainer": Trainer(bus, spec.run_id, device=device).run(),
            "evaluator": Evaluator(bus, spec, store, device=device, exit_when_final=True).run(),
        }  # fmt: skip
        services = [TaskService(name, asyncio.create_task(job, name=name))
                    for name, job in jobs.items()]  # fmt: skip
        watcher = RunWatcher(bus, spec, services, poll_s=0.5, enqueued=report)
        ok = await watcher.watch()
        await watcher.write_report()
        watcher.print_summary(workdir)
        store.close()
        return 0 if ok and watcher.lossless else 1
