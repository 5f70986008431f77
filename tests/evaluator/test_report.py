"""``specforge report``: the results page, rendered from plain records and through a real bus."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import specforge_cli.main as cli
from specforge_common.contracts import CheckpointEvent, EvalResult
from specforge_evaluator.report import (
    LENGTH_PNG,
    LOSS_PNG,
    POSITIONS_PNG,
    SERVING_LABEL,
    SIMULATED_LABEL,
    read_train_metrics,
    render_report,
)
from tests.support import tiny_run_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PNGS = (LOSS_PNG, POSITIONS_PNG, LENGTH_PNG)


def simulated_length(rates: list[float]) -> float:
    """sum_k prod_{i<=k} acc_i (no bonus token), written out independently of the evaluator."""
    total, running = 0.0, 1.0
    for rate in rates:
        running *= rate
        total += running
    return total


def checkpoint(run_id: str, step: int, loss: float, *, final: bool = False) -> CheckpointEvent:
    return CheckpointEvent(
        run_id=run_id, step=step, final=final, samples_consumed=2 * step,
        last_sequence={0: step}, checkpoint_uri=f"file:///ckpt/step{step}",
        checkpoint_sha256=f"{step:064x}", metrics={"loss": loss, "acc_0": 0.5},
        run_spec_hash="h",
    )  # fmt: skip


def evaluation(
    run_id: str,
    step: int,
    rates: list[float],
    *,
    serving: float | None = None,
    serving_rates: list[float] | None = None,
    lossless: bool | None = None,
    speedup: float | None = None,
) -> EvalResult:
    return EvalResult(
        run_id=run_id, step=step, checkpoint_sha256=f"{step:064x}", acceptance_rates=rates,
        simulated_acceptance_length=simulated_length(rates), serving_acceptance_length=serving,
        serving_acceptance_rates=serving_rates or [], lossless=lossless,
        metrics={} if speedup is None else {"speedup": speedup, "k": 3.0, "temperature": 0.0},
        run_spec_hash="h",
    )  # fmt: skip


def served(length: float, rates: list[float], lossless: bool, speedup: float) -> dict:
    return dict(serving=length, serving_rates=rates, lossless=lossless, speedup=speedup)


def make_evals(run_id: str) -> list[EvalResult]:
    return [
        evaluation(run_id, 0, [0.2, 0.1, 0.05]),  # no serving run: serving fields absent
        evaluation(run_id, 4, [0.7, 0.5, 0.3], **served(2.05, [0.6, 0.45, 0.3], True, 1.31)),
        evaluation(run_id, 8, [0.65, 0.45, 0.25], **served(1.9, [0.55, 0.4, 0.2], False, 1.12)),
    ]


def train_rows(steps: range) -> list[dict]:
    return [{"step": s, "epoch": 0, "lr": 1e-3, "loss": 5.0 / (s + 1), "acc_0": 0.1} for s in steps]


def markdown_table(text: str) -> list[list[str]]:
    """Body rows of the first markdown table, as cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert re.fullmatch(r"\|(-+:\|)+", lines[1]), lines[1]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (700, 400)
        # Not a blank canvas: a plot has axes, text and lines in several colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 10


def assert_self_contained_and_complete(out: Path) -> str:
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(sources) == sorted(p.name for p in out.glob("*.png"))
    assert "<script" not in page and "http://" not in page and "https://" not in page
    return page


def test_render_from_records(tmp_path: Path) -> None:
    run = "r1"
    evals = make_evals(run)
    stale = evaluation(run, 8, [0.1, 0.1, 0.1])  # an earlier evaluation of step 8, replaced
    checkpoints = [checkpoint(run, s, 5.0 / (s + 1), final=s == 8) for s in (0, 4, 8)]
    out = tmp_path / "report"
    report = render_report(out, run_id=run, checkpoints=checkpoints,
                           evals=[evals[0], stale, evals[1], evals[2]],
                           train_metrics=train_rows(range(0, 9)))  # fmt: skip

    assert (out / "index.html").is_file() and (out / "summary.md").is_file()
    assert sorted(p.name for p in report.plots) == sorted(ALL_PNGS)
    for name in ALL_PNGS:
        assert_valid_png(out / name)

    summary = (out / "summary.md").read_text()
    rows = markdown_table(summary)
    assert [row[0] for row in rows] == ["0", "4", "8"]
    for row, e in zip(rows, evals, strict=True):
        assert math.isclose(float(row[1]), simulated_length(e.acceptance_rates), abs_tol=5e-4)
        if e.serving_acceptance_length is None:
            assert row[2:] == ["n/a", "n/a", "n/a"]
        else:
            assert math.isclose(float(row[2]), e.serving_acceptance_length, abs_tol=5e-4)
            assert row[3] == ("yes" if e.lossless else "NO")
            assert math.isclose(float(row[4].removesuffix("x")), e.metrics["speedup"], abs_tol=5e-3)
    # Best by simulated length: 0.7 + 0.35 + 0.105 = 1.155 at step 4 beats 1.016 at step 8.
    assert report.best_step == 4 and report.best_metric == "simulated_acceptance_length"
    assert "best checkpoint: step 4" in summary
    assert "training loss (per logged step): 0.5556 at step 8" in summary
    assert "final at step 8" in summary

    page = assert_self_contained_and_complete(out)
    for text in (summary, page):
        assert SIMULATED_LABEL in text and SERVING_LABEL in text
        assert "no bonus token" in text and "including the bonus token" in text
    assert page.count("<tr>") == 1 + len(evals)


def test_missing_data_renders_no_data_and_drops_stale_plots(tmp_path: Path) -> None:
    out = tmp_path / "report"
    render_report(out, run_id="r2", checkpoints=[checkpoint("r2", 4, 1.0)],
                  evals=make_evals("r2"), train_metrics=train_rows(range(3)))  # fmt: skip
    assert len(list(out.glob("*.png"))) == 3

    report = render_report(out, run_id="r2", checkpoints=[], evals=[], train_metrics=[])
    assert report.plots == [] and list(out.glob("*.png")) == []
    assert report.best_step is None
    summary = (out / "summary.md").read_text()
    assert "no data (no EvalResult for this run yet)" in summary
    assert "training loss: no data" in summary and "best checkpoint: no data" in summary
    assert not any(line.startswith("|") for line in summary.splitlines())
    page = assert_self_contained_and_complete(out)
    assert page.count("<p>no data</p>") == 3


def test_loss_falls_back_to_checkpoint_metrics_and_evals_without_lengths(tmp_path: Path) -> None:
    run = "r3"
    checkpoints = [checkpoint(run, s, loss) for s, loss in ((2, 3.0), (4, 2.5), (6, float("nan")))]
    bare = EvalResult(run_id=run, step=4, checkpoint_sha256="0" * 64, acceptance_rates=[],
                      run_spec_hash="h")  # fmt: skip
    report = render_report(tmp_path, run_id=run, checkpoints=checkpoints, evals=[bare])
    assert [p.name for p in report.plots] == [LOSS_PNG]  # nothing to plot for acceptance
    assert_valid_png(tmp_path / LOSS_PNG)
    summary = (tmp_path / "summary.md").read_text()
    assert "training loss (at checkpoints): 2.5000 at step 4" in summary  # NaN is no data
    assert markdown_table(summary) == [["4", "n/a", "n/a", "n/a", "n/a"]]


def test_read_train_metrics_skips_torn_lines_and_keeps_the_last_row_per_step(
    tmp_path: Path,
) -> None:
    path = tmp_path / "train_metrics.jsonl"
    assert read_train_metrics(path) == []
    lines = [json.dumps(r) for r in train_rows(range(3))]
    lines += ["[1, 2]", json.dumps({"loss": 1.0}), json.dumps({"step": 1, "loss": 9.0}), ""]
    path.write_text("\n".join(lines) + '\n{"step": 3, "lo')
    rows = read_train_metrics(path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["loss"] == 9.0 and rows[2]["loss"] == pytest.approx(5.0 / 3)


async def publish_run(bus, spec, *, evals: bool) -> None:
    subjects = await bus.ensure_streams(spec.run_id)
    await bus.put_run_spec(spec)
    for s in (0, 4, 8):
        event = checkpoint(spec.run_id, s, 4.0 - s / 4, final=s == 8)
        await bus.publish(subjects.checkpoints, event, msg_id=f"ckpt:{s}")
    if evals:
        for e in make_evals(spec.run_id):
            await bus.publish(subjects.evals, e, msg_id=f"eval:{e.step}")


async def run_cli(*argv: str) -> int:
    """The real ``specforge`` entry point, in a thread: it runs its own event loop."""
    return await asyncio.to_thread(cli.main, list(argv))


async def test_report_command_through_the_bus(
    bus, run_id: str, nats_server, tmp_path: Path, capsys
) -> None:
    spec = tiny_run_spec(run_id, tmp_path / "no-target", tmp_path)
    await publish_run(bus, spec, evals=True)
    run_dir = Path(spec.output_dir) / run_id
    run_dir.mkdir(parents=True)
    rows = train_rows(range(0, 9))
    (run_dir / "train_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "page"
    code = await run_cli("report", "--run", run_id, "--nats", nats_server.url, "--out", str(out))
    assert code == 0, capsys.readouterr()
    assert f"report written to {out}" in capsys.readouterr().out
    for name in ALL_PNGS:
        assert_valid_png(out / name)
    summary = (out / "summary.md").read_text()
    assert [row[0] for row in markdown_table(summary)] == ["0", "4", "8"]
    assert "training loss (per logged step): 0.5556 at step 8" in summary  # from the jsonl
    assert "checkpoints: 3 (final at step 8)" in summary
    assert_self_contained_and_complete(out)


async def test_report_command_without_evals_or_train_metrics_uses_the_default_dir(
    bus, run_id: str, nats_server, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, tmp_path / "no-target", tmp_path)
    await publish_run(bus, spec, evals=False)
    code = await run_cli("report", "--run", run_id, "--nats", nats_server.url)
    assert code == 0
    out = Path(spec.output_dir) / run_id / "report"
    assert sorted(p.name for p in out.glob("*.png")) == [LOSS_PNG]
    summary = (out / "summary.md").read_text()
    assert "training loss (at checkpoints): 2.0000 at step 8" in summary
    assert "no data (no EvalResult for this run yet)" in summary
    assert_self_contained_and_complete(out)


async def test_report_command_without_a_spec(
    bus, run_id: str, nats_server, tmp_path: Path, capsys
) -> None:
    code = await run_cli("report", "--run", run_id, "--nats", nats_server.url)
    assert code == 2
    assert "no spec" in capsys.readouterr().out
    # With a directory named, a run nobody started yet still gets a (no data) page.
    code = await run_cli("report", "--run", run_id, "--nats", nats_server.url,
                         "--out", str(tmp_path))  # fmt: skip
    assert code == 0
    assert "no data" in (tmp_path / "summary.md").read_text()


def test_cli_help_does_not_import_matplotlib() -> None:
    code = (
        "import sys; from specforge_cli.main import build_parser; build_parser(); "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported at parser build'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
