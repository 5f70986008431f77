"""Capture killed mid-batch, after the store put, after the publish; and a full disk."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from specforge_common.targets import HFTargetEngine, make_tiny_target
from tests.capture.test_worker import (
    assert_queue_drained,
    check_samples,
    make_spec,
    samples_log,
    start_run,
    stored_files,
    token_tasks,
)
from tests.faults import KILLED, events, run

N = 12


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("faults-capture") / "tiny", seed=0)


def capture_args(run_id: str, url: str, producer: str) -> list[str]:
    return ["--run", run_id, "--nats", url, "--producer-id", producer, "--exit-when-done"]


@pytest.mark.parametrize(
    "point", ["capture.mid_batch", "capture.after_store_put", "capture.after_publish"]
)
async def test_capture_killed_at_a_point_then_restarted_captures_every_prompt_once(
    point: str, bus, run_id: str, nats_server, target_dir: Path, tmp_path: Path
) -> None:
    """kill -9 on the 3rd forward at ``point``; the next worker gets the dead one's prompts
    after the ack wait. Every prompt: one SampleRef, one stored file, the target's features."""
    spec = make_spec(run_id, target_dir, tmp_path, batch_size=2)
    tasks = token_tasks(spec, N, seed=30)
    await start_run(bus, spec, tasks, summary=True)

    code, _, err = await run("capture", *capture_args(run_id, nats_server.url, "doomed"),
                             fault=f"{point}@3")  # fmt: skip
    assert code == KILLED, err[-3000:]
    before, _ = await samples_log(bus, run_id)
    lag = await bus.consumer_lag(run_id, "prompts", "capture")
    assert lag.num_ack_pending > 0  # the dead worker held prompts nobody acked
    published = 6 if point == "capture.after_publish" else 4  # 2 forwards of 2 (+ the 3rd)
    assert len(before) == published and {r.producer for r in before} == {"doomed"}

    code, _, err = await run("capture", *capture_args(run_id, nats_server.url, "next"))
    assert code == 0, err[-3000:]
    refs, ends = await samples_log(bus, run_id)
    check_samples(spec, HFTargetEngine.from_pretrained(target_dir), tasks, refs)  # once each
    assert sorted(e.split for e in ends) == ["eval", "train"]
    assert len(stored_files(spec)) == N
    await assert_queue_drained(bus, run_id)
    if point == "capture.after_publish":  # republished on redelivery: deduped, not doubled
        assert any(e.get("duplicates") for e in events(err) if "duplicates" in e)


async def test_a_full_disk_naks_with_backoff_and_acks_nothing_unstored(
    bus, run_id: str, nats_server, target_dir: Path, tmp_path: Path
) -> None:
    """The first three store puts fail with ENOSPC: their prompts are handed back (nak with
    backoff), never acked or published; once space is back each is captured exactly once."""
    spec = make_spec(run_id, target_dir, tmp_path, batch_size=2)
    tasks = token_tasks(spec, 8, seed=31)
    await start_run(bus, spec, tasks, summary=True)
    code, _, err = await run("capture", *capture_args(run_id, nats_server.url, "w0"),
                             fault="store.put@1-3:enospc")  # fmt: skip
    assert code == 0, err[-3000:]
    retry = "store/publish failed; prompt handed back for retry"
    naks = [e for e in events(err) if e["event"] == retry]
    assert len(naks) == 6  # 3 forwards of 2 prompts
    assert all(str(errno.ENOSPC) in e["error"] or "No space" in e["error"] for e in naks)
    assert all(e["retry_in_s"] > 0 for e in naks)  # backed off, not hot-looped
    refs, _ = await samples_log(bus, run_id)
    check_samples(spec, HFTargetEngine.from_pretrained(target_dir), tasks, refs)
    assert len(stored_files(spec)) == 8
    await assert_queue_drained(bus, run_id)
