"""Byte backpressure against a real Mooncake store: the gate reads the master's allocated bytes
(``used_bytes``), pauses above ``high_water_bytes`` and resumes below ``low_water_bytes``.
Synchronized on the gate's own rounds (``wait_rounds``), never on sleeps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from specforge_capture.backpressure import BackpressureGate
from specforge_common.featurestore import open_store
from specforge_common.featurestore.mooncake import (
    MooncakeFeatureStore,
    MooncakeOptions,
    allocated_bytes,
)
from specforge_common.mooncake_processes import free_port
from tests.mooncake_support import mooncake_master, mooncake_uri  # noqa: F401 - fixture

MIB = 1 << 20


@pytest.fixture(scope="module")
def store(mooncake_master) -> MooncakeFeatureStore:  # noqa: F811 - the imported fixture
    """One client for the module (a close takes ~1 s); each test deletes what it put."""
    opened = open_store(mooncake_uri(mooncake_master))
    yield opened
    opened.close()


def put_mib(store, name: str):
    """One sample of exactly 1 MiB of tensor bytes (plus the codec's small header)."""
    return store.put(name, {"x": torch.full((MIB,), ord(name[-1]), dtype=torch.uint8)})


async def test_used_bytes_is_the_masters_allocated_bytes(store: MooncakeFeatureStore) -> None:
    before = store.used_bytes()
    location = put_mib(store, "size-a")
    assert store.used_bytes() - before == location.nbytes > MIB
    store.delete(location)
    assert store.used_bytes() == before


async def test_gate_pauses_above_high_water_bytes_and_resumes_below_low_water_bytes(
    bus, run_id: str, store: MooncakeFeatureStore
) -> None:
    base = store.used_bytes()
    high, low = base + 3 * MIB + MIB // 2, base + MIB + MIB // 2
    gate = BackpressureGate(bus, run_id, high_water=0, low_water=0, store=store,
                            high_water_bytes=high, low_water_bytes=low, poll_s=0.01,
                            check_interval_s=0.0)  # fmt: skip
    locations = [put_mib(store, f"s{i}") for i in range(3)]
    assert await asyncio.wait_for(gate.wait(), 10) is True  # 3 MiB: below high water
    assert not gate.paused and gate.last_used_bytes == base + sum(x.nbytes for x in locations)

    locations.append(put_mib(store, "s3"))  # 4 MiB: above high water
    waiting = asyncio.create_task(gate.wait())
    await asyncio.wait_for(gate.wait_rounds(gate.rounds + 1), 10)
    assert gate.paused and gate.last_used_bytes > high and gate.checks == 0

    for location in locations[:2]:  # 2 MiB: below high water, not below low water
        store.delete(location)
    rounds = gate.rounds
    await asyncio.wait_for(gate.wait_rounds(rounds + 2), 10)  # a round that began after that
    assert gate.paused and not waiting.done() and low < gate.last_used_bytes < high

    store.delete(locations[2])  # 1 MiB: below low water
    assert await asyncio.wait_for(waiting, 10) is True
    assert not gate.paused and gate.last_used_bytes == base + locations[3].nbytes < low


async def test_a_stop_while_paused_for_bytes_returns_false(
    bus, run_id: str, store: MooncakeFeatureStore
) -> None:
    base = store.used_bytes()
    location = put_mib(store, "stop")
    gate = BackpressureGate(bus, run_id, high_water=0, low_water=0, store=store,
                            high_water_bytes=base + 1, low_water_bytes=base, poll_s=0.01,
                            check_interval_s=0.0)  # fmt: skip
    stop = asyncio.Event()
    waiting = asyncio.create_task(gate.wait(stop))
    await asyncio.wait_for(gate.wait_rounds(1), 10)
    assert gate.paused
    stop.set()
    assert await asyncio.wait_for(waiting, 10) is False and not gate.paused
    store.delete(location)


async def test_a_store_that_cannot_tell_its_size_never_pauses_capture(
    bus,
    run_id: str,
    tmp_path: Path,
    mooncake_master,  # noqa: F811
) -> None:
    # No metrics server where the URI says: used_bytes() is None, so the gate lets capture go.
    blind = open_store(f"{mooncake_master.store_uri}?metrics={free_port()}")
    assert blind.used_bytes() is None
    gate = BackpressureGate(bus, run_id, high_water=0, low_water=0, store=blind,
                            high_water_bytes=1, low_water_bytes=1,
                            check_interval_s=0.0)  # fmt: skip
    assert gate.enabled and await asyncio.wait_for(gate.wait(), 10) is True
    assert gate.byte_checks == 1 and not gate.paused
    unset = BackpressureGate(bus, run_id, high_water=0, low_water=0, store=blind,
                             high_water_bytes=100)  # fmt: skip
    assert unset.low_water_bytes == 50  # an unset low mark: half the high one, not 0 (never)
    blind.close()
    # A store without used_bytes at all (file://): the byte measure is off from the start.
    files = open_store(f"file://{tmp_path}")
    gate = BackpressureGate(bus, run_id, high_water=0, low_water=0, store=files,
                            high_water_bytes=1, low_water_bytes=1)  # fmt: skip
    assert not gate.enabled and await gate.wait() is True and gate.byte_checks == 0


def test_the_metrics_option_names_where_used_bytes_reads() -> None:
    parse = MooncakeOptions.parse
    assert parse("mooncake://10.0.0.5:50051").metrics == "10.0.0.5:9003"  # the master default
    assert parse("mooncake://10.0.0.5:50051?metrics=9100").metrics == "10.0.0.5:9100"
    assert parse("mooncake://10.0.0.5:50051?metrics=m.lan:80").metrics == "m.lan:80"
    for bad in ("x", ":9100", "70000", "h:"):
        with pytest.raises(ValueError, match=r"metrics must be \[HOST:\]PORT"):
            parse(f"mooncake://10.0.0.5:50051?metrics={bad}")
    text = "# HELP master_allocated_bytes x\nmaster_allocated_bytes_total 5\n"
    text += "master_allocated_bytes 42\n"
    assert allocated_bytes(text) == 42 and allocated_bytes("other 1\n") is None
