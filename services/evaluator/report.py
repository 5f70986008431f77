"""The results page of a run: training loss, per-position acceptance and acceptance length.

``render_report`` works on plain records (testable without a bus) and writes ``index.html``,
``summary.md`` and PNG plots into a directory; ``write_report`` gathers the records of a run from
the bus and calls it. Missing data never fails a report: each section then says "no data".

Two acceptance-length conventions appear side by side and are always labelled: *simulated*
(training-time, ``sum_k prod_{i<=k} acc_i``, no bonus token) and *serving* (real speculative
decoding, tokens emitted per target verification step, bonus token included).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specforge_common.contracts import CheckpointEvent, EvalResult, RunSpec
from specforge_common.log import get_logger
from specforge_common.step_log import read_step_log, train_metrics_path

if TYPE_CHECKING:
    from specforge_common.bus import Bus

log = get_logger(component="report")

LOSS_PNG = "loss.png"
POSITIONS_PNG = "acceptance_per_position.png"
LENGTH_PNG = "acceptance_length.png"

SIMULATED_LABEL = "simulated (no bonus token)"
SERVING_LABEL = "serving (tokens per verification, bonus included)"
CONVENTIONS = (
    "Simulated acceptance length (training-time): sum over draft positions k of "
    "prod_{i<=k} acc_i from the teacher-forced eval split, with no bonus token.",
    "Serving acceptance length (SGLang, vLLM, the EAGLE paper): tokens emitted per target "
    "verification step in real speculative decoding, including the bonus token, so for a chain "
    "draft it is comparable to 1 + simulated.",
)
NA = "n/a"


class NoReportDir(RuntimeError):
    """The run has no spec on the bus and the caller named no directory to use instead."""


@dataclass
class Report:
    """What ``render_report`` wrote, and the facts the page states."""

    out_dir: Path
    html: Path
    markdown: Path
    plots: list[Path] = field(default_factory=list)
    best_step: int | None = None
    best_metric: str | None = None


# --- inputs --------------------------------------------------------------------------------


def read_train_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of the trainer's ``train_metrics.jsonl`` by step; [] when the file is absent.
    Torn lines are skipped (``read_step_log``); a step logged twice keeps its last row."""
    rows = {row["step"]: row for row in read_step_log(path)}
    return [rows[step] for step in sorted(rows)]


def _latest_per_step(records: Iterable[Any]) -> list[Any]:
    """One record per step (the last published wins: a re-evaluation replaces), sorted."""
    by_step = {record.step: record for record in records}
    return [by_step[step] for step in sorted(by_step)]


def _number(value: Any) -> float | None:
    """A finite float, or None (missing keys, NaN, bools and strings are no data)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def loss_series(
    train_metrics: Sequence[Mapping[str, Any]], checkpoints: Sequence[CheckpointEvent]
) -> tuple[list[int], list[float], str]:
    """(steps, losses, source): per logged step when the trainer wrote them, else per checkpoint."""
    points = [(row["step"], _number(row.get("loss"))) for row in train_metrics]
    source = "per logged step"
    if not any(loss is not None for _, loss in points):
        points = [(event.step, _number(event.metrics.get("loss"))) for event in checkpoints]
        source = "at checkpoints"
    kept = [(step, loss) for step, loss in points if loss is not None]
    return [s for s, _ in kept], [loss for _, loss in kept], source


def best_eval(evals: Sequence[EvalResult]) -> tuple[EvalResult | None, str | None]:
    """The best evaluated checkpoint: highest simulated acceptance length (the trainer's
    best-checkpoint metric), else highest serving length; the earliest step wins a tie."""
    for metric in ("simulated_acceptance_length", "serving_acceptance_length"):
        scored = [(_number(getattr(e, metric)), e) for e in evals]
        scored = [(value, e) for value, e in scored if value is not None]
        if scored:
            best = max(scored, key=lambda item: (item[0], -item[1].step))
            return best[1], metric
    return None, None


# --- formatting ----------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    number = _number(value)
    return NA if number is None else f"{number:.{digits}f}"


def _fmt_general(value: Any) -> str:
    number = _number(value)
    return NA if number is None else f"{number:.4g}"


def _fmt_lossless(value: bool | None) -> str:
    return NA if value is None else ("yes" if value else "NO")


def _fmt_speedup(value: Any) -> str:
    number = _number(value)
    return NA if number is None else f"{number:.2f}x"


TABLE_HEADER = ("step", SIMULATED_LABEL, SERVING_LABEL, "lossless", "speedup")


def table_rows(evals: Sequence[EvalResult]) -> list[tuple[str, ...]]:
    return [
        (
            str(e.step),
            _fmt(e.simulated_acceptance_length),
            _fmt(e.serving_acceptance_length),
            _fmt_lossless(e.lossless),
            _fmt_speedup(e.metrics.get("speedup")),
        )
        for e in evals
    ]


def _metric_items(metrics: Mapping[str, Any]) -> str:
    items = [f"{key}={_fmt_general(value)}" for key, value in sorted(metrics.items())]
    return ", ".join(items) if items else "none"


# --- plots ---------------------------------------------------------------------------------


def _new_figure() -> Any:
    """A figure on the Agg canvas, without pyplot: no global backend switch, no GUI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _finish(
    ax: Any, path: Path, *, xlabel: str, ylabel: str, title: str, legend_size: str | None = None
) -> Path:
    """Label, grid and legend every plot the same way, then write the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    ax.figure.savefig(path, format="png")
    return path


def plot_loss(steps: Sequence[int], losses: Sequence[float], source: str, path: Path) -> Path:
    figure = _new_figure()
    ax = figure.add_subplot()
    ax.plot(steps, losses, marker="o" if len(steps) <= 30 else None, label=f"loss ({source})")
    return _finish(ax, path, xlabel="optimizer step", ylabel="training loss",
                   title="Training loss")  # fmt: skip


def plot_positions(first: EvalResult, latest: EvalResult, path: Path) -> Path:
    """Per-position acceptance of the first and the latest eval, offline and (if any) serving."""
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure()
    ax = figure.add_subplot()
    shown = [latest] if first is latest else [first, latest]
    for e in shown:
        tag = f"step {e.step}"
        rates = e.acceptance_rates
        ax.plot(range(1, len(rates) + 1), rates, marker="o",
                label=f"offline, teacher-forced ({tag})")  # fmt: skip
        if e.serving_acceptance_rates:
            served = e.serving_acceptance_rates
            ax.plot(range(1, len(served) + 1), served, marker="s", linestyle="--",
                    label=f"serving, given earlier accepted ({tag})")  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0.0, 1.05)
    return _finish(ax, path, xlabel="draft position", ylabel="acceptance rate",
                   title="Acceptance per draft position", legend_size="small")  # fmt: skip


def plot_lengths(evals: Sequence[EvalResult], path: Path) -> Path:
    figure = _new_figure()
    ax = figure.add_subplot()
    for attribute, label, marker in (
        ("simulated_acceptance_length", SIMULATED_LABEL, "o"),
        ("serving_acceptance_length", SERVING_LABEL, "s"),
    ):
        points = [(e.step, _number(getattr(e, attribute))) for e in evals]
        points = [(step, value) for step, value in points if value is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
    return _finish(ax, path, xlabel="checkpoint step",
                   ylabel="acceptance length (tokens)", title="Acceptance length over training",
                   legend_size="small")  # fmt: skip


# --- pages ---------------------------------------------------------------------------------


def _facts(
    run_id: str,
    checkpoints: Sequence[CheckpointEvent],
    evals: Sequence[EvalResult],
    loss: tuple[list[int], list[float], str],
    best: EvalResult | None,
    best_metric: str | None,
) -> list[str]:
    """One-line facts shared by the markdown and the HTML page."""
    steps, losses, source = loss
    final = [c.step for c in checkpoints if c.final]
    facts = [
        f"run: {run_id}",
        f"checkpoints: {len(checkpoints)}"
        + (f" (final at step {final[-1]})" if final else " (no final checkpoint yet)"),
        f"evaluated checkpoints: {len(evals)}",
    ]
    if losses:
        facts.append(f"training loss ({source}): {_fmt(losses[-1], 4)} at step {steps[-1]}")
    else:
        facts.append("training loss: no data")
    if best is not None:
        value = getattr(best, best_metric or "")
        label = SIMULATED_LABEL if best_metric == "simulated_acceptance_length" else SERVING_LABEL
        facts.append(f"best checkpoint: step {best.step} ({label} {_fmt(value)})")
    else:
        facts.append("best checkpoint: no data")
    if evals:
        latest = evals[-1]
        facts.append(
            f"latest eval (step {latest.step}) offline acceptance per position: "
            + (", ".join(_fmt(a) for a in latest.acceptance_rates) or NA)
        )
        if latest.serving_acceptance_rates:
            facts.append(
                f"latest eval (step {latest.step}) serving acceptance per position: "
                + ", ".join(_fmt(a) for a in latest.serving_acceptance_rates)
            )
        facts.append(f"latest eval metrics: {_metric_items(latest.metrics)}")
    return facts


def _markdown(run_id: str, facts: list[str], rows: list[tuple[str, ...]], plots: list[Path]) -> str:
    lines = [f"# specforge report: {run_id}", ""]
    lines += [f"- {fact}" for fact in facts] + ["", "## Evaluated checkpoints", ""]
    if rows:
        lines.append("| " + " | ".join(TABLE_HEADER) + " |")
        lines.append("|" + "|".join("---:" for _ in TABLE_HEADER) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        lines.append("no data (no EvalResult for this run yet)")
    lines += ["", "## Acceptance-length conventions", ""]
    lines += [f"- {sentence}" for sentence in CONVENTIONS]
    lines += ["", "## Plots", ""]
    lines += [f"- [{p.name}]({p.name})" for p in plots] or ["no data"]
    return "\n".join(lines) + "\n"


_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.3em .6em}"
    "td{text-align:right}img{max-width:100%}"
)


def _html(
    run_id: str, facts: list[str], rows: list[tuple[str, ...]], plots: dict[str, Path | None]
) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>specforge report: {e(run_id)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>specforge report: {e(run_id)}</h1>",
        "<ul>" + "".join(f"<li>{e(fact)}</li>" for fact in facts) + "</ul>",
        "<h2>Evaluated checkpoints</h2>",
    ]
    if rows:
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADER) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    else:
        parts.append("<p>no data (no EvalResult for this run yet)</p>")
    parts.append("<h2>Acceptance-length conventions</h2>")
    parts.append("<ul>" + "".join(f"<li>{e(s)}</li>" for s in CONVENTIONS) + "</ul>")
    for title, path in plots.items():
        parts.append(f"<h2>{e(title)}</h2>")
        if path is None:
            parts.append("<p>no data</p>")
        else:
            parts.append(f'<img src="{e(path.name)}" alt="{e(title)}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_report(
    out_dir: Path,
    *,
    run_id: str,
    checkpoints: Iterable[CheckpointEvent],
    evals: Iterable[EvalResult],
    train_metrics: Sequence[Mapping[str, Any]] = (),
    samples: str = "",
) -> Report:
    """Write index.html, summary.md and the plots that have data into ``out_dir``; ``samples``
    says where the run's samples came from when that is another run (a replay).

    Plots of earlier renders that now have no data are removed, so the page never shows a
    stale picture.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = _latest_per_step(checkpoints)
    evals = _latest_per_step(evals)
    loss = loss_series(train_metrics, checkpoints)
    best, best_metric = best_eval(evals)

    plots: dict[str, Path | None] = {}
    plots["Training loss"] = plot_loss(*loss, out_dir / LOSS_PNG) if loss[0] else None
    plots["Acceptance per draft position (first and latest eval)"] = (
        plot_positions(evals[0], evals[-1], out_dir / POSITIONS_PNG)
        if any(e.acceptance_rates or e.serving_acceptance_rates for e in (evals[:1] + evals[-1:]))
        else None
    )
    has_length = any(
        _number(e.simulated_acceptance_length) is not None
        or _number(e.serving_acceptance_length) is not None
        for e in evals
    )
    plots["Acceptance length over training"] = (
        plot_lengths(evals, out_dir / LENGTH_PNG) if has_length else None
    )
    written = [p for p in plots.values() if p is not None]
    for name in (LOSS_PNG, POSITIONS_PNG, LENGTH_PNG):
        if out_dir / name not in written:
            (out_dir / name).unlink(missing_ok=True)

    facts = _facts(run_id, checkpoints, evals, loss, best, best_metric)
    if samples:
        facts.insert(1, f"samples: {samples}")
    rows = table_rows(evals)
    markdown = out_dir / "summary.md"
    markdown.write_text(_markdown(run_id, facts, rows, written), encoding="utf-8")
    page = out_dir / "index.html"
    page.write_text(_html(run_id, facts, rows, plots), encoding="utf-8")
    log.info(
        "report written",
        run=run_id,
        out=str(out_dir),
        checkpoints=len(checkpoints),
        evals=len(evals),
        train_rows=len(train_metrics),
        plots=[p.name for p in written],
    )
    return Report(
        out_dir=out_dir,
        html=page,
        markdown=markdown,
        plots=written,
        best_step=None if best is None else best.step,
        best_metric=best_metric,
    )


# --- from the bus --------------------------------------------------------------------------


async def write_report(
    bus: Bus, run_id: str, out_dir: Path | None = None, *, output_dir: Path | None = None
) -> Report:
    """Gather a run's checkpoints, evals and train metrics and render its report.

    ``output_dir`` overrides the spec's ``output_dir`` (where ``<run>/train_metrics.jsonl`` is
    and, without ``out_dir``, where ``<run>/report/`` goes). Without a stored spec both must
    come from the caller; train metrics are then read only when ``output_dir`` is given.
    """
    spec = await bus.get_run_spec(run_id)
    root = output_dir if output_dir is not None else (Path(spec.output_dir) if spec else None)
    if out_dir is None:
        if root is None:
            raise NoReportDir(f"run {run_id!r} has no spec on the bus; name a report directory")
        out_dir = root / run_id / "report"
    checkpoints = [event async for _, event in bus.records(run_id, "checkpoints", CheckpointEvent)]
    evals = [result async for _, result in bus.records(run_id, "evals", EvalResult)]
    samples = await replayed_samples(bus, spec) if spec is not None else ""
    metrics_path = train_metrics_path(root, run_id) if root is not None else None
    train_metrics = read_train_metrics(metrics_path) if metrics_path is not None else []
    log.info(
        "report inputs gathered",
        run=run_id,
        spec=spec is not None,
        checkpoints=len(checkpoints),
        evals=len(evals),
        train_metrics=str(metrics_path) if train_metrics else "no data",
    )
    return render_report(
        Path(out_dir),
        run_id=run_id,
        checkpoints=checkpoints,
        evals=evals,
        train_metrics=train_metrics,
        samples=samples,
    )


async def replayed_samples(bus: Bus, spec: RunSpec) -> str:
    """Where a replayed run's samples are (its data run's streams, with their counts), or ""
    for a run that trains on its own."""
    from specforge_common.contracts import EnqueueSummary
    from specforge_common.subjects import enqueue_key

    if spec.samples_run == spec.run_id:
        return ""
    text = f"replayed from run {spec.samples_run}"
    summary = await bus.get_record(enqueue_key(spec.samples_run), EnqueueSummary)
    if summary is not None:
        text += f" ({summary.train} train, {summary.eval} eval samples enqueued)"
    return text
