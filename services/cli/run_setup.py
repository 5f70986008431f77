"""What a ``specforge run`` starts from: its spec (a config file, the packaged demo by default)
and, for ``store_uri = mooncake://auto``, a Mooncake store that lives as long as the run."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from specforge_common.config import ConfigError, build_run_spec, launch_settings, read_config
from specforge_common.contracts import RunSpec
from specforge_common.log import get_logger

log = get_logger(command="run")

# ``store_uri = "mooncake://auto[?options]"``: a Mooncake master and holder for this run only.
MOONCAKE_AUTO = "mooncake://auto"


DEFAULT_SOURCE, DEFAULT_LIMIT = "sharegpt", 48


def build_spec(
    args: argparse.Namespace, run_id: str, workdir: Path, *, store_uri: str | None = None
) -> RunSpec:
    """The config (a file or a packaged name; default: the demo), then ``--set``; paths go under
    ``workdir``. The config's ``[launch]`` table fills ``args.source`` / ``args.limit`` where
    the command line left them out."""
    data = read_config(args.config or "demo")
    launch = launch_settings(data)
    if args.source is None:
        args.source = launch.get("source", DEFAULT_SOURCE)
    if args.limit is None:
        args.limit = launch.get("limit", DEFAULT_LIMIT)
    data["run_id"] = run_id
    data.setdefault("store_uri", store_uri or f"file://{workdir / 'features'}")
    data.setdefault("output_dir", str(workdir.parent))
    overrides = list(args.overrides)
    target_given = "path" in data.get("target", {}) or any(
        o.startswith("target.path=") for o in overrides
    )
    if not target_given:
        from specforge_common.targets.smollm2 import prepare_smollm2

        log.info("default target SmolLM2-135M-Instruct (converted from its GGUF once, ~30 s)")
        data.setdefault("target", {})["path"] = str(prepare_smollm2())
    return build_run_spec(data, overrides)


@contextmanager
def embedded_mooncake(spec: RunSpec) -> Iterator[RunSpec]:
    """For ``store_uri = mooncake://auto[?holder=SIZE&OPTIONS]``: start a Mooncake master and a
    segment holder on loopback (``holder`` = its segment size, default 4 GiB; other options go
    to the store URI) and yield the spec with the real ``mooncake://127.0.0.1:PORT`` URI; both
    stop when the block ends, failed or not. Any other spec is yielded unchanged."""
    parts = urlsplit(spec.store_uri)
    if f"{parts.scheme}://{parts.netloc}" != MOONCAKE_AUTO:
        yield spec
        return
    import msgspec

    from specforge_common.mooncake_processes import DEFAULT_SEGMENT, MooncakeHolder, MooncakeMaster

    if parts.path not in ("", "/") or parts.fragment:
        raise ConfigError(f"store_uri {spec.store_uri!r}: use {MOONCAKE_AUTO}[?options]")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    segment = options.pop("holder", DEFAULT_SEGMENT)
    with MooncakeMaster() as master, MooncakeHolder(master.address, segment_size=segment):
        options.setdefault("metrics", str(master.metrics_port))
        uri = f"{master.store_uri}?{urlencode(options)}"
        log.info("embedded mooncake store up", store=uri, holder_segment=str(segment))
        yield msgspec.structs.replace(spec, store_uri=uri)
    log.info("embedded mooncake store stopped", store=uri)
