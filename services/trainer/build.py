"""Everything a trainer needs before its first step, built from a run id alone.

The run spec, the enqueue summary and the vocab map come from the bus and the feature store;
the target's config, ``lm_head`` and embedding from the target directory. A replay (a spec with
``data_run`` set) reads the data run's spec, samples log, summary and vocab map, and must match
it in target, aux layers and draft vocab size; checkpoints and events are the run's own.

Multi-rank (``world_size > 1``, under torchrun; see ``distributed.py``): the process group is
joined here (gloo on CPU, nccl on CUDA) and the draft is wrapped in DDP (only the trainable
parameters take part) or sharded with FSDP2, in which case rank 0 keeps an unsharded CPU copy
to export checkpoints through. The LR schedule counts the optimizer steps of the largest shard
(``ceil(train / world_size)`` samples).
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from specforge_common.bus import Bus, BusError
from specforge_common.contracts import EnqueueSummary, RunSpec
from specforge_common.eagle3 import VocabMap, load_draft
from specforge_common.eagle3.layout import CONFIG_NAME
from specforge_common.eagle3.vocab import from_stored
from specforge_common.featurestore import FeatureStore, open_store
from specforge_common.models import DraftModel
from specforge_common.precision import ResolvedPrecision, resolve_precision
from specforge_common.registry import DRAFT_ARCHITECTURES
from specforge_common.strategies import STRATEGIES
from specforge_common.strategy import Strategy
from specforge_common.subjects import enqueue_key
from specforge_common.targets import (
    AuxLayerIds,
    layer_ids_for_run,
    load_embedding,
    load_lm_head,
)

from .checkpoints import CheckpointManager, checkpoints_root
from .distributed import DistEnv, DraftModule, init_process_group, shard_draft
from .schedule import LRSchedule, total_optimizer_steps

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

__all__ = [
    "Parallel",
    "TrainerError",
    "TrainerParts",
    "build_draft",
    "build_parts",
    "load_vocab_map",
    "resolve_device",
]

Parallel = Literal["ddp", "fsdp"]


class TrainerError(RuntimeError):
    """The trainer cannot start or go on (missing spec, inconsistent inputs); says why."""


@dataclass
class TrainerParts:
    """What ``build_parts`` read and built; the trainer holds it for the whole run."""

    spec: RunSpec
    spec_hash: str
    data_run: str  # the run whose samples are trained: this run, or the one it replays
    data_spec_hash: str  # stamped on the data run's SampleRefs
    summary: EnqueueSummary
    store: FeatureStore
    target_hidden: int
    method: str  # the capture method of the samples trained on
    layer_ids: AuxLayerIds  # the target layers those samples hold, in order
    vocab_map: VocabMap
    draft: DraftModel  # fp32, on the device; sharded in place under FSDP
    precision: ResolvedPrecision  # the step's autocast (``specforge_common.precision``)
    head: torch.Tensor  # the target's frozen lm_head
    strategy: Strategy
    weighted_loss: bool  # the strategy's losses are weighted sums (``specforge_common.strategy``)
    compute: torch.nn.Module  # the strategy's forward as a module, wrapped for DDP / FSDP
    ddp: torch.nn.parallel.DistributedDataParallel | None
    fsdp: bool  # the draft's parameters are sharded over the ranks
    export_draft: DraftModel | None  # FSDP, rank 0: the unsharded copy checkpoints export
    params: list[torch.nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    total_steps: int
    schedule: LRSchedule
    checkpoints: CheckpointManager


def resolve_device(device: str, world_size: int, local_rank: int) -> torch.device:
    """The torch device of this rank (``cuda`` becomes ``cuda:<local_rank>`` under torchrun)."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TrainerError("--device cuda was asked for but torch sees no CUDA device")
    if resolved.type == "cuda" and world_size > 1 and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda" and resolved.index is not None:
        torch.cuda.set_device(resolved)
    return resolved


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
    stored = VocabMap(d2t=tensors["d2t"], t2d=tensors["t2d"])
    if summary.vocab_map_hash and stored.hash() != summary.vocab_map_hash:
        raise TrainerError(
            f"vocab map in the store hashes to {stored.hash()} but the enqueue summary says "
            f"{summary.vocab_map_hash}; the store copy was modified"
        )
    vocab_map = from_stored(tensors, draft_vocab_size)  # a replay may ask for another size
    if (vocab_map.target_vocab_size, vocab_map.draft_vocab_size) != (vocab_size, draft_vocab_size):
        raise TrainerError(
            f"vocab map is V={vocab_map.target_vocab_size}, V_d={vocab_map.draft_vocab_size} but "
            f"the target has V={vocab_size} and the spec asks V_d={draft_vocab_size}"
        )
    return vocab_map


def target_config(target_dir: str | Path) -> dict[str, Any]:
    path = Path(target_dir) / CONFIG_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainerError(f"target {target_dir} has no {CONFIG_NAME}") from None


def build_draft(spec: RunSpec, vocab_map: VocabMap, embedding: torch.Tensor) -> DraftModel:
    """The fp32 draft a run starts from: seeded fresh init, or ``spec.draft.init_from``."""
    config_dict = target_config(spec.target.path)
    text = config_dict.get("text_config", config_dict)
    aux = layer_ids_for_run(spec, int(text["num_hidden_layers"]))
    architecture = spec.draft_architecture
    if spec.draft.init_from and architecture != "llama_eagle3":
        raise TrainerError(
            f"draft.init_from warm-starts EAGLE-3 drafts only; this run trains {architecture!r}"
        )
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
        draft.embed_tokens.weight.requires_grad_(False)
    else:
        cls = DRAFT_ARCHITECTURES.get(architecture)
        config = cls.config_class.from_target(
            config_dict, draft_vocab_size=spec.draft.draft_vocab_size, aux_layer_ids=aux,
            **spec.draft.config,
        )  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG left alone
            torch.manual_seed(spec.seed)
            draft = cls(config)
        draft.attach_target(embedding, vocab_map)
    return draft.float()


def check_data_run(spec: RunSpec, data_spec: RunSpec) -> None:
    """A replayed run must read features its draft can take: same target, capture method and
    layers (its draft vocabulary may differ: ``load_vocab_map`` builds it from the data run's
    counts)."""
    pairs = {
        "target.path": (spec.target.path, data_spec.target.path),
        "capture method": (spec.capture_method, data_spec.capture_method),
        "draft.aux_layer_ids": (spec.draft.aux_layer_ids, data_spec.draft.aux_layer_ids),
    }
    for name, (mine, theirs) in pairs.items():
        if mine != theirs:
            raise TrainerError(
                f"run {spec.run_id!r} replays run {data_spec.run_id!r} but its {name} is "
                f"{mine!r} and the data run's is {theirs!r}"
            )


def check_consume_once(spec: RunSpec, data_run: str) -> None:
    """Consume-once deletes what it trained on: no later epoch or other run may need it."""
    why = ""
    if spec.train.epochs > 1:
        why = f"train.epochs is {spec.train.epochs}: later epochs re-read every sample"
    elif data_run != spec.run_id:
        why = f"it replays run {data_run!r}, whose features are not its to delete"
    if why:
        raise TrainerError(
            f"run {spec.run_id!r} cannot use train.consume_features: {why}; set "
            "train.consume_features = false (or train.epochs = 1)"
        )


async def _wait_record(bus: Bus, key: str, record_type: Any, what: str,
                       timeout: float | None) -> Any:  # fmt: skip
    try:
        return await bus.wait_for_record(key, record_type, timeout=timeout, what=what)
    except BusError as exc:
        raise TrainerError(f"{exc}; start the run (specforge enqueue) or check --run") from None


async def build_parts(
    bus: Bus,
    run_id: str,
    env: DistEnv,
    device: torch.device,
    parallel: Parallel,
    *,
    spec_timeout: float,
    summary_timeout: float | None,
    log: FilteringBoundLogger,
) -> TrainerParts:
    """Read the run from the bus, build the draft and optimizer, join the ranks (collectives)."""
    spec: RunSpec = await _wait_record(bus, run_id, RunSpec, "run spec", spec_timeout)
    try:
        precision = resolve_precision(spec.train.precision, device)
    except ValueError as exc:
        raise TrainerError(str(exc)) from None
    data_run = spec.samples_run
    if spec.train.consume_features:
        check_consume_once(spec, data_run)
    data_spec = spec
    if data_run != run_id:
        data_spec = await _wait_record(
            bus, data_run, RunSpec, f"run spec of data run {data_run!r}", spec_timeout
        )
        check_data_run(spec, data_spec)
    data_spec_hash = data_spec.spec_hash()
    summary: EnqueueSummary = await _wait_record(
        bus, enqueue_key(data_run), EnqueueSummary, "enqueue summary", summary_timeout
    )
    if summary.run_spec_hash != data_spec_hash:
        raise TrainerError(
            f"the enqueue summary of run {data_run!r} was written under spec "
            f"{summary.run_spec_hash}, that run's spec is {data_spec_hash}"
        )
    store = open_store(data_spec.store_uri)
    config_dict = target_config(spec.target.path)
    text = config_dict.get("text_config", config_dict)
    vocab_size, target_hidden = int(text["vocab_size"]), int(text["hidden_size"])

    loop = asyncio.get_running_loop()
    vocab_map = await loop.run_in_executor(
        None, load_vocab_map, store, summary, vocab_size, spec.draft_vocab_size(vocab_size)
    )
    embedding = await loop.run_in_executor(None, load_embedding, spec.target.path)
    head = await loop.run_in_executor(None, load_lm_head, spec.target.path)
    draft = await loop.run_in_executor(None, build_draft, spec, vocab_map, embedding)
    if device.type == "cpu" and head.dtype not in (torch.float32, torch.float64):
        head = head.float()  # low-precision matmuls are far slower than fp32 on CPUs
    draft = draft.to(device)
    head = head.to(device)
    train = spec.train
    shard = math.ceil(summary.train / env.world_size)  # the largest rank's share
    total_steps = total_optimizer_steps(train, shard)
    strategy_cls = STRATEGIES.get(spec.draft.strategy)
    if strategy_cls.capture_method != data_spec.capture_method:
        raise TrainerError(
            f"strategy {spec.draft.strategy!r} trains on {strategy_cls.capture_method!r} "
            f"features but run {data_run!r} captured {data_spec.capture_method!r} features"
        )
    try:
        strategy = strategy_cls.from_spec(spec, draft, target_head=head,
                                          target_embedding=embedding.to(device),
                                          total_steps=total_steps)  # fmt: skip
    except ValueError as exc:
        raise TrainerError(f"strategy {spec.draft.strategy!r}: {exc}") from None
    compute: torch.nn.Module = DraftModule(draft, strategy)
    ddp: torch.nn.parallel.DistributedDataParallel | None = None
    export_draft: DraftModel | None = None
    fsdp = False
    if env.world_size > 1:
        await loop.run_in_executor(None, init_process_group, env, device)
        if parallel == "fsdp":
            # rank 0 exports through an unsharded copy (checkpoints are sharding-free)
            export_draft = copy.deepcopy(draft).cpu() if env.rank == 0 else None
            compute = shard_draft(compute)
            fsdp = True
        else:
            ids = [device.index] if device.type == "cuda" else None
            ddp = torch.nn.parallel.DistributedDataParallel(compute, device_ids=ids)
            compute = ddp
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=train.weight_decay)  # fmt: skip
    parts = TrainerParts(
        spec=spec, spec_hash=spec.spec_hash(), data_run=data_run, data_spec_hash=data_spec_hash,
        summary=summary, store=store, target_hidden=target_hidden,
        method=data_spec.capture_method,
        layer_ids=layer_ids_for_run(data_spec, int(text["num_hidden_layers"])),
        vocab_map=vocab_map, draft=draft, precision=precision, head=head, strategy=strategy,
        weighted_loss=strategy.weighted_loss, compute=compute, ddp=ddp, fsdp=fsdp,
        export_draft=export_draft,
        params=params, optimizer=optimizer, total_steps=total_steps,
        schedule=LRSchedule.from_train_spec(train, total_steps),
        checkpoints=CheckpointManager(checkpoints_root(spec.output_dir, run_id),
                                      keep_last=train.keep_last),
    )  # fmt: skip
    log.bind(spec_hash=parts.spec_hash).info(
        "trainer ready", device=str(device), precision=precision, target=spec.target.path,
        draft_params=sum(p.numel() for p in params), train_samples=summary.train,
        total_steps=total_steps, warmup_steps=parts.schedule.warmup,
        vocab_map_hash=vocab_map.hash(), checkpoints=str(parts.checkpoints.root),
        parallel=parallel if env.world_size > 1 else None,
        warm_start=spec.draft.init_from or None,
        data_run=data_run if data_run != run_id else None,
    )  # fmt: skip
    return parts
