"""A trainer's checkpoints: writing one at a step, announcing it, resuming from the latest.

The loop checkpoints at step 0 (untrained), every ``checkpoint_every`` steps, at the end of data
(``final``) and at the current step when asked to stop. Only rank 0 writes (through
``checkpoints.CheckpointManager``), with every rank's position and CPU RNG state gathered at the
checkpoint (a collective; under FSDP another one gathers the full weights and optimizer state),
and publishes a ``CheckpointEvent``. Each checkpoint gets its model card (``README.md``, from the
run spec, the enqueue summary's sources, samples and tokens trained and the latest loss; the
evaluator fills in the measurements later). Tokens trained are counted per rank at each
optimizer step, summed at the checkpoint and kept in its state (``tokens_trained``), so a resume
goes on counting. Before each write the ``best`` pointer is updated from the
run's ``EvalResult``s, and with ``train.keep_unevaluated`` rotation spares the checkpoints the
evaluator has not scored yet.

Exact resume (what ``specforge train`` does): the checkpoint ``latest`` names is refused
(``TrainerError``) when its state format, run-spec hash, vocab-map hash, world size,
parallelism or strategy differ from this trainer's; a final one means the run is finished.
Otherwise its weights, optimizer state, RNG states and position (``position.py``) are loaded,
and the event is published again if a crash came between the save and the publish.

Consume-once (``train.consume_features``, for stores that hold RAM such as ``mooncake://``):
the features of a train sample are deleted once a checkpoint covers the optimizer step that used
it -- not before, since a resume re-reads everything after the checkpoint. Each rank keeps the
locations it trained on since the last checkpoint and deletes them after the checkpoint's
collectives (a worker thread; a failed delete is logged, ``specforge sweep`` removes leftovers).
Eval samples and the vocab map stay. It needs ``epochs == 1`` and is refused in a replay, which
reads another run's features (``build.check_consume_once``).
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from specforge_common.bus import Bus
from specforge_common.contracts import CheckpointEvent, EvalResult, FeatureLocation
from specforge_common.durable import sha256_file
from specforge_common.eagle3.layout import WEIGHTS_NAME
from specforge_common.featurestore import FeatureStore, FeatureStoreError
from specforge_common.model_card import ModelCardFacts
from specforge_common.subjects import RunSubjects

from .build import Parallel, TrainerError, TrainerParts
from .checkpoints import STATE_FORMAT, STATE_NAME, TENSORS_NAME, SavedCheckpoint
from .data import StreamBatch
from .distributed import all_gather_objects, full_state, load_full_state
from .position import TrainingPosition, checkpoint_fields
from .telemetry import Telemetry, TrainResult

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

__all__ = ["Checkpointer", "delete_features"]


def delete_features(store: FeatureStore, locations: list[FeatureLocation]) -> tuple[int, int, str]:
    """Delete samples' features (idempotent): (deleted, their bytes, the first error or "")."""
    deleted = nbytes = 0
    error = ""
    for location in locations:
        try:
            store.delete(location)
        except FeatureStoreError as exc:
            error = error or repr(exc)
            continue
        deleted += 1
        nbytes += location.nbytes
    return deleted, nbytes, error


class Checkpointer:
    """Checkpoints of one ``Trainer.run``: the ones it wrote, and what they cover."""

    def __init__(
        self,
        bus: Bus,
        parts: TrainerParts,
        telemetry: Telemetry,
        *,
        rank: int,
        world_size: int,
        parallel: Parallel,
        log: FilteringBoundLogger,
    ) -> None:
        self.bus, self.parts, self.telemetry, self.log = bus, parts, telemetry, log
        self.rank, self.world_size, self.parallel = rank, world_size, parallel
        self.run_id = parts.spec.run_id
        self.manager = parts.checkpoints
        self.saved: list[SavedCheckpoint] = []
        self.checkpointed_step = -1  # the step of the newest checkpoint written or resumed
        self._consumed: list[FeatureLocation] = []  # trained since the last checkpoint
        # this rank's tokens trained so far (all epochs); -1: unknown (resumed from a
        # checkpoint that did not count them)
        self._tokens_trained = 0

    def track_trained(self, batches: list[StreamBatch]) -> None:
        """An optimizer step trained ``batches``: count their tokens; with consume-once, the
        next checkpoint covers these samples."""
        if self._tokens_trained >= 0:
            self._tokens_trained += sum(batch.num_tokens for batch in batches)
        if self.parts.spec.train.consume_features:
            self._consumed.extend(s.ref.features for b in batches for s in b.samples)

    # --- writing ---------------------------------------------------------------------------

    async def save(self, position: TrainingPosition, *, final: bool) -> SavedCheckpoint:
        """The checkpoint of ``position.global_step``: collectives on every rank, written and
        announced by rank 0."""
        parts, step = self.parts, position.global_step
        unevaluated: set[int] = set()
        if self.rank == 0:
            evals = [r async for _, r in self.bus.records(self.run_id, "evals", EvalResult)]
            if parts.spec.train.keep_unevaluated:  # the evaluator may lag behind the trainer
                unevaluated = set(self.manager.step_dirs()) - {r.step for r in evals}
            await asyncio.to_thread(self.manager.update_best, evals)  # rotation spares it
        self.telemetry.sync_step_logs()
        entry = position.rank_entry() | {"tokens_trained": self._tokens_trained}
        gathered: list[tuple[dict[str, int], torch.Tensor]] = [(entry, torch.get_rng_state())]
        if self.world_size > 1:  # a collective: every rank comes here at the same step
            gathered = await asyncio.to_thread(all_gather_objects, gathered[0])
        draft, optimizer_state = parts.draft, None
        if parts.fsdp:  # another collective: the full weights and optimizer state on rank 0
            weights, optimizer_state = await asyncio.to_thread(full_state, parts.compute,
                                                               parts.optimizer)  # fmt: skip
            if self.rank == 0:
                assert parts.export_draft is not None
                draft = parts.export_draft
                draft.load_state_dict(weights, strict=False)
        saved: SavedCheckpoint | None = None
        if self.rank == 0:
            state = self._state(position, [entry for entry, _ in gathered])
            tensors = self._tensors(optimizer_state)
            if self.world_size > 1:
                tensors["rng_cpu_by_rank"] = [rng for _, rng in gathered]
            saved = await asyncio.to_thread(
                self.manager.save, draft, step, state, final=final,
                protect=unevaluated, tensors=tensors, card=self._card_facts(state, final),
            )  # fmt: skip
            await self._publish(saved, state)
        if self.world_size > 1:  # the other ranks learn where rank 0 saved it
            saved = (await asyncio.to_thread(all_gather_objects, saved))[0]
        assert saved is not None
        self.saved.append(saved)
        self.checkpointed_step = step
        if self._consumed:
            await self._delete_consumed(step)
        return saved

    def _state(self, position: TrainingPosition, entries: list[dict[str, int]]) -> dict[str, Any]:
        """``trainer_state.json`` (``CheckpointManager.save`` adds format, step and final)."""
        parts = self.parts
        tokens = [int(entry.get("tokens_trained", -1)) for entry in entries]
        return {
            "run_id": self.run_id,
            "data_run": parts.data_run,
            "rank": self.rank,
            "world_size": self.world_size,
            "parallel": self.parallel,
            "strategy": parts.spec.draft.strategy,
            **checkpoint_fields(position, entries),
            "tokens_trained": sum(tokens) if min(tokens) >= 0 else None,
            "tokens_trained_by_rank": {str(rank): n for rank, n in enumerate(tokens)},
            "total_steps": parts.total_steps,
            "vocab_map_hash": parts.vocab_map.hash(),
            "run_spec_hash": parts.spec_hash,
            "metrics": self.telemetry.latest_metrics,
            "train_spec": msgspec.to_builtins(parts.spec.train),
            "created_at": time.time(),
        }

    def _card_facts(self, state: dict[str, Any], final: bool) -> ModelCardFacts | None:
        """The model card's facts (``CheckpointManager.save`` adds the config and sha256)."""
        try:
            loss = (state.get("metrics") or {}).get("loss")
            return ModelCardFacts.from_spec(
                self.parts.spec, step=int(state["global_step"]), final=final,
                samples_trained=int(state["samples_consumed"]),
                tokens_trained=state.get("tokens_trained"), sources=self.parts.summary.sources,
                train_loss=float(loss) if loss is not None and math.isfinite(loss) else None,
            )  # fmt: skip
        except Exception as exc:  # documentation only: never fail a checkpoint over it
            self.log.warning("model card facts unavailable; checkpoint saved without a card",
                             error=repr(exc))  # fmt: skip
            return None

    def _tensors(self, optimizer_state: dict[str, Any] | None) -> dict[str, Any]:
        """Optimizer and RNG states: tensors and plain containers (``weights_only`` loadable).
        FSDP passes the gathered optimizer state (keyed by parameter name)."""
        optimizer = optimizer_state
        if optimizer is None:
            optimizer = self.parts.optimizer.state_dict()
        tensors: dict[str, Any] = {"optimizer": optimizer, "rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors["rng_cuda"] = torch.cuda.get_rng_state_all()
        return tensors

    async def _publish(self, saved: SavedCheckpoint, state: dict[str, Any]) -> None:
        event = CheckpointEvent(
            run_id=self.run_id, step=saved.step, final=saved.final,
            samples_consumed=int(state["samples_consumed"]),
            last_sequence={int(r): int(s) for r, s in state["last_sequence_by_rank"].items()},
            checkpoint_uri=str(saved.path), checkpoint_sha256=saved.sha256,
            metrics=dict(state.get("metrics") or {}), run_spec_hash=self.parts.spec_hash,
        )  # fmt: skip
        msg_id = f"ckpt:{self.run_id}:{saved.step}"
        await self.bus.publish(RunSubjects(self.run_id).checkpoints, event, msg_id=msg_id)

    async def ensure_event(self, saved: SavedCheckpoint, state: dict[str, Any]) -> None:
        """Publish the checkpoint's event if a crash came between the save and the publish."""
        if self.rank != 0:
            return
        async for _, event in self.bus.records(self.run_id, "checkpoints", CheckpointEvent):
            if event.step == saved.step:
                return
        self.log.warning("republishing a checkpoint event lost in a crash", step=saved.step)
        await self._publish(saved, state)

    async def _delete_consumed(self, step: int) -> None:
        """Consume-once: the checkpoint at ``step`` covers these samples; free their features."""
        locations, self._consumed = self._consumed, []
        deleted, nbytes, error = await asyncio.to_thread(delete_features, self.parts.store,
                                                         locations)  # fmt: skip
        self.log.info("consumed features removed", step=step, removed=deleted, bytes=nbytes)
        if error:
            self.log.warning("cannot remove some consumed features (specforge sweep will)",
                             step=step, failed=len(locations) - deleted, error=error)  # fmt: skip

    # --- resuming --------------------------------------------------------------------------

    def resume_point(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint ``latest`` names and its state, checked against this trainer."""
        step_dir = self.manager.latest()
        if step_dir is None:
            return None
        try:
            state = self.manager.read_state(step_dir)
        except (OSError, ValueError) as exc:
            raise TrainerError(f"cannot resume from {step_dir}: unreadable state ({exc})") from None
        if state.get("format") != STATE_FORMAT:
            raise TrainerError(
                f"cannot resume run {self.run_id!r} from {step_dir}: its {STATE_NAME} has format "
                f"{state.get('format')!r}, this trainer reads format {STATE_FORMAT} (use "
                "--no-resume to train from scratch)"
            )
        parts = self.parts
        checks = {
            "run spec hash": (state.get("run_spec_hash"), parts.spec_hash),
            "vocab map hash": (state.get("vocab_map_hash"), parts.vocab_map.hash()),
            "world size": (state.get("world_size"), self.world_size),
            "parallelism": (state.get("parallel"), self.parallel),
            "strategy": (state.get("strategy"), parts.spec.draft.strategy),
        }
        for what, (theirs, mine) in checks.items():
            if theirs != mine:
                raise TrainerError(
                    f"cannot resume run {self.run_id!r} from {step_dir}: its {what} is "
                    f"{theirs!r} but this trainer's is {mine!r}; start a new run id (or "
                    "remove the run's checkpoints to train from scratch)"
                )
        if str(self.rank) not in state["last_sequence_by_rank"]:
            raise TrainerError(f"cannot resume rank {self.rank} from {step_dir}: it has no "
                               "position for this rank")  # fmt: skip
        return step_dir, state

    async def finished(self, step_dir: Path, state: dict[str, Any]) -> TrainResult:
        """The result of a run whose latest checkpoint is final: nothing to train."""
        saved = SavedCheckpoint(int(state["step"]), step_dir, sha256_file(step_dir / WEIGHTS_NAME),
                                True)  # fmt: skip
        self.log.info("run already finished: its latest checkpoint is final; nothing to train",
                      step=saved.step, final=str(step_dir))  # fmt: skip
        result = TrainResult(
            step=saved.step, samples_consumed=int(state["samples_consumed"]),
            last_sequence=int(state["last_sequence_by_rank"][str(self.rank)]), stopped=False,
            final=saved, checkpoints=[saved], history=[], samples_per_s=0.0, tokens_per_s=0.0,
            data_wait_fraction=0.0, stream={}, resumed_from=saved.step, already_finished=True,
        )  # fmt: skip
        await self.ensure_event(saved, state)
        position = TrainingPosition(global_step=result.step,
                                    samples_consumed=result.samples_consumed,
                                    last_sequence=result.last_sequence)  # fmt: skip
        await self.telemetry.progress(position, done=True)
        return result

    async def resume(self, step_dir: Path, state: dict[str, Any]) -> TrainingPosition:
        """Load a non-final checkpoint into the draft and optimizer; this rank's position."""
        position = await asyncio.to_thread(self._restore, step_dir, state)
        self.checkpointed_step = position.global_step
        counted = (state.get("tokens_trained_by_rank") or {}).get(str(self.rank))
        self._tokens_trained = int(counted) if counted is not None else -1
        sha256 = sha256_file(step_dir / WEIGHTS_NAME)
        await self.ensure_event(SavedCheckpoint(position.global_step, step_dir, sha256, False),
                                state)  # fmt: skip
        return position

    def _restore(self, step_dir: Path, state: dict[str, Any]) -> TrainingPosition:
        """Weights, optimizer and RNG states of ``step_dir`` (worker thread)."""
        from safetensors.torch import load_file

        parts = self.parts
        tensors = self.manager.read_tensors(step_dir)
        if tensors is None:
            raise TrainerError(f"cannot resume from {step_dir}: its {TENSORS_NAME} is missing")
        weights = load_file(step_dir / WEIGHTS_NAME)
        expected = set(self._export_state_keys())
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            raise TrainerError(f"cannot resume from {step_dir}: weights do not fit the draft "
                               f"(missing {missing}, unexpected {unexpected})")  # fmt: skip
        if parts.fsdp:
            load_full_state(parts.compute, parts.optimizer, weights, tensors["optimizer"])
        else:
            with torch.no_grad():
                parts.draft.load_state_dict(weights, strict=False)
            parts.optimizer.load_state_dict(tensors["optimizer"])
        rngs = tensors.get("rng_cpu_by_rank")
        if rngs is not None and self.rank < len(rngs):
            torch.set_rng_state(rngs[self.rank])
        else:
            torch.set_rng_state(tensors["rng_cpu"])
        if "rng_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(tensors["rng_cuda"])
        return TrainingPosition.from_checkpoint(state, self.rank)

    def _export_state_keys(self) -> list[str]:
        """The exported weight names, from the draft's (sharded) parameters and buffers."""
        return list(self.parts.draft.trainable_state_dict())
