"""The evaluator service: CheckpointEvents -> offline acceptance on the eval split -> EvalResults.

Lifecycle of one ``Evaluator``:

1. Read the EVAL split once: replay ``sf.<data run>.samples.eval`` from sequence 1 (following, so
   it waits while capture is still producing; the data run is the run itself, or the run a
   replayed run trains on) until ``spec.eval.max_samples`` usable SampleRefs or
   the ``EndOfSplit`` marker, whichever comes first, and fetch their tensors from the feature
   store. They stay in host memory for the life of the process: the eval set is small by design
   (``max_samples`` defaults to 64; ~64 x T x 4H floats), and every checkpoint is scored on
   exactly the same samples. Refs stamped with another run-spec hash, duplicate sample ids and
   samples whose tensors cannot be read or are malformed are skipped with a warning and counted;
   a message that is no SampleRef at all is dead-lettered and skipped by the bus.
2. Load the target's ``lm_head`` and embedding once (only those two tensors, never the layers).
3. Consume ``CheckpointEvent``s from the durable consumer ``"evaluator"`` on CHECKPOINTS, one at
   a time. Per event: check run id and run-spec hash, verify the sha256 of
   ``<checkpoint_uri>/model.safetensors``, ``load_draft``, compute the offline metrics (in a
   worker thread while the event loop keeps the message's ack timer alive), publish the
   ``EvalResult`` (``msg_id = eval:<run>:<step>``, so a redelivery after a crash publishes
   nothing twice) and ack the event after the PubAck. An event that can never succeed (foreign
   run, other spec, wrong sha, missing or malformed checkpoint) is dead-lettered with the reason;
   the next one is still evaluated. Before the publish, the checkpoint's model card
   (``README.md``) is rewritten with the measurements (``_rewrite_card``; a failure is logged
   as a warning and changes nothing else).

Each published EvalResult also goes to the run's tracker (``spec.tracking``; ``scalars.py``)
at the checkpoint's step, and each settled event updates the Prometheus metrics
(``metrics.py``; served by the command). With ``exit_when_final`` the loop returns after
settling the event with ``final=True``.
``stop()`` (SIGTERM) finishes the current checkpoint and returns.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from specforge_common import faults
from specforge_common.aio import cancel_and_wait
from specforge_common.batch import SampleError, check_sample, sample_seed
from specforge_common.bus import Bus, Delivery, heartbeat
from specforge_common.contracts import (
    CheckpointEvent,
    EndOfSplit,
    EvalResult,
    RunSpec,
    SampleRef,
)
from specforge_common.drafts import load_any_draft
from specforge_common.durable import sha256_file, write_atomic
from specforge_common.eagle3 import CheckpointError
from specforge_common.eagle3.layout import CONFIG_NAME, WEIGHTS_NAME
from specforge_common.featurestore import FeatureStore, FeatureStoreError
from specforge_common.lag_metrics import LagSource
from specforge_common.log import get_logger
from specforge_common.model_card import (
    CARD_NAME,
    Machine,
    ModelCardFacts,
    read_card_facts,
    render_model_card,
)
from specforge_common.models import DraftModel
from specforge_common.models.dflash import DFlashDraft
from specforge_common.progress import Figure
from specforge_common.replayed import data_run_spec
from specforge_common.strategies import STRATEGIES
from specforge_common.strategy import StrategyMetrics
from specforge_common.subjects import RunSubjects
from specforge_common.targets import load_embedding, load_lm_head
from specforge_common.tracking import NullTracker, Tracker, open_tracker

from .metrics import EvaluatorMetrics
from .offline import evaluate_strategy
from .scalars import eval_scalars
from .serving import ServingEval, prompts_from_samples

SERVICE = "evaluator"
DURABLE = "evaluator"


class Rejected(Exception):
    """A CheckpointEvent that can never be evaluated; the message is the dead-letter reason."""


@dataclass
class EvalSet:
    """The eval split in memory: stored tensors of each sample, in stream order."""

    samples: list[dict[str, Tensor]] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)
    prompt_ids: list[str] = field(default_factory=list)
    skipped: int = 0  # refs with another spec hash, duplicates, unreadable tensors
    reached_end: bool = False  # the EndOfSplit marker was read (else max_samples was reached)

    @property
    def tokens(self) -> int:
        return sum(int(s["input_ids"].shape[0]) for s in self.samples)


@dataclass
class EvaluatorReport:
    evaluated: list[int] = field(default_factory=list)  # steps with a published EvalResult
    dead_lettered: list[int] = field(default_factory=list)  # steps of rejected events
    final_step: int | None = None  # step of the final event, once settled
    final_evaluated: bool = False
    latest: EvalResult | None = None  # the last result published

    def figures(self) -> list[Figure]:
        """What a live progress bar shows (the number of checkpoints is not known ahead)."""
        latest = self.latest
        return [
            Figure("evaluated", len(self.evaluated)),
            Figure("last step", None if latest is None else latest.step),
            Figure(
                "accept-len",
                None if latest is None else latest.simulated_acceptance_length,
                digits=2,
            ),  # fmt: skip
            Figure("dead-lettered", len(self.dead_lettered) or None),
        ]


def checkpoint_dir(uri: str) -> Path:
    """The directory a ``checkpoint_uri`` names (an absolute path, optionally ``file://``)."""
    return Path(uri.removeprefix("file://"))


async def read_eval_split(
    bus: Bus, spec: RunSpec, store: FeatureStore, *, data_spec: RunSpec | None = None,
    progress_every: float = 10.0,
) -> EvalSet:  # fmt: skip
    """Up to ``spec.eval.max_samples`` eval samples of the data run (``data_spec``: ``spec``
    itself unless ``spec`` replays another run), stopping early at the EndOfSplit marker."""
    data_spec = data_spec or spec
    log = get_logger(service=SERVICE, run=spec.run_id, data_run=data_spec.run_id)
    spec_hash = data_spec.spec_hash()
    limit = spec.eval.max_samples
    out = EvalSet()
    seen: set[str] = set()

    async def progress() -> None:
        while True:
            await asyncio.sleep(progress_every)
            log.info(
                "waiting for eval samples (capture still producing?)",
                samples=len(out.samples),
                target=limit,
            )

    reporter = asyncio.create_task(progress())
    try:
        if limit > 0:
            replay = aclosing(bus.replay(data_spec.run_id, "eval", follow=True))
            async with replay as records:  # unsubscribe as soon as we stop reading
                async for _seq, record in records:
                    if record.run_spec_hash != spec_hash:
                        log.warning(
                            "eval record from another run spec skipped",
                            kind=type(record).__name__,
                            record_spec=record.run_spec_hash,
                            spec=spec_hash,
                        )
                        out.skipped += isinstance(record, SampleRef)
                        continue
                    if isinstance(record, EndOfSplit):
                        out.reached_end = True
                        break
                    if record.sample_id in seen:
                        out.skipped += 1
                        continue
                    try:
                        if record.method != data_spec.capture_method:
                            raise SampleError(
                                f"it holds {record.method!r} features, the run trains on "
                                f"{data_spec.capture_method!r}"
                            )
                        tensors = store.get(record.features)
                        check_sample(tensors, method=data_spec.capture_method)
                    except (FeatureStoreError, SampleError) as exc:
                        log.warning(
                            "eval sample unreadable, skipped",
                            sample_id=record.sample_id,
                            error=str(exc),
                        )
                        out.skipped += 1
                        continue
                    seen.add(record.sample_id)
                    out.samples.append(dict(tensors))
                    out.sample_ids.append(record.sample_id)
                    out.prompt_ids.append(record.prompt_id)
                    if len(out.samples) >= limit:
                        break
    finally:
        await cancel_and_wait(reporter)
    return out


def eval_result_fields(metrics: StrategyMetrics, eval_set: EvalSet) -> dict:
    """``acceptance_rates``, ``simulated_acceptance_length`` and ``metrics`` of an EvalResult,
    the same columns for every algorithm (``acc_{k}`` per drafted position).

    No supervised position at all (an empty eval split, or samples without loss tokens) gives
    empty rates and no acceptance length: zeros would claim a measurement that was not made.
    """
    supervised = metrics.supervised_positions()
    base = {
        "eval/samples": float(len(eval_set.samples)),
        "eval/samples_skipped": float(eval_set.skipped),
        "eval/tokens": float(eval_set.tokens),
        "eval/supervised_positions": supervised,
    }
    if supervised == 0:
        return {
            "acceptance_rates": [],
            "simulated_acceptance_length": None,
            "metrics": base | {"eval/no_data": 1.0},
        }
    ratios = metrics.summary()
    positions = sum(1 for k in ratios if k.startswith("acc_") and k[4:].isdigit())
    summary = {f"eval/{k}": float(v) for k, v in ratios.items()}
    return {
        "acceptance_rates": [ratios[f"acc_{k}"] for k in range(positions)],
        "simulated_acceptance_length": ratios["simulated_acc_len"],
        "metrics": summary | base,
    }


class Evaluator:
    """Scores every checkpoint of one run on the run's eval split (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        spec: RunSpec,
        store: FeatureStore,
        *,
        device: str | torch.device = "cpu",
        exit_when_final: bool = False,
        fetch_timeout: float = 1.0,
        data_spec: RunSpec | None = None,
    ) -> None:
        self.bus = bus
        self.spec = spec
        self.data_spec = data_spec  # of the run whose eval split is read (a replay's data run)
        self.store = store
        self.device = torch.device(device)
        self.exit_when_final = exit_when_final
        self.fetch_timeout = fetch_timeout
        self.run_id = spec.run_id
        self.spec_hash = spec.spec_hash()
        self.subjects = RunSubjects(self.run_id)
        self.log = get_logger(service=SERVICE, run=self.run_id)
        self.eval_set: EvalSet | None = None
        self.serving: ServingEval | None = None
        self.target_head: Tensor | None = None
        self.embedding: Tensor | None = None
        self.report = EvaluatorReport()
        self.tracker: Tracker = NullTracker()  # run() opens the run's
        self.metrics = EvaluatorMetrics(self.run_id)  # served when the command is given a port
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Finish the checkpoint in hand, then return from ``run`` (SIGTERM handler)."""
        self._stop.set()

    async def prepare(self) -> None:
        """Read the eval split and the target tensors (``run`` calls it if not done)."""
        started = time.perf_counter()
        if self.data_spec is None:
            self.data_spec = await data_run_spec(self.bus, self.spec, wait=True)
        self.eval_set = await read_eval_split(self.bus, self.spec, self.store,
                                              data_spec=self.data_spec)  # fmt: skip
        head = load_lm_head(self.spec.target.path)
        # CPU: fp32 (low-precision matmuls are very slow there); GPU: the stored dtype.
        head_dtype = torch.float32 if self.device.type == "cpu" else head.dtype
        self.target_head = head.to(device=self.device, dtype=head_dtype)
        self.embedding = load_embedding(self.spec.target.path)
        es = self.eval_set
        self.log.info(
            "eval split loaded",
            samples=len(es.samples),
            tokens=es.tokens,
            skipped=es.skipped,
            reached_end=es.reached_end,
            max_samples=self.spec.eval.max_samples,
            seconds=round(time.perf_counter() - started, 3),
        )
        if not es.samples:
            self.log.warning(
                "the eval split has no samples: EvalResults will carry no acceptance rates"
            )
        if self.spec.eval.serving_prompts > 0:
            self.serving = await asyncio.to_thread(self._prepare_serving)

    def _prepare_serving(self) -> ServingEval | None:
        """The full target and the eval prompts for real speculative decoding (worker thread)."""
        from specforge_common.targets import HFTargetEngine

        assert self.eval_set is not None
        cfg = self.spec.eval
        prompts = prompts_from_samples(self.eval_set.samples, cfg.serving_prompts)
        if not prompts:
            self.log.warning("no eval sample has a prompt: serving metrics are skipped")
            return None
        engine = HFTargetEngine.for_run(self.spec, device=self.device)
        serving = ServingEval(engine, prompts, num_draft_tokens=cfg.num_draft_tokens,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              seed=self.spec.seed)  # fmt: skip
        serving.prepare()
        self.log.info("serving evaluation ready", prompts=len(prompts), k=cfg.num_draft_tokens,
                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      target_tokens_per_s=round(serving.baseline_tokens_per_s, 2))  # fmt: skip
        return serving

    async def run(self) -> EvaluatorReport:
        """Evaluate checkpoints until stopped (or the final one, with ``exit_when_final``);
        raises ``TrackingUnavailable`` first if the run tracks to a backend not installed."""
        self.tracker = open_tracker(self.spec, "eval")
        try:
            return await self._run()
        finally:
            self.tracker.close()
            self.tracker = NullTracker()

    async def _run(self) -> EvaluatorReport:
        if self.eval_set is None:
            prepared = asyncio.create_task(self.prepare())
            stopped = asyncio.create_task(self._stop.wait())
            await asyncio.wait({prepared, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not prepared.done():
                await cancel_and_wait(prepared)
                self.log.info("stopped before the eval split was read")
                return self.report
            prepared.result()
        consumer = await self.bus.work_consumer(
            self.run_id, "checkpoints", DURABLE, CheckpointEvent, service=SERVICE
        )
        self.log.info("consuming checkpoint events", durable=DURABLE)
        lag = LagSource(self.run_id, "checkpoints", DURABLE)
        async with self.metrics.polling_lag(self.bus, [lag]):
            try:
                if self.exit_when_final and await self._final_already_settled():
                    self.log.info("the final checkpoint was already evaluated; nothing to do")
                    return self.report
                while not self._stop.is_set():
                    for delivery in await consumer.fetch(batch=1, timeout=self.fetch_timeout):
                        final = await self.handle(delivery)
                        if final and self.exit_when_final:
                            self.log.info(
                                "final checkpoint settled; exiting",
                                step=self.report.final_step,
                                evaluated=self.report.final_evaluated,
                            )
                            return self.report
            finally:
                await consumer.close()
        self.log.info("stopped", evaluated=len(self.report.evaluated))
        return self.report

    async def handle(self, delivery: Delivery[CheckpointEvent]) -> bool:
        """Evaluate (or dead-letter) one event; returns whether it was the final checkpoint."""
        event = delivery.record
        try:
            async with heartbeat(lambda: [delivery], self.bus.config.ack_wait_s):
                result = await self._evaluate(event)
        except Rejected as exc:
            self.log.error(
                "checkpoint event dead-lettered",
                step=event.step,
                uri=event.checkpoint_uri,
                reason=str(exc),
            )
            await delivery.dead_letter(str(exc), SERVICE)
            self.report.dead_lettered.append(event.step)
            self.metrics.dead_lettered()
        else:
            # the card first: a reader of the EvalResult finds it filled in (failures only log)
            faults.point("evaluator.mid_eval")  # evaluated, nothing published or acked
            await self._rewrite_card(event, result)
            await self.bus.publish(
                self.subjects.evals, result, msg_id=f"eval:{self.run_id}:{event.step}"
            )
            await delivery.ack_sync()
            self.tracker.log_scalars(event.step, eval_scalars(result))
            self.report.evaluated.append(event.step)
            self.metrics.evaluated(result)
            self.report.latest = result
            if event.final:
                self.report.final_evaluated = True
        if event.final:
            self.report.final_step = event.step
        return event.final

    async def _rewrite_card(self, event: CheckpointEvent, result: EvalResult) -> None:
        """Fill the checkpoint's model card (``README.md``) in with ``result``; never raises."""
        try:
            await asyncio.to_thread(self._write_card, event, result)
        except Exception as exc:  # documentation only: never fail an evaluation over it
            self.log.warning("model card not updated", step=event.step,
                             uri=event.checkpoint_uri, error=repr(exc))  # fmt: skip

    def _write_card(self, event: CheckpointEvent, result: EvalResult) -> None:
        """The card's facts come from the card the trainer wrote (else from the spec, the event
        and ``config.json``); a card naming other weights than the ones scored is left alone.
        Only ``README.md`` is replaced: the weights and their sha256 are untouched."""
        directory = checkpoint_dir(event.checkpoint_uri)
        facts = read_card_facts(directory)
        if facts is None:
            config = json.loads((directory / CONFIG_NAME).read_text())
            loss = event.metrics.get("loss")
            facts = ModelCardFacts.from_spec(
                self.spec, step=event.step, final=event.final,
                samples_trained=event.samples_consumed, weights_sha256=result.checkpoint_sha256,
                train_loss=loss if loss is not None and math.isfinite(loss) else None,
                config=config,
            )  # fmt: skip
        elif facts.weights_sha256 and facts.weights_sha256 != result.checkpoint_sha256:
            self.log.warning("model card not updated: it describes other weights than the ones "
                             "evaluated (the step dir was replaced)", step=event.step,
                             card_sha256=facts.weights_sha256,
                             evaluated_sha256=result.checkpoint_sha256)  # fmt: skip
            return
        text = render_model_card(facts, result, draft_dir=directory,
                                 machine=Machine.current(self.device))  # fmt: skip
        write_atomic(directory / CARD_NAME, text)

    def _check_fits(self, draft: DraftModel, directory: Path) -> None:
        """Refuse a draft built for another target or algorithm before running it on this
        run's features."""
        assert self.eval_set is not None and self.target_head is not None
        config = draft.config
        block = isinstance(draft, DFlashDraft)
        if block != (self.spec.capture_method == "dflash"):
            raise Rejected(
                f"checkpoint {directory} is a {type(draft).__name__} but run {self.run_id!r} "
                f"trains {self.spec.draft.strategy!r}"
            )
        if config.vocab_size != self.target_head.shape[0]:
            raise Rejected(
                f"checkpoint {directory} has a target vocabulary of "
                f"{config.vocab_size} but the target's lm_head has "
                f"{self.target_head.shape[0]} rows"
            )
        width = config.target_width if block else 3 * config.aux_hidden_size
        if self.eval_set.samples:
            aux_dim = self.eval_set.samples[0]["aux_hidden_states"].shape[-1]
            if width != aux_dim:
                raise Rejected(
                    f"checkpoint {directory} expects captured features of width {width} but "
                    f"the run's have {aux_dim}"
                )

    async def _final_already_settled(self) -> bool:
        """Whether the stream's last CheckpointEvent is final and the consumer acked past it
        (a restarted ``exit_when_final`` evaluator has nothing left to wait for)."""
        last = await self.bus.last_entry(self.run_id, "checkpoints", CheckpointEvent)
        if last is None:
            return False
        seq, event = last
        lag = await self.bus.consumer_lag(self.run_id, "checkpoints", DURABLE)
        return event.final and lag.ack_floor >= seq

    async def _evaluate(self, event: CheckpointEvent) -> EvalResult:
        assert self.eval_set is not None and self.target_head is not None
        if event.run_id != self.run_id:
            raise Rejected(
                f"event is for run {event.run_id!r}, this evaluator serves {self.run_id!r}"
            )
        if event.run_spec_hash != self.spec_hash:
            raise Rejected(
                f"event was produced under run spec {event.run_spec_hash}, the run's "
                f"spec is {self.spec_hash}"
            )
        started = time.perf_counter()
        directory = checkpoint_dir(event.checkpoint_uri)
        weights = directory / WEIGHTS_NAME
        try:
            sha = await asyncio.to_thread(sha256_file, weights)
        except FileNotFoundError:
            raise Rejected(
                f"checkpoint file {weights} does not exist (deleted by rotation, "
                "or not on a filesystem this evaluator sees)"
            ) from None
        except OSError as exc:
            raise Rejected(f"cannot read checkpoint file {weights}: {exc}") from exc
        if sha != event.checkpoint_sha256:
            raise Rejected(
                f"sha256 of {weights} is {sha} but the event says "
                f"{event.checkpoint_sha256}; the checkpoint was modified or "
                "replaced after it was announced"
            )
        try:
            draft = await asyncio.to_thread(
                load_any_draft, directory, embedding=self.embedding, device=self.device
            )
        except (CheckpointError, ValueError) as exc:
            raise Rejected(f"cannot load checkpoint {directory}: {exc}") from exc
        self._check_fits(draft, directory)
        if self.device.type == "cpu":
            draft = draft.float()  # low-precision matmuls are far slower than fp32 on CPUs
        loaded = time.perf_counter()
        assert self.embedding is not None
        strategy = STRATEGIES.get(self.spec.draft.strategy).from_spec(
            self.spec, draft, target_head=self.target_head,
            target_embedding=self.embedding.to(self.device, self.target_head.dtype),
            total_steps=_total_steps(directory),
        )  # fmt: skip
        seeds = [sample_seed(self.spec.seed, p, 0) for p in self.eval_set.prompt_ids]
        metrics = await asyncio.to_thread(
            evaluate_strategy, strategy, draft, self.eval_set.samples,
            batch_size=self.spec.eval.batch_size, seeds=seeds,
        )  # fmt: skip
        offline = time.perf_counter()
        wall = {"load": loaded - started, "offline": offline - loaded}
        fields = eval_result_fields(metrics, self.eval_set)
        if self.serving is not None:
            outcome = await asyncio.to_thread(self.serving.evaluate, draft)
            wall["serving"] = outcome.seconds
            fields |= outcome.as_fields()
            fields["metrics"] = fields["metrics"] | outcome.metrics
        del draft
        done = time.perf_counter()
        result = EvalResult(
            run_id=self.run_id,
            step=event.step,
            checkpoint_sha256=sha,
            wall_seconds=wall,
            run_spec_hash=self.spec_hash,
            **fields,
        )
        self.log.info(
            "checkpoint evaluated",
            step=event.step,
            final=event.final,
            acc=[round(a, 4) for a in result.acceptance_rates],
            simulated_acceptance_length=result.simulated_acceptance_length,
            serving_acceptance_length=result.serving_acceptance_length,
            lossless=result.lossless,
            speedup=result.metrics.get("speedup"),
            samples=len(self.eval_set.samples),
            wall_s=round(done - started, 3),
        )
        return result


def _total_steps(directory: Path) -> int:
    """The run's optimizer steps, from the checkpoint's trainer state (loss schedules need a
    horizon; offline metrics do not depend on it)."""
    try:
        state = json.loads((directory / "trainer_state.json").read_text())
        return max(1, int(state.get("total_steps") or 1))
    except (OSError, ValueError, TypeError):
        return 1
