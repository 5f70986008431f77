"""``python -m bench quality``: train a recipe from scratch, then judge its draft on prompts it
never trained on.

A loss curve and the evaluator's numbers on the run's own eval split say little about whether a
recipe is worth serving. This suite answers that question end to end, the way a user would meet
it:

1. ``specforge run --config RECIPE --workdir DIR --run quality-<timestamp>`` in a subprocess, in
   a new run directory; the wall time of the whole run, and from the services' JSON logs
   (``<run>/logs/*.log``) the capture, train and eval phases (``PHASE_EVENTS``); samples and
   tokens trained from the final checkpoint's ``trainer_state.json``.
2. The final exported draft is decoded speculatively, in this process, with the standalone
   evaluator's machinery (``ServingEval``, prompts built by ``prompts_from_source``) on two
   prompt sets: the run's **held-out split** (the recipe's source read with the run's
   ``[launch] limit``, the records ``split_of`` put in "eval": the run captured them but never
   trained on them; when they are fewer than ``--prompts``, the same split continues past the
   limit, records the run never read, and the JSON says how many came from where) and the
   packaged **alpaca_eval** instructions (another style of prompt altogether). Greedy, so
   every output is checked against the target's own (lossless), at each k of ``--ks``.
3. ``bench/results/quality.json`` (``--out``) and a table: per prompt set and k the serving
   acceptance length (bonus included), per-position conditional acceptance, the run's simulated
   acceptance length (offline, no bonus; the value for k positions too), losslessness, tokens/s
   speculative vs target-only, speedup, the four terms of the speedup bound (plain step, verify
   and draft ms, ``ideal = AL x plain / (verify + k x draft)``) and the share of the bound
   measured; plus the phase times, what was trained, the recipe and the machine.

``--skip-run RUN_DIR`` judges an existing run's final draft without training again (the config
must be the run's, to rebuild its held-out split; ``spec_matches_run`` says whether it is).
It is not part of ``python -m bench`` (the packaged recipe trains for about an hour on 2 CPU
cores): ``make bench-quality`` runs it, ``tests/test_bench_quality.py`` runs its code path on a
tiny target in ``make test``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import RESULTS_DIR

if TYPE_CHECKING:
    from specforge_common.contracts import RunSpec
    from specforge_common.models.eagle3 import Eagle3Draft
    from specforge_common.targets import HFTargetEngine
    from specforge_evaluator.serving import ServingOutcome

DEFAULT_CONFIG = "smollm2-chat"
HELD_OUT = "held_out"
OTHER_SOURCE = "alpaca_eval"

# The log events (the ``event`` field of the services' JSON lines) that delimit each phase.
CAPTURE_STARTED = "capture worker started"  # services/capture/worker.py
CAPTURE_DRAINED = "prompt queue drained: end of split published"  # capture/end_of_data.py
CAPTURE_STOPPED = "capture worker stopped"  # capture/worker.py (later: it serves re-captures)
TRAINER_READY = "trainer ready"  # services/trainer/build.py
TRAINING_DONE = "training done"  # services/trainer/telemetry.py
CHECKPOINT_EVALUATED = "checkpoint evaluated"  # services/evaluator/service.py (has wall_s)
EVALUATOR_DONE = "evaluator done"  # services/evaluator/command.py
PHASE_EVENTS = (CAPTURE_STARTED, CAPTURE_DRAINED, CAPTURE_STOPPED, TRAINER_READY,
                TRAINING_DONE, CHECKPOINT_EVALUATED, EVALUATOR_DONE)  # fmt: skip

# Every field of one (prompt set, k) result, in the order the JSON lists them.
RESULT_FIELDS = (
    "k", "prompts", "tokens", "steps", "serving_acceptance_length", "acceptance_per_position",
    "simulated_acceptance_length", "simulated_acceptance_length_at_k", "lossless",
    "tokens_per_s_spec", "tokens_per_s_target", "speedup", "plain_step_ms",
    "verify_ms_per_step", "draft_ms_per_token", "draft_ms_per_step", "ideal_speedup",
    "speedup_vs_ideal", "seconds", "error",
)  # fmt: skip


# --- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench quality",
        description="Train a recipe from scratch and judge its draft on prompts it never "
        "trained on (held-out split and alpaca_eval), at several chain lengths.",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"recipe: a packaged config name or a TOML file ({DEFAULT_CONFIG})",
    )
    parser.add_argument("--workdir", default="runs", help="where the run directory goes (runs)")
    parser.add_argument("--prompts", type=int, default=50, help="prompts per set (50)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per prompt (64)")
    parser.add_argument("--ks", default="3,5", help="chain lengths, comma-separated (3,5)")
    parser.add_argument(
        "--skip-run",
        metavar="RUN_DIR",
        help="judge this finished run's final draft instead of training",
    )
    parser.add_argument(
        "--target",
        help="target model dir (default: the run's own target, "
        "the prepared SmolLM2-135M-Instruct for the packaged recipes)",
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / "quality.json"),
                        help="the JSON results (bench/results/quality.json)")  # fmt: skip
    args = parser.parse_args(list(argv))
    args.ks = [int(k) for k in str(args.ks).split(",") if k.strip()]
    if not args.ks or min(args.ks) < 1 or args.prompts < 1 or args.max_new_tokens < 1:
        parser.error("--ks needs chain lengths >= 1; --prompts and --max-new-tokens >= 1")
    return args


def main(argv: Sequence[str]) -> int:
    """Run (or reuse) the recipe, judge its final draft, write the JSON and print the table.
    Exit 1 if the run failed or left no final draft, or any output was not lossless."""
    args = parse_args(argv)
    started = time.time()
    if args.skip_run:
        run_dir, exit_code, wall = Path(args.skip_run).resolve(), None, None
    else:
        run_id = f"quality-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(args.workdir).resolve() / run_id
        exit_code, wall = run_recipe(args.config, run_dir)
    run = run_facts(run_dir, origin=None if args.skip_run else started)
    run |= {"exit_code": exit_code, "wall_s": wall, "skipped": bool(args.skip_run)}
    if run["draft_dir"] is None:
        print(f"bench quality: no final draft under {run_dir / 'checkpoints'} "
              f"(run exit code {exit_code})", file=sys.stderr)  # fmt: skip
        return 1
    spec, source, limit = rebuild_spec(args.config, run_dir)
    run["spec_matches_run"] = spec.spec_hash() == run.pop("run_spec_hash")
    result = judge(args, run, spec, source, limit)
    out = write_results(result, Path(args.out))
    print_table(result)
    print(f"  -> {out}")
    return 0 if all_lossless(result) and exit_code in (None, 0) else 1


# --- 1. the run ------------------------------------------------------------------------------


def run_recipe(config: str, run_dir: Path) -> tuple[int, float]:
    """``specforge run`` of ``config`` into the new ``run_dir``; its exit code and wall
    seconds. Its console is this terminal's: an hour-long run should show its progress."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"bench quality: {run_dir} is not empty; a run starts from nothing")
    command = [sys.executable, "-m", "specforge_cli", "run", "--config", config,
               "--workdir", str(run_dir.parent), "--run", run_dir.name]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, check=False)
    return done.returncode, time.perf_counter() - started


def read_events(log_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each service log's JSON events (``capture-0``, ``trainer``, ``evaluator``, ...), with
    ``t`` = the timestamp in epoch seconds; lines that are not JSON events are skipped."""
    events: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(log_dir.glob("*.log")):
        parsed = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
                event["t"] = datetime.fromisoformat(event["timestamp"]).timestamp()
            except (ValueError, KeyError, TypeError):
                continue
            parsed.append(event)
        events[path.stem] = parsed
    return events


def _times(events: Iterable[dict[str, Any]], name: str) -> list[float]:
    return [e["t"] for e in events if e.get("event") == name]


def _span(start: float | None, end: float | None, origin: float) -> dict[str, float | None]:
    """A phase as offsets from the run's start, so overlapping phases show as overlapping."""
    if start is None or end is None:
        return {"start_s": None, "end_s": None, "wall_s": None}
    return {"start_s": start - origin, "end_s": end - origin, "wall_s": end - start}


def phase_times(events: Mapping[str, list[dict[str, Any]]], origin: float) -> dict[str, Any]:
    """Capture: first worker started .. last worker drained the prompt queue (workers then
    linger to serve re-captures until training ends, so their stop is not the capture's end).
    Train: trainer ready .. training done. Eval: the first checkpoint evaluation .. evaluator
    done, with the evaluator's busy seconds and the tail it adds after training."""
    captures = [evs for name, evs in events.items() if name.startswith("capture")]
    starts = [t for evs in captures for t in _times(evs, CAPTURE_STARTED)]
    ends = [max(_times(evs, CAPTURE_DRAINED) or _times(evs, CAPTURE_STOPPED) or [math.nan])
            for evs in captures]  # fmt: skip
    ends = [t for t in ends if not math.isnan(t)]
    trainer, evaluator = events.get("trainer", []), events.get("evaluator", [])
    ready, done = _times(trainer, TRAINER_READY), _times(trainer, TRAINING_DONE)
    evaluated = [e for e in evaluator if e.get("event") == CHECKPOINT_EVALUATED]
    finished = _times(evaluator, EVALUATOR_DONE) or [e["t"] for e in evaluated[-1:]]
    eval_start = evaluated[0]["t"] - evaluated[0].get("wall_s", 0.0) if evaluated else None
    eval_end = finished[-1] if finished else None
    phases: dict[str, Any] = {
        "capture": _span(min(starts, default=None), max(ends, default=None), origin),
        "train": _span(ready[0] if ready else None, done[-1] if done else None, origin),
        "eval": _span(eval_start, eval_end, origin),
    }
    phases["eval"] |= {
        "busy_s": sum(float(e.get("wall_s", 0.0)) for e in evaluated),
        "checkpoints": len(evaluated),
        "after_training_s": eval_end - done[-1] if eval_end is not None and done else None,
    }
    return phases


def last_evaluation(events: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """The run's EvalResult of its last checkpoint, as the evaluator logged it: the offline
    per-position accuracy and simulated acceptance length (no bonus), and the run's own
    serving numbers (its eval split, ``eval.num_draft_tokens``)."""
    evaluated = [e for e in events.get("evaluator", []) if e.get("event") == CHECKPOINT_EVALUATED]
    if not evaluated:
        return None
    last = max(evaluated, key=lambda e: e.get("step", -1))
    keys = ("step", "final", "acc", "simulated_acceptance_length", "serving_acceptance_length",
            "lossless", "speedup")  # fmt: skip
    return {key: last.get(key) for key in keys}


def run_facts(run_dir: Path, *, origin: float | None) -> dict[str, Any]:
    """What the run did, from its logs and final checkpoint; ``origin`` is when it started
    (epoch seconds; default: its earliest log line)."""
    from specforge_trainer.checkpoints import LATEST_NAME

    events = read_events(run_dir / "logs")
    if origin is None:
        origin = min((e["t"] for evs in events.values() for e in evs), default=0.0)
    latest = run_dir / "checkpoints" / LATEST_NAME
    draft = latest.parent / latest.read_text().strip() if latest.is_file() else None
    state: dict[str, Any] = {}
    if draft is not None and (draft / "trainer_state.json").is_file():
        state = json.loads((draft / "trainer_state.json").read_text())
    return {
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "draft_dir": str(draft) if draft is not None else None,
        "final_step": state.get("global_step"),
        "final": state.get("final"),
        "samples_trained": state.get("samples_consumed"),
        "tokens_trained": state.get("tokens_trained"),
        "run_spec_hash": state.get("run_spec_hash"),
        "phases": phase_times(events, origin),
        "last_eval": last_evaluation(events),
    }


def rebuild_spec(config: str, run_dir: Path) -> tuple[RunSpec, str, int]:
    """The run's spec as ``specforge run`` built it (same config, run id and paths), with the
    source and record limit it enqueued: what decides which prompts went to the eval split."""
    from specforge_cli.run_setup import build_spec

    launch = argparse.Namespace(config=config, source=None, limit=None, overrides=[])
    spec = build_spec(launch, run_dir.name, run_dir)
    return spec, str(launch.source), int(launch.limit)


# --- 2. judging the draft ------------------------------------------------------------------


def _eval_split_prompts(
    spec: RunSpec,
    source: str,
    tokenizer: Any,
    n: int,
    *,
    records: int | None,
    exclude: frozenset[str] = frozenset(),
) -> list[list[int]]:
    """Up to ``n`` prompts of the records ``split_of`` sends to "eval" among the first
    ``records`` of ``source`` (all: None), first copy of an id only, ids in ``exclude``
    skipped, the prompt short enough that capture kept it (``< max_length``)."""
    from specforge_common.data.chat import split_of
    from specforge_evaluator.serving import prompts_from_source

    seen: set[str] = set()

    def held_out(record_id: str) -> bool:
        first = record_id not in seen and record_id not in exclude
        seen.add(record_id)
        return first and split_of(record_id, spec.eval_fraction, spec.seed) == "eval"

    return prompts_from_source(source, tokenizer, n, chat_template=spec.chat_template,
                               max_length=spec.max_length - 1, records=records,
                               keep=held_out)  # fmt: skip


def held_out_prompts(
    spec: RunSpec, source: str, limit: int, tokenizer: Any, n: int
) -> tuple[list[list[int]], int]:
    """Up to ``n`` prompts of the recipe's held-out split, and how many of them are the run's
    own eval split (its first ``limit`` records). A run's eval split can hold fewer usable
    prompts than ``n`` (smollm2-chat: 55 eval records of 800, 26 with a prompt that fits), so
    the same split continues past the run's limit: records the run never read, let alone
    trained on, of the same source and style."""
    from specforge_common.data.sources import BadRecord, read_conversations

    own = _eval_split_prompts(spec, source, tokenizer, n, records=limit)
    if len(own) >= n:
        return own, len(own)
    read = frozenset(r.id for r in read_conversations(source, limit)
                     if not isinstance(r, BadRecord))  # fmt: skip
    more = _eval_split_prompts(spec, source, tokenizer, n - len(own), records=None, exclude=read)
    return own + more, len(own)


def other_prompts(spec: RunSpec, source: str, tokenizer: Any, n: int) -> list[list[int]]:
    """The first ``n`` usable prompts of another source, within the recipe's prompt length."""
    from specforge_evaluator.serving import prompts_from_source

    return prompts_from_source(source, tokenizer, n, chat_template=spec.chat_template,
                               max_length=spec.max_length - 1)  # fmt: skip


def simulated_at(acc: Sequence[float] | None, k: int) -> float | None:
    """``sum_{j<k} prod_{i<=j} acc_i``: the offline acceptance length over the first k draft
    positions (no bonus), comparable to serving acceptance length - 1 at chain length k."""
    if not acc:
        return None
    total, running = 0.0, 1.0
    for a in acc[:k]:
        running *= a
        total += running
    return total


def _finite(value: Any) -> Any:
    """NaN -> None: strict JSON, and a gap rather than a number in the table."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _int(value: float | None) -> int | None:
    return None if value is None or not math.isfinite(value) else int(value)


def result_row(
    outcome: ServingOutcome, k: int, prompts: int, last_eval: Mapping[str, Any] | None
) -> dict[str, Any]:
    """One (prompt set, k) result, every field of ``RESULT_FIELDS`` present."""
    m = outcome.metrics
    acc = (last_eval or {}).get("acc")  # rounded to 4 digits in the log: exact only for all K
    sim = (last_eval or {}).get("simulated_acceptance_length")
    sim_k = sim if acc and k >= len(acc) else simulated_at(acc, k)
    row: dict[str, Any] = {
        "k": k,
        "prompts": prompts,
        "tokens": _int(m.get("serving/tokens")),
        "steps": _int(m.get("serving/steps")),
        "serving_acceptance_length": outcome.acceptance_length,
        "acceptance_per_position": [_finite(r) for r in outcome.acceptance_rates],
        "simulated_acceptance_length": sim,
        "simulated_acceptance_length_at_k": sim_k,
        "lossless": outcome.lossless,
        "seconds": outcome.seconds,
        "error": outcome.error,
    }
    for key in RESULT_FIELDS:
        if key not in row:
            row[key] = m.get(key)
    return {key: _finite(row[key]) for key in RESULT_FIELDS}


def load_models(
    draft_dir: str | Path, target_dir: str | Path
) -> tuple[HFTargetEngine, Eagle3Draft]:
    """The target (fp32 on CPU, as the evaluator loads it) and the exported draft on it."""
    from specforge_common.eagle3 import load_draft
    from specforge_common.targets import HFTargetEngine, default_dtype, load_embedding

    engine = HFTargetEngine.from_pretrained(target_dir, device="cpu",
                                            dtype=default_dtype("cpu"))  # fmt: skip
    draft = load_draft(draft_dir, embedding=load_embedding(target_dir), device="cpu")
    return engine, draft


def evaluate_prompt_sets(
    engine: HFTargetEngine,
    draft: Eagle3Draft,
    prompt_sets: Mapping[str, Sequence[Sequence[int]]],
    *,
    ks: Sequence[int],
    max_new_tokens: int,
    last_eval: Mapping[str, Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Decode every prompt set speculatively with the draft at each k, greedy, every output
    checked against the target's own; per set one target-only baseline (and one set of greedy
    references) serves every k, so the ks differ only in what k changes."""
    from specforge_evaluator.serving import ServingEval

    results: dict[str, list[dict[str, Any]]] = {}
    for name, prompts in prompt_sets.items():
        if not prompts:
            results[name] = []
            continue
        first = ServingEval(engine, prompts, num_draft_tokens=ks[0],
                            max_new_tokens=max_new_tokens)  # fmt: skip
        started = time.perf_counter()
        print(f"  {name}: target-only baseline on {len(prompts)} prompts ...", flush=True)
        first.prepare()
        print(f"  {name}: baseline done in {time.perf_counter() - started:.0f} s", flush=True)
        results[name] = []
        for k in ks:
            started = time.perf_counter()
            row = result_row(first.with_draft_tokens(k).evaluate(draft), k, len(prompts),
                             last_eval)  # fmt: skip
            results[name].append(row)
            print(
                f"  {name} k={k}: AL {_f(row['serving_acceptance_length'], '.3f')}, "
                f"speedup {_f(row['speedup'], '.2f', 'x')}, lossless {row['lossless']} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    return results


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }


def judge(
    args: argparse.Namespace, run: dict[str, Any], spec: RunSpec, source: str, limit: int
) -> dict[str, Any]:
    """Both prompt sets (built with the target's tokenizer) decoded at every k, in the JSON
    layout of ``quality.json``."""
    target = args.target or spec.target.path
    engine, draft = load_models(run["draft_dir"], target)
    tokenizer = engine.tokenizer
    held_out, own = held_out_prompts(spec, source, limit, tokenizer, args.prompts)
    sets = {HELD_OUT: held_out,
            OTHER_SOURCE: other_prompts(spec, OTHER_SOURCE, tokenizer, args.prompts)}  # fmt: skip
    sizes = {name: len(prompts) for name, prompts in sets.items()}
    results = evaluate_prompt_sets(engine, draft, sets, ks=args.ks,
                                   max_new_tokens=args.max_new_tokens,
                                   last_eval=run["last_eval"])  # fmt: skip
    described = {
        HELD_OUT: {"source": source, "split": "eval", "records_read": limit,
                   "eval_fraction": spec.eval_fraction, "seed": spec.seed,
                   "from_run_eval_split": own, "from_past_limit": len(held_out) - own},
        OTHER_SOURCE: {"source": OTHER_SOURCE, "split": None, "records_read": None},
    }  # fmt: skip
    notes = [f"{name}: only {n} prompts (asked for {args.prompts})"
             for name, n in sizes.items() if n < args.prompts]  # fmt: skip
    if not run["spec_matches_run"]:
        notes.append("the rebuilt run spec differs from the run's (another config, or --set "
                     "overrides): the held-out split may not be the run's")  # fmt: skip
    if len(held_out) > own:
        notes.append(f"{HELD_OUT}: the run's eval split has {own} usable prompts; "
                     f"{len(held_out) - own} more are eval-split records of the same source "
                     f"past the run's limit of {limit} records (never read by it)")  # fmt: skip
    return {
        "suite": "quality",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": Path(args.config).stem if Path(args.config).is_file() else args.config,
        "config": args.config,
        "machine": machine(),
        "run": run,
        "decode": {
            "target": str(target),
            "draft": run["draft_dir"],
            "ks": list(args.ks),
            "max_new_tokens": args.max_new_tokens,
            "temperature": 0.0,
            "max_prompt_tokens": spec.max_length - 1,
        },
        "prompt_sets": {
            name: described[name] | {"prompts": sizes[name], "results": results[name]}
            for name in results
        },
        "notes": notes,
    }


def all_lossless(result: Mapping[str, Any]) -> bool:
    return all(row["lossless"] is not False for s in result["prompt_sets"].values()
               for row in s["results"])  # fmt: skip


# --- 3. results ----------------------------------------------------------------------------


def write_results(result: Mapping[str, Any], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return out


def _f(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _seconds(phase: Mapping[str, Any]) -> str:
    return _f(phase.get("wall_s"), ".0f", " s")


def _cells(name: str, r: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """One table row as (header, text, width): the measured quality, then its four terms."""
    sim = r["simulated_acceptance_length_at_k"]
    rates = " ".join(_f(a, ".2f") for a in r["acceptance_per_position"])
    return [
        ("prompt set", name, -12),
        ("k", str(r["k"]), 2),
        ("n", str(r["prompts"]), 3),
        ("AL", _f(r["serving_acceptance_length"]), 5),
        ("1+sim@k", _f(None if sim is None else 1 + sim), 7),
        ("per-position acceptance", rates, -24),
        ("lossless", {True: "yes", False: "NO", None: "-"}[r["lossless"]], 8),
        ("tok/s spec", _f(r["tokens_per_s_spec"], ".1f"), 10),
        ("target", _f(r["tokens_per_s_target"], ".1f"), 7),
        ("speedup", _f(r["speedup"], ".2f", "x"), 7),
        ("plain", _f(r["plain_step_ms"], ".1f"), 6),
        ("verify", _f(r["verify_ms_per_step"], ".1f"), 6),
        ("draft", _f(r["draft_ms_per_token"], ".2f"), 6),
        ("ideal", _f(r["ideal_speedup"], ".2f", "x"), 6),
        ("of ideal", _f(r["speedup_vs_ideal"], ".2f"), 8),
    ]


def _line(cells: Sequence[tuple[str, int]]) -> str:
    """Cells joined two spaces apart; a negative width left-aligns."""
    return "  " + "  ".join(f"{text:<{-w}}" if w < 0 else f"{text:>{w}}" for text, w in cells)


def print_table(result: Mapping[str, Any]) -> None:
    """The run in two lines, then one line per prompt set and k."""
    run, m = result["run"], result["machine"]
    phases = run["phases"]
    print(f"\n== quality: {result['recipe']} (run {run['run_id']}, step {run['final_step']}, "
          f"{_count(run['samples_trained'])} samples, {_count(run['tokens_trained'])} tokens "
          "trained) ==")  # fmt: skip
    print(f"  run {_f(run['wall_s'], '.0f', ' s')}: capture {_seconds(phases['capture'])}, "
          f"train {_seconds(phases['train'])}, eval {_seconds(phases['eval'])} "
          f"(busy {_f(phases['eval']['busy_s'], '.0f', ' s')}); {m['platform']}, "
          f"{m['cores']} cores, {m['torch_threads']} torch threads")  # fmt: skip
    rows = [_cells(name, r) for name, s in result["prompt_sets"].items() for r in s["results"]]
    if rows:
        print(_line([(header, width) for header, _, width in rows[0]]))
    for cells in rows:
        print(_line([(text, width) for _, text, width in cells]))
    print("  AL = serving acceptance length (tokens per verification, bonus included); "
          "1+sim@k = 1 + the run's offline simulated acceptance length over k positions (no "
          "bonus); plain, verify, draft = ms per plain target step, per verification of k+1 "
          "tokens, per draft step; ideal = AL x plain / (verify + k x draft)")  # fmt: skip
    for note in result["notes"]:
        print(f"  note: {note}")
