"""Where a ``specforge run`` stands, read from the bus as any other terminal would, and the
services it started: OS processes (``specforge run``) or tasks of this process (``--colocated``),
watched the same way — progress until all are done (a live bar on a terminal, log lines
elsewhere), the rest stopped on the first failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from specforge_common.bus import Bus
from specforge_common.contracts import EvalResult, RunSpec, TrainerProgress, TrainSpec
from specforge_common.log import get_logger
from specforge_common.progress import Figure, ProgressBar
from specforge_common.subjects import progress_key
from specforge_trainer.checkpoints import LATEST_NAME, checkpoints_root
from specforge_trainer.schedule import total_optimizer_steps

if TYPE_CHECKING:
    from specforge_common.data.enqueue import EnqueueReport

log = get_logger(command="run")


class Service(Protocol):
    name: str

    def exit_code(self) -> int | None:
        """None while it runs; 0 once it finished its job."""
        ...

    def failure(self) -> str:
        """What to show of a failed service (its log tail, its exception)."""
        ...

    async def stop(self) -> None: ...


@dataclass
class ProcessService:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def exit_code(self) -> int | None:
        return self.process.poll()

    def failure(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            lines = []
        return f"exit code {self.process.returncode}; log {self.log_path}:\n" + "\n".join(lines)

    async def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            await asyncio.to_thread(self.process.wait, 30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class TaskService:
    name: str
    task: asyncio.Task[object]

    def exit_code(self) -> int | None:
        if not self.task.done():
            return None
        return 1 if self.task.cancelled() or self.task.exception() is not None else 0

    def failure(self) -> str:
        return "cancelled" if self.task.cancelled() else repr(self.task.exception())

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def spawn_services(
    args: argparse.Namespace, run_id: str, log_dir: Path, env: dict[str, str]
) -> list[Service]:
    """Capture x N, trainer and evaluator as separate OS processes that exit when done."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 2
    common = ["--run", run_id, "--nats", args.nats, "--device", args.device]
    plan: list[tuple[str, list[str], int]] = [
        (f"capture-{i}",
         ["capture", *common, "--exit-when-done", "--producer-id", f"capture-{i}"],
         max(1, cores // 2))
        for i in range(args.captures)
    ]  # fmt: skip
    plan.append(("trainer", ["train", *common, "--threads-after-capture", str(cores)],
                 max(1, cores // 2)))  # fmt: skip
    plan.append(("evaluator", ["evaluate", *common, "--exit-when-final"], 1))
    services: list[Service] = []
    for name, argv, threads in plan:
        log_path = log_dir / f"{name}.log"
        child_env = env | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(log_path, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "specforge_cli", *argv],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env,
            )  # fmt: skip
        services.append(ProcessService(name, process, log_path))
        log.info("started", service=name, pid=process.pid, log=str(log_path))
    return services


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands, as one look at the bus saw it."""

    prompts_left: int
    samples: int
    progress: TrainerProgress | None
    latest: EvalResult | None

    def line(self) -> str:
        parts = [f"prompts left {self.prompts_left}", f"samples {self.samples}"]
        if self.progress is not None:
            p = self.progress
            parts.append(f"step {p.step} ({p.samples_consumed} samples)")
        if self.latest is not None:
            sim = self.latest.simulated_acceptance_length
            parts.append(f"eval@{self.latest.step} sim-accept-len {sim:.3f}" if sim is not None
                         else f"eval@{self.latest.step}")  # fmt: skip
        return " | ".join(parts)

    def figures(self, enqueued: EnqueueReport | None, train: TrainSpec) -> list[Figure]:
        """The progress bar's figures; totals come from what was enqueued (the trainer's own
        step count is computed from the same numbers)."""
        p, latest = self.progress, self.latest
        if enqueued is not None:
            total = enqueued.train + enqueued.eval
            prompts = Figure("prompts", max(0, total - self.prompts_left), total=total)
            steps_total: int | None = total_optimizer_steps(train, enqueued.train)
        else:
            prompts, steps_total = Figure("prompts left", self.prompts_left), None
        accept = None if latest is None else latest.simulated_acceptance_length
        return [
            prompts,
            Figure("trained", None if p is None else p.samples_consumed),
            Figure("step", None if p is None else p.step, total=steps_total, lead=True),
            Figure("accept-len", accept, digits=2),
        ]


@dataclass
class RunWatcher:
    bus: Bus
    spec: RunSpec
    services: list[Service]
    poll_s: float = 2.0
    enqueued: EnqueueReport | None = None  # gives the bar its totals
    evals: list[EvalResult] = field(default_factory=list)
    progress: TrainerProgress | None = None
    status: RunStatus | None = None
    report: Path | None = None

    async def watch(self) -> bool:
        """Progress until every service is done (a live bar on a terminal, else a log line per
        change); False (the rest stopped) on a failure."""
        with ProgressBar(f"run {self.spec.run_id}", self.figures) as bar:
            return await self._watch(bar)

    async def _watch(self, bar: ProgressBar) -> bool:
        last_line = ""
        while True:
            failed = [s for s in self.services if s.exit_code() not in (None, 0)]
            if failed:
                for service in failed:
                    log.error("service failed", service=service.name, detail=service.failure())
                await asyncio.gather(*(s.stop() for s in self.services))
                return False
            line = await self.status_line()
            if line != last_line and not bar.active:
                log.info(line)
                last_line = line
            if all(s.exit_code() == 0 for s in self.services):
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
        self.status = RunStatus(prompts, samples, self.progress, latest)
        return self.status.line()

    def figures(self) -> list[Figure]:
        """The bar's figures, from the last look at the bus (called from the bar's thread)."""
        status = self.status
        return [] if status is None else status.figures(self.enqueued, self.spec.train)

    async def read_evals(self) -> None:
        run = self.spec.run_id
        self.evals = [r async for _, r in self.bus.records(run, "evals", EvalResult)]
        self.progress = await self.bus.get_record(progress_key(run, 0), TrainerProgress)

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
            verdict_line = pays_for_itself(self.evals[-1], spec.eval.num_draft_tokens)
            if verdict_line:
                lines.append(f"  {verdict_line}")
        latest = checkpoints_root(spec.output_dir, spec.run_id) / LATEST_NAME
        if latest.exists():
            draft_dir = latest.parent / latest.read_text().strip()
            lines.append(f"  exported draft (SGLang layout): {draft_dir}")
        if self.report is not None:
            lines.append(f"  report   {self.report}")
        lines.append(f"  logs     {workdir / 'logs'}")
        print("\n".join(lines))


def pays_for_itself(result: EvalResult, k: int) -> str | None:
    """One line: is speculative decoding with this draft faster than the target alone, here?"""
    speedup = result.metrics.get("speedup")
    if speedup is None or speedup != speedup:
        return None
    chain = f", k = {k}"
    srv = _num(result.serving_acceptance_length, 2)
    if speedup >= 1.0:
        return (
            f"the draft pays for itself on this machine: {speedup:.2f}x the target's own "
            f"decoding speed (serving acceptance length {srv}{chain})"
        )
    return (
        f"the draft does NOT pay for itself on this machine yet: {speedup:.2f}x the "
        f"target's own decoding speed (serving acceptance length {srv}{chain}); "
        "it needs more training"
    )


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"
