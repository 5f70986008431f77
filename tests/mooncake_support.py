"""A real Mooncake master + segment holder for tests that use ``mooncake://`` as their store.

Import ``mooncake_master`` into a test module to get one master and one holder (256 MiB) for
that module; ``mooncake_uri`` gives each test its own namespace, so tests never see each other's
samples, plus the master's metrics port (what ``used_bytes`` reads). Tests skip, with the reason,
when Mooncake cannot run on this machine (wheel, binaries or libibverbs missing).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from specforge_common.mooncake_processes import MooncakeHolder, MooncakeMaster, missing_reason

REASON = missing_reason()
needs_mooncake = pytest.mark.skipif(REASON is not None, reason=REASON or "")
SEGMENT = 256 << 20


@pytest.fixture(scope="module")
def mooncake_master() -> Iterator[MooncakeMaster]:
    if REASON is not None:
        pytest.skip(REASON)
    with MooncakeMaster() as master, MooncakeHolder(master.address, segment_size=SEGMENT):
        yield master


def mooncake_uri(master: MooncakeMaster, namespace: str | None = None) -> str:
    """A store URI of ``master`` in a fresh (or the given) namespace."""
    namespace = namespace or f"t-{uuid.uuid4().hex[:12]}"
    return f"{master.store_uri}?namespace={namespace}&metrics={master.metrics_port}"
