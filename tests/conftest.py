"""Shared fixtures: one real nats-server per test session; each test gets its own run id."""

from __future__ import annotations

import itertools
import os

import pytest

from specforge_common.bus import BusConfig, open_bus
from specforge_common.nats_server import NatsServer

_run_counter = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption("--runfaults", action="store_true", help="also run tests marked faults")


# ``cuda`` is the marker of tests that need a CUDA device (``pytest -m cuda`` runs them);
# ``gpu`` is its older name and selects the same tests.
CUDA_MARKERS = ("cuda", "gpu")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: both names must be on the item by then
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    run_slow = config.getoption("--runslow")
    run_faults = config.getoption("--runfaults")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        if "faults" in item.keywords and not run_faults:
            item.add_marker(pytest.mark.skip(reason="faults: run with --runfaults"))
        if any(item.get_closest_marker(name) for name in CUDA_MARKERS):
            for name in CUDA_MARKERS:
                if item.get_closest_marker(name) is None:
                    item.add_marker(name)
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest single-threaded, above all on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory):
    """A real nats-server process with JetStream on a free loopback port."""
    with NatsServer(store_dir=tmp_path_factory.mktemp("jetstream")) as server:
        yield server


@pytest.fixture
def bus_config(nats_server: NatsServer) -> BusConfig:
    return BusConfig(servers=(nats_server.url,), name=f"test-{os.getpid()}")


@pytest.fixture
async def bus(bus_config: BusConfig):
    connection = await open_bus(bus_config)
    yield connection
    await connection.close()


@pytest.fixture
def run_id(request: pytest.FixtureRequest) -> str:
    """A run id unique within the session, so tests never share streams."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
    return f"t{next(_run_counter)}-{name}"
