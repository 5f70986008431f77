"""The trainer: a run's train samples -> EAGLE-3 draft updates -> checkpoints and events.

Setup reads everything from the bus and the store (run spec, enqueue summary, vocab map) and the
target directory (config, ``lm_head``, embedding), so a trainer needs nothing but a run id. The
loop runs the compute (collate, forward, backward, optimizer step) in a worker thread, so the
event loop keeps reading the samples log, prefetching features and talking to NATS meanwhile.

Per optimizer step (``global_step`` counts them): ``accumulation_steps`` micro-batches, each
loss divided by it (a trailing partial window is rescaled to a full one), global grad-norm
clipping at ``max_grad_norm`` (the pre-clip norm is logged), AdamW, and the LR of
``schedule.lr_at``. Every ``log_every`` steps: a JSON log line, ``TrainerProgress`` in the KV
bucket. Checkpoints: step 0 (untrained), every ``checkpoint_every`` steps, a final one at the
end of data; each is announced with a ``CheckpointEvent``. ``request_stop()`` (SIGTERM) writes a
checkpoint at the current step and returns.

Exact resume (``resume=True``, what ``specforge train`` does): when the run has a checkpoint
(the ``latest`` file), its weights, optimizer state, RNG states and counters are loaded and the
samples log is re-read from the sequence after the checkpoint's position in the same epoch, so
the batches after the resume are the ones the uninterrupted run would have formed. With
``train.shuffle_window > 1`` epochs after the first are shuffled (``SampleStream``, seeded by
``spec.seed``); a resume inside such an epoch skips by the checkpoint's ``epoch_index`` (the
index of the last trained sample in that epoch's order) instead of the sequence. Resume
refuses (``TrainerError``) when run-spec hash, vocab-map hash, world size or strategy differ
from the checkpoint's; a final checkpoint means the run is finished (``already_finished``).
A fresh start seeds torch's global RNG with ``spec.seed + rank``.

Every optimizer step appends ``{"step", "epoch", "rank", "seqs", "samples"}`` to
``<output_dir>/<run>/trained_samples.jsonl`` (rank > 0: ``trained_samples.rank<N>.jsonl``);
a resume cuts it back to the checkpoint's step, so it lists exactly what the weights saw. Rank 0
also appends every log line's metrics to ``<output_dir>/<run>/train_metrics.jsonl`` (cut back
the same way; ``specforge report`` plots it).

Multi-rank (``world_size > 1``, under torchrun; see ``distributed.py``): the process group is
joined in ``setup`` (gloo on CPU, nccl on CUDA) and the draft is wrapped in DDP (only the
trainable parameters take part). Each rank reads its shard of the split (``SampleStream``:
position in split ``% world_size == rank``). Every micro-step starts with one small all-reduce
(MAX) of ``[have a batch, have more after it, stop requested]``, so all ranks agree on the
accumulation boundary, the end of data and a stop: a rank whose shard ran out while others still
have data runs a zero-loss forward/backward on a dummy batch (zero gradients, same collectives),
so all ranks make the same number of optimizer steps. As DDP averages gradients over all
ranks, such a step weighs the remaining ranks' gradients by ``1 / world_size`` (like a smaller
global batch); it only happens in the last optimizer steps of a run, and its trained-samples
entry lists no samples. The global batch of one
optimizer step is ``world_size * batch_size * accumulation_steps`` samples; non-boundary
micro-steps run under ``no_sync()`` (one gradient all-reduce per optimizer step), clipping uses
the global norm of the all-reduced gradients, the metric sums are all-reduced (SUM) before any
ratio is logged. Only rank 0 writes checkpoints (with every rank's position, sample count, epoch
and CPU RNG state, gathered at the checkpoint) and publishes CheckpointEvents; every rank writes
its own ``TrainerProgress`` and trained-samples log. The LR schedule counts the optimizer steps
of the largest shard (``ceil(train / world_size)`` samples).

Replay: a spec with ``data_run`` set trains on that run's samples log, enqueue summary and
vocab map (its SampleRefs carry the data run's spec hash); checkpoints and events are the run's
own.

Consume-once (``train.consume_features``, for stores that hold RAM such as ``mooncake://``): the
features of a train sample are deleted once a checkpoint covers the optimizer step that used it
-- not before, since a resume re-reads everything after the checkpoint. Each rank keeps the
locations it trained on since the last checkpoint and deletes them after the checkpoint's
collectives (a worker thread; a failed delete is logged, ``specforge sweep`` removes leftovers).
Eval samples and the vocab map stay. It needs ``epochs == 1`` and is refused in a replay (which
reads another run's features).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import torch

from specforge_common.bus import Bus, BusError
from specforge_common.contracts import (
    CheckpointEvent,
    EnqueueSummary,
    EvalResult,
    FeatureLocation,
    RunSpec,
    TrainerProgress,
)
from specforge_common.eagle3 import Eagle3Metrics, VocabMap, apply_vocab_map, load_draft
from specforge_common.featurestore import FeatureStore, FeatureStoreError, open_store
from specforge_common.log import get_logger
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft
from specforge_common.registry import DRAFT_ARCHITECTURES, STRATEGIES
from specforge_common.step_log import (
    StepLog,
    read_step_log,
    train_metrics_path,
    trained_samples_path,
)
from specforge_common.subjects import RunSubjects, enqueue_key, progress_key
from specforge_common.targets import load_embedding, load_lm_head, resolve_aux_layer_ids

from .checkpoints import CheckpointManager, SavedCheckpoint, checkpoints_root, sha256_file
from .data import BatchReader, SampleStream, StreamBatch, collate
from .distributed import (
    DistEnv,
    DraftModule,
    all_gather_objects,
    all_reduce_flags,
    all_reduce_metrics,
    all_reduce_sum,
    full_state,
    init_process_group,
    load_full_state,
    shard_draft,
)
from .schedule import LRSchedule, total_optimizer_steps

__all__ = ["TrainResult", "Trainer", "TrainerError", "build_draft", "load_vocab_map"]

SERVICE = "trainer"


def read_trained_samples(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a trained-samples log; a torn last line (a crash mid-write) is dropped."""
    return read_step_log(path)


class TrainerError(RuntimeError):
    """The trainer cannot start or go on (missing spec, inconsistent inputs); says why."""


def load_vocab_map(store: FeatureStore, summary: EnqueueSummary, vocab_size: int,
                   draft_vocab_size: int) -> VocabMap:  # fmt: skip
    """The run's draft vocab map from the store, checked against the summary's hash."""
    if summary.vocab_map is None:
        if draft_vocab_size == vocab_size:
            return VocabMap.identity(vocab_size)
        raise TrainerError(
            f"the enqueue summary of run {summary.run_id} has no vocab map but the draft vocab "
            f"({draft_vocab_size}) is smaller than the target's ({vocab_size})"
        )
    tensors = store.get(summary.vocab_map)
    vocab_map = VocabMap(d2t=tensors["d2t"], t2d=tensors["t2d"])
    vocab_map.validate()
    if summary.vocab_map_hash and vocab_map.hash() != summary.vocab_map_hash:
        raise TrainerError(
            f"vocab map in the store hashes to {vocab_map.hash()} but the enqueue summary says "
            f"{summary.vocab_map_hash}; the store copy was modified"
        )
    if (vocab_map.target_vocab_size, vocab_map.draft_vocab_size) != (vocab_size, draft_vocab_size):
        raise TrainerError(
            f"vocab map is V={vocab_map.target_vocab_size}, V_d={vocab_map.draft_vocab_size} but "
            f"the target has V={vocab_size} and the spec asks V_d={draft_vocab_size}"
        )
    return vocab_map


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


def _target_config(target_dir: str | Path) -> dict[str, Any]:
    path = Path(target_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainerError(f"target {target_dir} has no config.json") from None


def build_draft(spec: RunSpec, vocab_map: VocabMap, embedding: torch.Tensor) -> Eagle3Draft:
    """The fp32 draft a run starts from: seeded fresh init, or ``spec.draft.init_from``."""
    target_config = _target_config(spec.target.path)
    text = target_config.get("text_config", target_config)
    aux = resolve_aux_layer_ids(spec.draft.aux_layer_ids, None, int(text["num_hidden_layers"]))
    if spec.draft.init_from:
        draft = load_draft(spec.draft.init_from, embedding=embedding, vocab_map=vocab_map,
                           dtype=torch.float32)  # fmt: skip
        config = draft.config
        if config.aux_layer_ids is not None and tuple(config.aux_layer_ids) != tuple(aux):
            raise TrainerError(
                f"warm-start draft {spec.draft.init_from} was trained on aux layers "
                f"{list(config.aux_layer_ids)} but this run captures {list(aux)}"
            )
        if config.aux_hidden_size != int(text["hidden_size"]):
            raise TrainerError(
                f"warm-start draft takes target hidden size {config.aux_hidden_size}, the target "
                f"has {text['hidden_size']}"
            )
    else:
        cls = DRAFT_ARCHITECTURES.get(spec.draft.architecture)
        config_cls = getattr(cls, "config_class", Eagle3Config)
        config = config_cls.from_target(target_config, draft_vocab_size=spec.draft.draft_vocab_size,
                                        aux_layer_ids=aux, **spec.draft.config)  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG left alone
            torch.manual_seed(spec.seed)
            draft = cls(config)
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(embedding)
        apply_vocab_map(draft, vocab_map)
    draft.embed_tokens.weight.requires_grad_(False)
    return draft.float()


def _check_data_run(spec: RunSpec, data_spec: RunSpec) -> None:
    """A replayed run must read features its draft can take: same target and aux layers."""
    pairs = {
        "target.path": (spec.target.path, data_spec.target.path),
        "draft.aux_layer_ids": (spec.draft.aux_layer_ids, data_spec.draft.aux_layer_ids),
        "draft.draft_vocab_size": (spec.draft.draft_vocab_size, data_spec.draft.draft_vocab_size),
    }
    for name, (mine, theirs) in pairs.items():
        if mine != theirs:
            raise TrainerError(
                f"run {spec.run_id!r} replays run {data_spec.run_id!r} but its {name} is "
                f"{mine!r} and the data run's is {theirs!r}"
            )


@dataclass
class _Window:
    """What accumulates between two log lines."""

    metrics: Eagle3Metrics
    micro_steps: int = 0  # the same on every rank (dummy steps count)
    samples: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class TrainResult:
    step: int
    samples_consumed: int
    last_sequence: int
    stopped: bool  # stopped by request_stop() before the end of data
    final: SavedCheckpoint | None  # the final checkpoint (None when stopped)
    checkpoints: list[SavedCheckpoint]
    history: list[dict[str, float]]  # every logged entry
    samples_per_s: float
    tokens_per_s: float
    data_wait_fraction: float
    stream: dict[str, Any]
    rank: int = 0
    world_size: int = 1
    resumed_from: int | None = None  # the step of the checkpoint this run resumed from
    already_finished: bool = False  # the run had a final checkpoint: nothing was trained

    @property
    def last_checkpoint(self) -> SavedCheckpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None


class Trainer:
    def __init__(
        self,
        bus: Bus,
        run_id: str,
        *,
        device: str = "cpu",
        rank: int = 0,
        spec_timeout: float = 60.0,
        summary_timeout: float | None = None,
        prefetch: int | None = None,
        fetch_threads: int = 2,
        resume: bool = False,
        world_size: int = 1,
        local_rank: int | None = None,
        parallel: Literal["ddp", "fsdp"] = "ddp",
    ) -> None:
        if not 0 <= rank < world_size:
            raise TrainerError(f"rank {rank} is outside world size {world_size}")
        if parallel not in ("ddp", "fsdp"):
            raise TrainerError(f"parallel must be 'ddp' or 'fsdp', not {parallel!r}")
        self.parallel = parallel
        self.bus, self.run_id, self.rank = bus, run_id, rank
        self.resume, self.world_size = resume, world_size
        self.local_rank = rank if local_rank is None else local_rank
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainerError("--device cuda was asked for but torch sees no CUDA device")
        if self.device.type == "cuda" and world_size > 1 and self.device.index is None:
            self.device = torch.device("cuda", self.local_rank)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.fsdp = False  # the draft's parameters are sharded over the ranks
        self.spec_timeout, self.summary_timeout = spec_timeout, summary_timeout
        self.prefetch, self.fetch_threads = prefetch, fetch_threads
        self.subjects = RunSubjects(run_id)
        self.log = get_logger(service=SERVICE, run=run_id, rank=rank)
        self._stop = asyncio.Event()
        self._ready = False

    def request_stop(self) -> None:
        """Checkpoint at the current step and return from ``run`` (signal-handler safe)."""
        if not self._stop.is_set():
            self.log.warning("stop requested: checkpointing at the current step")
        self._stop.set()

    # --- setup -----------------------------------------------------------------------------

    async def _wait_record(self, key: str, record_type: Any, what: str, timeout: float | None):
        try:
            return await self.bus.wait_for_record(key, record_type, timeout=timeout, what=what)
        except BusError as exc:
            raise TrainerError(f"{exc}; start the run (specforge enqueue) or check --run") from None

    async def setup(self) -> None:
        if self._ready:
            return
        spec: RunSpec = await self._wait_record(self.run_id, RunSpec, "run spec", self.spec_timeout)
        self.spec, self.spec_hash = spec, spec.spec_hash()
        self.log = self.log.bind(spec_hash=self.spec_hash)
        self.data_run = getattr(spec, "data_run", "") or self.run_id
        if spec.train.consume_features:
            self._check_consume_once(spec)
        data_spec = spec
        if self.data_run != self.run_id:
            data_spec = await self._wait_record(
                self.data_run, RunSpec, f"run spec of data run {self.data_run!r}", self.spec_timeout
            )
            _check_data_run(spec, data_spec)
        self.data_spec_hash = data_spec.spec_hash()
        summary: EnqueueSummary = await self._wait_record(
            enqueue_key(self.data_run), EnqueueSummary, "enqueue summary", self.summary_timeout
        )
        if summary.run_spec_hash != self.data_spec_hash:
            raise TrainerError(
                f"the enqueue summary of run {self.data_run!r} was written under spec "
                f"{summary.run_spec_hash}, that run's spec is {self.data_spec_hash}"
            )
        self.summary = summary
        self.store = open_store(data_spec.store_uri)
        target_config = _target_config(spec.target.path)
        text = target_config.get("text_config", target_config)
        vocab_size, self.target_hidden = int(text["vocab_size"]), int(text["hidden_size"])

        loop = asyncio.get_running_loop()
        self.vocab_map = await loop.run_in_executor(
            None, load_vocab_map, self.store, summary, vocab_size, spec.draft.draft_vocab_size
        )
        embedding = await loop.run_in_executor(None, load_embedding, spec.target.path)
        head = await loop.run_in_executor(None, load_lm_head, spec.target.path)
        draft = await loop.run_in_executor(None, build_draft, spec, self.vocab_map, embedding)
        if self.device.type == "cpu" and head.dtype not in (torch.float32, torch.float64):
            head = head.float()  # low-precision matmuls are far slower than fp32 on CPUs
        self.draft = draft.to(self.device)
        self.head = head.to(self.device)
        strategy_cls = STRATEGIES.get(spec.draft.strategy)
        self.strategy = strategy_cls(self.draft, self.head, ttt_length=spec.train.ttt_length,
                                     attention=spec.train.attention)  # fmt: skip
        train = spec.train
        self.compute: torch.nn.Module = DraftModule(self.draft, self.strategy)
        if self.world_size > 1:
            env = DistEnv(self.rank, self.world_size, self.local_rank)
            await loop.run_in_executor(None, init_process_group, env, self.device)
            if self.parallel == "fsdp":
                # rank 0 exports through an unsharded copy (checkpoints are sharding-free)
                self._export_draft = copy.deepcopy(self.draft).cpu() if self.rank == 0 else None
                self.compute = shard_draft(self.compute)
                self.fsdp = True
            else:
                ids = [self.device.index] if self.device.type == "cuda" else None
                self.ddp = torch.nn.parallel.DistributedDataParallel(self.compute, device_ids=ids)
                self.compute = self.ddp
        self.params = [p for p in self.draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=train.learning_rate, betas=(0.9, 0.999),
                                           eps=1e-8, weight_decay=train.weight_decay)  # fmt: skip
        shard = math.ceil(summary.train / self.world_size)  # the largest rank's share
        self.total_steps = total_optimizer_steps(train, shard)
        self.schedule = LRSchedule.from_train_spec(train, self.total_steps)
        self.checkpoints = CheckpointManager(
            checkpoints_root(spec.output_dir, self.run_id), keep_last=train.keep_last
        )
        self._ready = True
        self.log.info(
            "trainer ready", device=str(self.device), target=spec.target.path,
            draft_params=sum(p.numel() for p in self.params), train_samples=summary.train,
            total_steps=self.total_steps, warmup_steps=self.schedule.warmup,
            vocab_map_hash=self.vocab_map.hash(), checkpoints=str(self.checkpoints.root),
            parallel=self.parallel if self.world_size > 1 else None,
            warm_start=spec.draft.init_from or None,
            data_run=self.data_run if self.data_run != self.run_id else None,
        )  # fmt: skip

    def _check_consume_once(self, spec: RunSpec) -> None:
        """Consume-once deletes what it trained on: no later epoch or other run may need it."""
        why = ""
        if spec.train.epochs > 1:
            why = f"train.epochs is {spec.train.epochs}: later epochs re-read every sample"
        elif self.data_run != self.run_id:
            why = f"it replays run {self.data_run!r}, whose features are not its to delete"
        if why:
            raise TrainerError(
                f"run {self.run_id!r} cannot use train.consume_features: {why}; set "
                "train.consume_features = false (or train.epochs = 1)"
            )

    # --- compute (worker thread) -----------------------------------------------------------

    def _dummy_batch(self) -> Any:
        """A tiny finite batch for the zero-loss step of a rank whose shard ran out."""
        T, H = 4, self.target_hidden
        return collate([{
            "input_ids": torch.zeros(T, dtype=torch.int64),
            "loss_mask": torch.ones(T, dtype=torch.int64),
            "aux_hidden_states": torch.zeros(T, 3 * H), "hidden_states": torch.zeros(T, H),
        }])  # fmt: skip

    def _forward_backward(self, batch: StreamBatch | None, sync: bool = True) -> Eagle3Metrics:
        """One micro-step; ``batch=None``: a zero-loss step (zero gradients, same collectives).
        ``sync=False`` (DDP, not an optimizer-step boundary): no gradient all-reduce."""
        train_batch = (self._dummy_batch() if batch is None else batch.collate()).to(self.device)
        cuda = self.device.type == "cuda"
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else nullcontext()
        if self.fsdp:  # FSDP's no_sync: keep unsharded gradients, reduce-scatter at the boundary
            self.compute.set_requires_gradient_sync(sync)
        with no_sync:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss, metrics = self.compute(train_batch)
            if batch is None:
                (loss * 0.0).backward()
            else:
                (loss / self.spec.train.accumulation_steps).backward()
        if batch is None:
            return Eagle3Metrics.zeros(self.spec.train.ttt_length, metrics.step_weight_decay)
        return metrics

    def _optimizer_step(self, micro_batches: int, step: int) -> tuple[float, float]:
        accumulation = self.spec.train.accumulation_steps
        if micro_batches != accumulation:  # trailing partial window: average over what it had
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(accumulation / micro_batches)
        max_norm = self.spec.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else math.inf)
        if self.fsdp:  # a DTensor over the shards: the global norm
            norm = norm.full_tensor()
        norm = float(norm)
        lr = self.schedule(step)
        if math.isfinite(norm):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        else:
            self.log.warning("non-finite gradient norm: update skipped", step=step, grad_norm=norm)
        self.optimizer.zero_grad(set_to_none=True)
        return norm, lr

    # --- the loop --------------------------------------------------------------------------

    async def _next_batch(self, reader: BatchReader) -> StreamBatch | None:
        """The next batch, or None at end of data or when a stop was requested meanwhile."""
        if self._stop.is_set():
            return None
        fetch = asyncio.ensure_future(reader.next())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if fetch.done():
            return fetch.result()
        fetch.cancel()
        try:
            await fetch
        except asyncio.CancelledError:
            pass
        return None

    def _position(self) -> dict[str, Any]:
        """This rank's part of a checkpoint (gathered on rank 0)."""
        return {"last_sequence": self.last_sequence, "samples_consumed": self.samples_consumed,
                "epoch": self.epoch, "epoch_samples": self.epoch_samples,
                "epoch_index": self.epoch_index}  # fmt: skip

    def _start_index(self) -> int:
        """Where the stream starts in the first epoch's order: a resume inside a shuffled epoch
        (not epoch 0, which is read in stream order from ``last_sequence + 1``) goes on after
        the index of the last sample the weights saw in that epoch."""
        if self.spec.train.shuffle_window > 1 and self.epoch > 0:
            return self.epoch_index + 1
        return 0

    def _state(self, positions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        positions = positions or [self._position()]
        by_rank = {str(r): p for r, p in enumerate(positions)} if len(positions) > 1 else {
            str(self.rank): positions[0]}  # fmt: skip
        return {
            "run_id": self.run_id,
            "data_run": self.data_run,
            "rank": self.rank,
            "world_size": self.world_size,
            "parallel": self.parallel,
            "strategy": self.spec.draft.strategy,
            "global_step": self.global_step,
            "samples_consumed": sum(p["samples_consumed"] for p in positions),
            "last_sequence": self.last_sequence,
            "last_sequence_by_rank": {r: p["last_sequence"] for r, p in by_rank.items()},
            "samples_consumed_by_rank": {r: p["samples_consumed"] for r, p in by_rank.items()},
            "epoch_by_rank": {r: p["epoch"] for r, p in by_rank.items()},
            "epoch_samples_by_rank": {r: p["epoch_samples"] for r, p in by_rank.items()},
            "epoch_index_by_rank": {r: p["epoch_index"] for r, p in by_rank.items()},
            "epoch": self.epoch,
            "epoch_samples": self.epoch_samples,
            "total_steps": self.total_steps,
            "vocab_map_hash": self.vocab_map.hash(),
            "run_spec_hash": self.spec_hash,
            "metrics": self.latest_metrics,
            "train_spec": msgspec.to_builtins(self.spec.train),
            "created_at": time.time(),
        }

    async def _checkpoint(self, *, final: bool) -> SavedCheckpoint:
        step = self.global_step
        unevaluated: set[int] = set()
        if self.rank == 0:
            evals = [r async for _, r in self.bus.records(self.run_id, "evals", EvalResult)]
            if self.spec.train.keep_unevaluated:  # the evaluator may lag behind the trainer
                unevaluated = set(self.checkpoints.step_dirs()) - {r.step for r in evals}
            await asyncio.to_thread(self.checkpoints.update_best, evals)  # rotation spares it
        self._sync_step_logs()
        gathered: list[tuple[dict[str, Any], torch.Tensor]] = [(self._position(),
                                                                torch.get_rng_state())]  # fmt: skip
        if self.world_size > 1:  # a collective: every rank comes here at the same step
            gathered = await asyncio.to_thread(all_gather_objects, gathered[0])
        draft, optimizer_state = self.draft, None
        if self.fsdp:  # another collective: the full weights and optimizer state on rank 0
            weights, optimizer_state = await asyncio.to_thread(full_state, self.compute,
                                                               self.optimizer)  # fmt: skip
            if self.rank == 0:
                draft = self._export_draft
                draft.load_state_dict(weights, strict=False)
        saved: SavedCheckpoint | None = None
        if self.rank == 0:
            state = self._state([p for p, _ in gathered])
            tensors = self._tensors(optimizer_state)
            if self.world_size > 1:
                tensors["rng_cpu_by_rank"] = [rng for _, rng in gathered]
            saved = await asyncio.to_thread(
                self.checkpoints.save, draft, step, state, final=final,
                protect=unevaluated, tensors=tensors,
            )  # fmt: skip
            event = CheckpointEvent(
                run_id=self.run_id, step=step, final=final,
                samples_consumed=int(state["samples_consumed"]),
                last_sequence={int(r): int(q) for r, q in state["last_sequence_by_rank"].items()},
                checkpoint_uri=str(saved.path), checkpoint_sha256=saved.sha256,
                metrics=dict(self.latest_metrics), run_spec_hash=self.spec_hash,
            )  # fmt: skip
            msg_id = f"ckpt:{self.run_id}:{step}"
            await self.bus.publish(self.subjects.checkpoints, event, msg_id=msg_id)
        if self.world_size > 1:  # the other ranks learn where rank 0 saved it
            saved = (await asyncio.to_thread(all_gather_objects, saved))[0]
        assert saved is not None
        self.saved.append(saved)
        self._checkpointed_step = step
        if self._consumed:
            await self._delete_consumed(step)
        return saved

    async def _delete_consumed(self, step: int) -> None:
        """Consume-once: the checkpoint at ``step`` covers these samples; free their features."""
        locations, self._consumed = self._consumed, []
        deleted, nbytes, error = await asyncio.to_thread(delete_features, self.store, locations)
        self.log.info("consumed features removed", step=step, removed=deleted, bytes=nbytes)
        if error:
            self.log.warning("cannot remove some consumed features (specforge sweep will)",
                             step=step, failed=len(locations) - deleted, error=error)  # fmt: skip

    def _tensors(self, optimizer_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Optimizer and RNG states: tensors and plain containers (``weights_only`` loadable).
        FSDP passes the gathered optimizer state (keyed by parameter name)."""
        tensors: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict()
            if optimizer_state is None
            else optimizer_state,
            "rng_cpu": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            tensors["rng_cuda"] = torch.cuda.get_rng_state_all()
        return tensors

    # --- resume ----------------------------------------------------------------------------

    def _resume_point(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint ``latest`` names and its state, checked against this trainer."""
        step_dir = self.checkpoints.latest()
        if step_dir is None:
            return None
        try:
            state = self.checkpoints.read_state(step_dir)
        except (OSError, ValueError) as exc:
            raise TrainerError(f"cannot resume from {step_dir}: unreadable state ({exc})") from None
        if int(state.get("format", 1)) < 2 and not state.get("final"):
            raise TrainerError(
                f"cannot resume run {self.run_id!r} from {step_dir}: it was written by an older "
                "trainer without the training state a resume needs (use --no-resume)"
            )
        checks = {
            "run spec hash": (state.get("run_spec_hash"), self.spec_hash),
            "vocab map hash": (state.get("vocab_map_hash"), self.vocab_map.hash()),
            "world size": (state.get("world_size"), self.world_size),
            "parallelism": (state.get("parallel", "ddp"), self.parallel),
            "strategy": (state.get("strategy"), self.spec.draft.strategy),
        }
        for what, (theirs, mine) in checks.items():
            if theirs != mine:
                raise TrainerError(
                    f"cannot resume run {self.run_id!r} from {step_dir}: its {what} is "
                    f"{theirs!r} but this trainer's is {mine!r}; start a new run id (or "
                    "remove the run's checkpoints to train from scratch)"
                )
        if int(state.get("format", 1)) < 2:  # an old final checkpoint: the run is finished
            position = {str(self.rank): state.get("last_sequence", 0)}
            state.setdefault("last_sequence_by_rank", position)
        if str(self.rank) not in state.get("last_sequence_by_rank", {}):
            raise TrainerError(f"cannot resume rank {self.rank} from {step_dir}: it has no "
                               "position for this rank")  # fmt: skip
        return step_dir, state

    def _restore(self, step_dir: Path, state: dict[str, Any]) -> None:
        """Weights, optimizer, RNG and counters of ``step_dir`` (worker thread)."""
        from safetensors.torch import load_file

        tensors = self.checkpoints.read_tensors(step_dir)
        if tensors is None:
            raise TrainerError(f"cannot resume from {step_dir}: it has no training state "
                               "(written by an older trainer)")  # fmt: skip
        weights = load_file(step_dir / "model.safetensors")
        expected = set(self._export_state_keys())
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            raise TrainerError(f"cannot resume from {step_dir}: weights do not fit the draft "
                               f"(missing {missing}, unexpected {unexpected})")  # fmt: skip
        if self.fsdp:
            load_full_state(self.compute, self.optimizer, weights, tensors["optimizer"])
        else:
            with torch.no_grad():
                self.draft.load_state_dict(weights, strict=False)
            self.optimizer.load_state_dict(tensors["optimizer"])
        rngs = tensors.get("rng_cpu_by_rank")
        if rngs is not None and self.rank < len(rngs):
            torch.set_rng_state(rngs[self.rank])
        else:
            torch.set_rng_state(tensors["rng_cpu"])
        if "rng_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(tensors["rng_cuda"])
        me = str(self.rank)
        self.global_step = int(state["step"])
        self.samples_consumed = int(state.get("samples_consumed_by_rank", {}).get(
            me, state["samples_consumed"]))  # fmt: skip
        self.last_sequence = int(state["last_sequence_by_rank"][me])
        self.epoch = int(state.get("epoch_by_rank", {}).get(me, state["epoch"]))
        self.epoch_samples = int(state.get("epoch_samples_by_rank", {}).get(
            me, state.get("epoch_samples", 0)))  # fmt: skip
        self.epoch_index = int(state.get("epoch_index_by_rank", {}).get(me, -1))
        shuffled = self.spec.train.shuffle_window > 1 and self.epoch > 0
        if shuffled and self.epoch_samples > 0 and self.epoch_index < 0:
            raise TrainerError(f"cannot resume from {step_dir} inside shuffled epoch "
                               f"{self.epoch}: it has no epoch index for rank {me}")  # fmt: skip
        self.latest_metrics = dict(state.get("metrics") or {})

    def _export_state_keys(self) -> list[str]:
        """The exported weight names, from the draft's (sharded) parameters and buffers."""
        frozen = tuple(self.draft.frozen_prefixes)
        return [k for k in self.draft.state_dict() if not k.startswith(frozen)]

    async def _ensure_event(self, saved: SavedCheckpoint, state: dict[str, Any]) -> None:
        """Publish the checkpoint's event if a crash came between the save and the publish."""
        if self.rank != 0:
            return
        async for _, event in self.bus.records(self.run_id, "checkpoints", CheckpointEvent):
            if event.step == saved.step:
                return
        event = CheckpointEvent(
            run_id=self.run_id, step=saved.step, final=saved.final,
            samples_consumed=int(state["samples_consumed"]),
            last_sequence={int(r): int(s) for r, s in state["last_sequence_by_rank"].items()},
            checkpoint_uri=str(saved.path), checkpoint_sha256=saved.sha256,
            metrics=dict(state.get("metrics") or {}), run_spec_hash=self.spec_hash,
        )  # fmt: skip
        self.log.warning("republishing a checkpoint event lost in a crash", step=saved.step)
        msg_id = f"ckpt:{self.run_id}:{saved.step}"
        await self.bus.publish(self.subjects.checkpoints, event, msg_id=msg_id)

    # --- trained-samples log ---------------------------------------------------------------

    def _open_step_logs(self, keep_through: int | None) -> None:
        """Start the logs afresh, or (resume) keep only the entries of steps <= keep_through."""
        output_dir = self.spec.output_dir
        self._trained = StepLog(trained_samples_path(output_dir, self.run_id, self.rank),
                                keep_through)  # fmt: skip
        self._metrics_log = None
        if self.rank == 0:
            self._metrics_log = StepLog(train_metrics_path(output_dir, self.run_id), keep_through)

    def _close_step_logs(self) -> None:
        self._trained.close()
        if self._metrics_log is not None:
            self._metrics_log.close()

    def _record_trained(self, batches: list[StreamBatch]) -> None:
        samples = [s for b in batches for s in b.samples]
        if self.spec.train.consume_features:
            self._consumed.extend(s.ref.features for s in samples)
        self._trained.append({"step": self.global_step, "epoch": self.epoch, "rank": self.rank,
                              "seqs": [s.seq for s in samples],
                              "samples": [s.ref.sample_id for s in samples]})  # fmt: skip

    def _sync_step_logs(self) -> None:
        """On disk before the checkpoint that covers them."""
        for log in (getattr(self, "_trained", None), getattr(self, "_metrics_log", None)):
            if log is not None:
                log.sync()

    async def _progress(self, *, done: bool) -> None:
        record = TrainerProgress(run_id=self.run_id, rank=self.rank, step=self.global_step,
                                 samples_consumed=self.samples_consumed,
                                 last_sequence=self.last_sequence, done=done,
                                 run_spec_hash=self.spec_hash)  # fmt: skip
        await self.bus.put_record(progress_key(self.run_id, self.rank), record)

    def _log_window(self, window: _Window, grad_norm: float, lr: float) -> dict[str, float]:
        """One log line of the window's metrics, summed over the ranks (a collective)."""
        wall = max(time.perf_counter() - window.started, 1e-9)
        busy = window.compute_s + window.wait_s
        metrics, samples, tokens = window.metrics, window.samples, window.tokens
        if self.world_size > 1:
            metrics = all_reduce_metrics(metrics)
            samples, tokens = all_reduce_sum([float(samples), float(tokens)])
        summary = metrics.summary()
        K = self.spec.train.ttt_length
        entry: dict[str, float] = {
            "step": float(self.global_step),
            "epoch": float(self.epoch),
            "lr": lr,
            "grad_norm": grad_norm,
            "loss": summary["loss"],
            **{f"acc_{k}": summary[f"acc_{k}"] for k in range(K)},
            "acc": summary["acc"],
            "simulated_acc_len": summary["simulated_acc_len"],
            "samples_per_s": samples / wall,
            "tokens_per_s": tokens / wall,
            "data_wait": window.wait_s / busy if busy > 0 else 0.0,
        }
        self.log.info("train", **{k: (int(v) if k in ("step", "epoch") else round(v, 6))
                                  for k, v in entry.items()})  # fmt: skip
        if self._metrics_log is not None:
            self._metrics_log.append({"step": self.global_step, "epoch": self.epoch,
                                      **{k: v for k, v in entry.items()
                                         if k not in ("step", "epoch")}})  # fmt: skip
        self.history.append(entry)
        self.latest_metrics = entry
        return entry

    def _finished_result(self, step_dir: Path, state: dict[str, Any]) -> TrainResult:
        saved = SavedCheckpoint(int(state["step"]), step_dir,
                                sha256_file(step_dir / "model.safetensors"), True)  # fmt: skip
        self.log.info("run already finished: its latest checkpoint is final; nothing to train",
                      step=saved.step, final=str(step_dir))  # fmt: skip
        return TrainResult(
            step=saved.step, samples_consumed=int(state["samples_consumed"]),
            last_sequence=int(state["last_sequence_by_rank"][str(self.rank)]), stopped=False,
            final=saved, checkpoints=[saved], history=[], samples_per_s=0.0, tokens_per_s=0.0,
            data_wait_fraction=0.0, stream={}, resumed_from=saved.step, already_finished=True,
        )  # fmt: skip

    async def run(self) -> TrainResult:
        await self.setup()
        self.global_step, self.samples_consumed, self.last_sequence, self.epoch = 0, 0, 0, 0
        self.epoch_samples, self.epoch_index = 0, -1
        self.history: list[dict[str, float]] = []
        self.latest_metrics: dict[str, float] = {}
        self.saved: list[SavedCheckpoint] = []
        self._checkpointed_step = -1
        self._consumed: list[FeatureLocation] = []  # trained since the last checkpoint
        point = self._resume_point() if self.resume else None
        resumed_from: int | None = None
        if point is not None:
            step_dir, state = point
            if state.get("final"):
                result = self._finished_result(step_dir, state)
                await self._ensure_event(result.final, state)
                await self._progress_from(result, done=True)
                return result
            await asyncio.to_thread(self._restore, step_dir, state)
            resumed_from = self._checkpointed_step = self.global_step
            sha256 = sha256_file(step_dir / "model.safetensors")
            await self._ensure_event(SavedCheckpoint(self.global_step, step_dir, sha256, False),
                                     state)  # fmt: skip
            self.log.info("resuming", step=self.global_step, checkpoint=str(step_dir),
                          epoch=self.epoch, samples=self.samples_consumed,
                          start_seq=self.last_sequence + 1)  # fmt: skip
        else:
            torch.manual_seed(self.spec.seed + self.rank)  # training randomness is the spec's
        self._open_step_logs(resumed_from)
        try:
            return await self._train(resumed_from)
        finally:
            self._close_step_logs()

    async def _progress_from(self, result: TrainResult, *, done: bool) -> None:
        record = TrainerProgress(run_id=self.run_id, rank=self.rank, step=result.step,
                                 samples_consumed=result.samples_consumed,
                                 last_sequence=result.last_sequence, done=done,
                                 run_spec_hash=self.spec_hash)  # fmt: skip
        await self.bus.put_record(progress_key(self.run_id, self.rank), record)

    async def _agree(self, batch: StreamBatch | None) -> tuple[bool, bool, bool]:
        """(some rank has a batch, some rank has data after it, some rank was told to stop)."""
        flags = [int(batch is not None), int(batch is not None and not batch.last),
                 int(self._stop.is_set())]  # fmt: skip
        if self.world_size > 1:  # off the event loop: a rank may wait for the others' data
            flags = await asyncio.to_thread(all_reduce_flags, flags)
        return bool(flags[0]), bool(flags[1]), bool(flags[2])

    async def _train(self, resumed_from: int | None) -> TrainResult:
        train = self.spec.train
        prefetch = self.prefetch or max(4, 2 * train.batch_size)
        stream = SampleStream(
            self.bus, self.store, self.data_run, spec_hash=self.data_spec_hash,
            epochs=train.epochs, start_seq=self.last_sequence + 1, first_epoch=self.epoch,
            prefetch=prefetch, fetch_threads=self.fetch_threads,
            aux_size=3 * self.target_hidden, hidden_size=self.target_hidden, service=SERVICE,
            rank=self.rank, world_size=self.world_size,
            shuffle_window=train.shuffle_window, shuffle_seed=self.spec.seed,
            start_index=self._start_index(),
        )  # fmt: skip
        reader = BatchReader(stream, train.batch_size)
        capped = train.total_steps is not None
        final: SavedCheckpoint | None = None
        started = time.perf_counter()
        total_compute = 0.0
        tokens_total = 0
        async with stream:
            if capped and self.global_step >= self.total_steps:
                batch = None  # resumed at the step cap: only the final checkpoint is missing
            else:
                batch = await self._next_batch(reader)
            any_batch, any_more, any_stop = await self._agree(batch)
            ended = not any_batch and not any_stop
            if resumed_from is None:
                await self._checkpoint(final=ended)  # step 0; final too when there is no data
            window = _Window(Eagle3Metrics.zeros(train.ttt_length))
            wait_mark = stream.stats.wait_s
            micro = pending_samples = 0
            pending: list[StreamBatch] = []
            grad_norm, lr = float("nan"), self.schedule(self.global_step)
            while any_batch and not any_stop:
                t0 = time.perf_counter()
                # Every rank agrees on the boundary: the window is full, or no rank has more.
                stepped = micro + 1 == train.accumulation_steps or not any_more
                metrics = await asyncio.to_thread(self._forward_backward, batch, stepped)
                micro += 1
                window.micro_steps += 1
                window.metrics = window.metrics + metrics
                if batch is not None:
                    pending.append(batch)
                    window.samples += batch.num_samples
                    window.tokens += batch.num_tokens
                    tokens_total += batch.num_tokens
                    pending_samples += batch.num_samples
                if stepped:
                    grad_norm, lr = await asyncio.to_thread(
                        self._optimizer_step, micro, self.global_step
                    )
                    micro = 0
                    self.global_step += 1
                    # Position = what the weights have seen: a dropped partial window is not.
                    self.samples_consumed += pending_samples
                    for seen in pending:
                        if seen.epoch != self.epoch:
                            self.epoch, self.epoch_samples, self.epoch_index = seen.epoch, 0, -1
                        self.epoch_samples += seen.num_samples
                        self.epoch_index = seen.samples[-1].index
                    if pending:
                        self.last_sequence = pending[-1].last_sequence
                    self._record_trained(pending)
                    pending_samples, pending = 0, []
                elapsed = time.perf_counter() - t0
                window.compute_s += elapsed
                total_compute += elapsed
                if stepped:
                    ended = not any_more or (capped and self.global_step >= self.total_steps)
                    if self.global_step % train.log_every == 0 or ended:
                        window.wait_s = stream.stats.wait_s - wait_mark
                        self._log_window(window, grad_norm, lr)
                        await self._progress(done=False)
                        window = _Window(Eagle3Metrics.zeros(train.ttt_length))
                        wait_mark = stream.stats.wait_s
                    if ended:
                        break
                    if self.global_step % train.checkpoint_every == 0:
                        await self._checkpoint(final=False)
                batch = await self._next_batch(reader)
                any_batch, any_more, any_stop = await self._agree(batch)
                ended = not any_batch and not any_stop
            stopped = not ended
            if stopped:
                if window.micro_steps:  # steps since the last log (a partial window is dropped)
                    window.wait_s = stream.stats.wait_s - wait_mark
                    self._log_window(window, grad_norm, lr)
                if self._checkpointed_step != self.global_step:
                    await self._checkpoint(final=False)
            elif self.saved and self.saved[-1].final:
                final = self.saved[-1]  # no data at all: the step-0 checkpoint is the final one
            else:
                final = await self._checkpoint(final=True)
            await self._progress(done=not stopped)
        wall = max(time.perf_counter() - started, 1e-9)
        busy = total_compute + stream.stats.wait_s
        result = TrainResult(
            step=self.global_step, samples_consumed=self.samples_consumed,
            last_sequence=self.last_sequence, stopped=stopped, final=final,
            checkpoints=list(self.saved), history=self.history,
            samples_per_s=self.samples_consumed / wall, tokens_per_s=tokens_total / wall,
            data_wait_fraction=stream.stats.wait_s / busy if busy > 0 else 0.0,
            stream=dataclasses.asdict(stream.stats), resumed_from=resumed_from,
            rank=self.rank, world_size=self.world_size,
        )  # fmt: skip
        self.log.info(
            "training stopped" if stopped else "training done", step=self.global_step,
            samples=self.samples_consumed, last_sequence=self.last_sequence,
            samples_per_s=round(result.samples_per_s, 3),
            tokens_per_s=round(result.tokens_per_s, 1),
            data_wait=round(result.data_wait_fraction, 4),
            skipped_foreign=stream.stats.skipped_foreign,
            dead_lettered=stream.stats.dead_lettered,
            recaptured=stream.stats.recaptured,
            final=str(final.path) if final else None,
            checkpoint=str(self.saved[-1].path) if self.saved else None,
        )  # fmt: skip
        return result
