"""The parts of ``specforge run`` that are not argument parsing: the spec, the child processes,
and a watcher that reads progress from JetStream (the same view any other terminal has)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import tomllib

from specforge_common.bus import Bus
from specforge_common.config import ConfigError, build_run_spec
from specforge_common.contracts import EvalResult, RunSpec, TrainerProgress
from specforge_common.log import get_logger
from specforge_common.subjects import progress_key

log = get_logger(command="run")

# ``store_uri = "mooncake://auto[?options]"``: a Mooncake master and holder for this run only.
MOONCAKE_AUTO = "mooncake://auto"


def build_spec(
    args: argparse.Namespace, run_id: str, workdir: Path, *, store_uri: str | None = None
) -> RunSpec:
    """The config file (default: the packaged demo), then ``--set``; paths go under ``workdir``."""
    if args.config:
        try:
            data = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read run config {args.config}: {exc}") from None
    else:
        text = resources.files("specforge_common.configs").joinpath("demo.toml").read_text()
        data = tomllib.loads(text)
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


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    final_required: bool = True


def spawn_services(
    args: argparse.Namespace, run_id: str, log_dir: Path, env: dict[str, str]
) -> list[Service]:
    """Capture x N, trainer and evaluator as separate OS processes that exit when done."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 2
    common = ["--run", run_id, "--nats", args.nats, "--device", args.device]
    plan: list[tuple[str, list[str], int]] = [
        (
            f"capture-{i}",
            ["capture", *common, "--exit-when-done", "--producer-id", f"capture-{i}"],
            max(1, cores // 2),
        )  # fmt: skip
        for i in range(args.captures)
    ]
    plan.append(("trainer", ["train", *common], max(1, cores // 2)))
    plan.append(("evaluator", ["evaluate", *common, "--exit-when-final"], 1))
    services = []
    for name, argv, threads in plan:
        log_path = log_dir / f"{name}.log"
        child_env = env | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(log_path, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "specforge_cli", *argv],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env,
            )  # fmt: skip
        services.append(Service(name, process, log_path))
        log.info("started", service=name, pid=process.pid, log=str(log_path))
    return services


@dataclass
class RunWatcher:
    bus: Bus
    spec: RunSpec
    services: list[Service]
    poll_s: float = 2.0
    evals: list[EvalResult] = field(default_factory=list)
    progress: TrainerProgress | None = None
    report: Path | None = None
    _last_line: str = ""

    async def watch(self) -> bool:
        """Print progress until every service exited; False (and stop the rest) on a failure."""
        while True:
            failed = [s for s in self.services if s.process.poll() not in (None, 0)]
            if failed:
                for s in failed:
                    log.error("service failed", service=s.name, code=s.process.returncode,
                              log=str(s.log_path), tail=_tail(s.log_path))  # fmt: skip
                self.stop()
                return False
            line = await self.status_line()
            if line != self._last_line:
                log.info(line)
                self._last_line = line
            if all(s.process.poll() == 0 for s in self.services):
                await self.read_evals()
                return True
            await asyncio.sleep(self.poll_s)

    async def status_line(self) -> str:
        """One line of where the run stands, read from the bus (also keeps ``progress``)."""
        run = self.spec.run_id
        prompts = await self.bus.stream_depth(run, "prompts")
        samples = await self.bus.stream_depth(run, "samples")
        self.progress = await self.bus.get_record(progress_key(run, 0), TrainerProgress)
        latest = await self.bus.last_record(run, "evals", EvalResult)
        parts = [f"prompts left {prompts}", f"samples {samples}"]
        if self.progress is not None:
            p = self.progress
            parts.append(f"step {p.step} ({p.samples_consumed} samples)")
        if latest is not None:
            sim = latest.simulated_acceptance_length
            parts.append(f"eval@{latest.step} sim-accept-len {sim:.3f}" if sim is not None
                         else f"eval@{latest.step}")  # fmt: skip
        return " | ".join(parts)

    async def read_evals(self) -> None:
        run = self.spec.run_id
        self.evals = [r async for _, r in self.bus.records(run, "evals", EvalResult)]
        self.progress = await self.bus.get_record(progress_key(run, 0), TrainerProgress)

    def stop(self) -> None:
        for s in self.services:
            if s.process.poll() is None:
                s.process.terminate()
        for s in self.services:
            try:
                s.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                s.process.kill()

    def print_summary(self, workdir: Path) -> None:
        spec = self.spec
        lines = [f"\nrun {spec.run_id} (spec {spec.spec_hash()})", f"  target   {spec.target.path}"]
        if self.progress is not None:
            p = self.progress
            lines.append(f"  trained  {p.step} optimizer steps on {p.samples_consumed} samples")
        if self.evals:
            lines.append("  evals    step  accuracy per draft position   simulated   serving  "
                         "lossless  speedup")  # fmt: skip
            for r in self.evals:
                accs = " ".join(f"{a:.3f}" for a in r.acceptance_rates)
                sim, srv = r.simulated_acceptance_length, r.serving_acceptance_length
                lossless = {True: "yes", False: "NO", None: "-"}[r.lossless]
                speedup = r.metrics.get("speedup")
                lines.append(
                    f"           {r.step:>4}  {accs:<28} {_num(sim):>9}  {_num(srv):>7}  "
                    f"{lossless:>8}  {_num(speedup, 2):>7}"
                )
            lines.append("           simulated = sum_k prod_{i<=k} acc_i (no bonus token); "
                         "serving = tokens per target verification in real speculative "
                         "decoding (bonus included)")  # fmt: skip
            if any(r.lossless is False for r in self.evals):
                lines.append("  LOSSLESSNESS FAILED on a checkpoint: see the evaluator log")
            before, after = (self.evals[0].simulated_acceptance_length,
                             self.evals[-1].simulated_acceptance_length)  # fmt: skip
            if before is not None and after is not None:
                verdict = "better than" if after > before else "NOT better than"
                lines.append(f"  the trained draft ({after:.4f}) is {verdict} the untrained one "
                             f"({before:.4f})")  # fmt: skip
        latest = Path(spec.output_dir) / spec.run_id / "checkpoints" / "latest"
        if latest.exists():
            draft_dir = latest.parent / latest.read_text().strip()
            lines.append(f"  exported draft (SGLang layout): {draft_dir}")
        if self.report is not None:
            lines.append(f"  report   {self.report}")
        lines.append(f"  logs     {workdir / 'logs'}")
        print("\n".join(lines))

    async def write_report(self) -> None:
        """The run's HTML/markdown report (``specforge report``), while the bus is still up."""
        from specforge_evaluator.report import write_report

        try:
            self.report = (await write_report(self.bus, self.spec.run_id)).html
        except Exception as exc:  # a report is a convenience: never fail the run for it
            log.warning("cannot write the run report", error=repr(exc))

    @property
    def lossless(self) -> bool:
        return not any(r.lossless is False for r in self.evals)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"
