"""The control plane: typed records over a durable log (see ``docs/architecture.md``).

``open_bus`` connects to NATS JetStream; ``LocalBus`` is the same API in one process. Services
take a ``Bus`` and never see which one they were given.
"""

from __future__ import annotations

from .config import DEFAULT_ACK_WAIT_S, BusConfig, add_bus_arguments, bus_config_from_args
from .local import LocalBus
from .protocol import (
    Bus,
    BusError,
    BusPermissionError,
    ConsumerLag,
    Delivery,
    Published,
    RunSpecConflict,
    StreamState,
    WorkConsumer,
)
from .reads import heartbeat

__all__ = [
    "DEFAULT_ACK_WAIT_S",
    "Bus",
    "BusConfig",
    "BusError",
    "BusPermissionError",
    "ConsumerLag",
    "Delivery",
    "LocalBus",
    "Published",
    "RunSpecConflict",
    "StreamState",
    "WorkConsumer",
    "add_bus_arguments",
    "bus_config_from_args",
    "heartbeat",
    "open_bus",
]


async def open_bus(config: BusConfig | None = None) -> Bus:
    """A connection to NATS JetStream (nats-py is imported here, so in-process runs never do)."""
    from .jetstream import JetStreamBus

    return await JetStreamBus.connect(config)
