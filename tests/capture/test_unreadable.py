"""Capture on a live run with unreadable messages on every subject it reads (the prompt queue,
the re-capture queue, the trainers' progress in KV): each is dead-lettered with its subject,
sequence and reason, and every prompt is still captured."""

from __future__ import annotations

import asyncio
from pathlib import Path

from specforge_common.contracts import TrainerProgress
from specforge_common.subjects import kv_subject, progress_key
from specforge_common.targets import HFTargetEngine
from tests.capture.test_worker import (
    TIMEOUT,
    make_spec,
    new_worker,
    samples_log,
    start_run,
    token_tasks,
)
from tests.unreadable import (
    GARBAGE,
    assert_dead_lettered,
    dead_letters,
    garbage,
    publish_raw,
    put_raw,
)


async def test_capture_dead_letters_what_it_cannot_read_and_captures_every_prompt(
    bus, run_id: str, target_dir: Path, engine: HFTargetEngine, tmp_path: Path
) -> None:
    spec = make_spec(run_id, target_dir, tmp_path)
    tasks = token_tasks(spec, 6)
    subjects = await bus.ensure_streams(run_id)
    progress = TrainerProgress(run_id=run_id, rank=7, step=0, samples_consumed=0,
                               last_sequence=0, run_spec_hash=spec.spec_hash())  # fmt: skip
    rows = []  # (subject, sequence, payload) of each unreadable message
    for i, kind in enumerate(GARBAGE):
        for subject in (subjects.prompts, subjects.recapture_prompts):
            data = garbage(kind, tasks[0])
            rows.append((subject, await publish_raw(bus, subject, data), data))
        key, data = progress_key(run_id, 7 + i), garbage(kind, progress)
        rows.append((kv_subject(key), await put_raw(bus, key, data), data))
    await start_run(bus, spec, tasks, summary=True)

    stats = await asyncio.wait_for(new_worker(bus, spec, engine).run(), TIMEOUT)

    refs, ends = await samples_log(bus, run_id)
    assert sorted(r.prompt_id for r in refs) == sorted(t.prompt_id for t in tasks)
    assert len(ends) == 2 and stats.prompts_captured == len(tasks)
    assert_dead_lettered(await dead_letters(bus, run_id), rows)
