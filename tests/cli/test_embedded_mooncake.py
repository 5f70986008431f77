"""``specforge run``'s ``store_uri = mooncake://auto``: a real master + holder for the block, the
spec rewritten to their address, both stopped at the end -- also when the run fails."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import torch

from specforge_cli.run_setup import embedded_mooncake
from specforge_common.config import ConfigError
from specforge_common.featurestore import open_store
from tests.mooncake_support import needs_mooncake
from tests.support import tiny_run_spec


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_other_store_uris_pass_through_unchanged(tmp_path: Path) -> None:
    spec = tiny_run_spec("r1", tmp_path, tmp_path)
    with embedded_mooncake(spec) as same:
        assert same is spec
    bad = tiny_run_spec("r1", tmp_path, tmp_path, store_uri="mooncake://auto/path")
    with pytest.raises(ConfigError, match="mooncake://auto"), embedded_mooncake(bad):
        pass


@needs_mooncake
def test_auto_starts_a_store_for_the_block_and_stops_it_even_on_failure(tmp_path: Path) -> None:
    auto = "mooncake://auto?holder=64MiB&namespace=emb"
    spec = tiny_run_spec("r1", tmp_path, tmp_path, store_uri=auto)
    with pytest.raises(RuntimeError, match="the run failed"), embedded_mooncake(spec) as real:
        parts = urlsplit(real.store_uri)
        options = dict(parse_qsl(parts.query))
        assert parts.scheme == "mooncake" and parts.hostname == "127.0.0.1"
        assert options["namespace"] == "emb" and "holder" not in options
        store = open_store(real.store_uri)
        location = store.put("s1", {"x": torch.arange(1000)})
        assert torch.equal(store.get(location)["x"], torch.arange(1000))
        assert store.used_bytes() == location.nbytes  # metrics port wired into the URI
        store.close()
        assert not refused(parts.port)
        raise RuntimeError("the run failed")
    assert refused(parts.port) and refused(int(options["metrics"]))
