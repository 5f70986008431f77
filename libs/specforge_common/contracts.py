"""Records that travel on the bus: small, versioned, msgpack-encoded, never tensors.

Every record carries ``schema_version`` (the major version of its layout). Adding an optional
field keeps the major version: old readers ignore unknown fields. Anything else bumps it, and
readers refuse the other major with a :class:`ContractError` naming the subject and field, so
the message can be dead-lettered instead of crashing a service.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any, Literal, TypeVar

import msgspec

from .algorithms import algorithm

SCHEMA_VERSION = 1

Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = ("train", "eval")

# Run ids become part of subjects, stream names, KV keys and store paths.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class ContractError(ValueError):
    """A record could not be encoded or decoded; says which subject, which field and why."""

    def __init__(self, reason: str, *, subject: str | None = None, field: str | None = None):
        self.reason = reason
        self.subject = subject
        self.field = field
        where = []
        if subject:
            where.append(f"subject {subject!r}")
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{reason}" + (f" ({', '.join(where)})" if where else ""))


class TensorOnBusError(ContractError):
    """A tensor or array was about to be encoded into a bus record."""


def validate_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id):
        raise ContractError(
            f"run id {run_id!r} must be 1-64 characters of letters, digits, '-' or '_', "
            "starting with a letter or digit",
            field="run_id",
        )
    return run_id


class Record(msgspec.Struct, kw_only=True, tag_field="kind", tag=lambda name: name, gc=False):
    """Base of every bus record: tagged with its class name and versioned.

    ``gc=False``: records never take part in reference cycles, and keeping tens of thousands of
    them out of the cycle collector is measurable on the consume path.
    """

    schema_version: int = SCHEMA_VERSION


# --- run configuration ---------------------------------------------------------------------


class TargetSpec(msgspec.Struct, kw_only=True, frozen=True):
    """The frozen target: where its weights are and which tokenizer it uses."""

    path: str
    revision: str = ""
    tokenizer: str = ""  # empty: the tokenizer stored beside the weights
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DraftSpec(msgspec.Struct, kw_only=True, frozen=True):
    strategy: str = "eagle3"  # the algorithm: eagle3 | dflash | domino (``algorithms.py``)
    architecture: str = ""  # empty: the strategy's own draft architecture
    draft_vocab_size: int = 32000
    # The target layers capture extracts (EAGLE-3's aux layers, DFlash's target_layer_ids);
    # None: the capture method's default rule.
    aux_layer_ids: tuple[int, ...] | None = None
    config: dict[str, Any] = {}  # overrides of the auto-generated draft config
    init_from: str = ""  # warm start: a directory with an SGLang-layout EAGLE-3 draft


class TrainSpec(msgspec.Struct, kw_only=True, frozen=True):
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 1
    accumulation_steps: int = 1
    ttt_length: int = 7
    max_grad_norm: float = 0.5
    warmup_ratio: float = 0.015
    scheduler: Literal["cosine", "constant"] = "cosine"
    epochs: int = 1
    total_steps: int | None = None  # None: derived from the sample count at end of data
    checkpoint_every: int = 100  # optimizer steps; a final checkpoint is always written
    keep_last: int = 3
    # Never rotate out a checkpoint that has no EvalResult yet (the evaluator may lag).
    keep_unevaluated: bool = True
    log_every: int = 10
    # How a step is computed; none of these changes what it computes (docs/eagle3.md, "Memory of
    # a train step"). attention auto: flex on CUDA, sdpa elsewhere. loss_chunk_tokens: the loss
    # and its backward a chunk of tokens at a time (0: all at once). activation_checkpointing:
    # recompute the decoder layer in backward. precision auto: bf16 autocast on CUDA, fp32
    # elsewhere; bf16 on a CPU is refused.
    attention: Literal["auto", "flex", "sdpa", "reference"] = "auto"
    loss_chunk_tokens: int = 1024
    activation_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Epochs after the first read through a seeded window buffer of this many samples (seed:
    # the run's ``seed``); 0 or 1: every epoch in stream order. Epoch 0 is always stream order.
    shuffle_window: int = 0
    # Consume-once: a train sample's features are deleted from the store once a checkpoint
    # covers the optimizer step that used them (for stores that hold RAM, e.g. mooncake://).
    # Needs epochs == 1; a run meant to be replayed keeps them (False, the default).
    consume_features: bool = False

    def __post_init__(self) -> None:
        if self.loss_chunk_tokens < 0:
            raise ValueError("train.loss_chunk_tokens must be >= 0 (0: all tokens at once)")


# Train keys added after run spec hashes were pinned, at the value that hashes as if the key were
# absent (runs stored before them keep their hash); ``attention`` hashes ``auto`` as ``sdpa``,
# the default ``auto`` replaced.
_TRAIN_KEYS_HASHED_ONLY_WHEN_SET = {
    "loss_chunk_tokens": 1024,
    "activation_checkpointing": False,
    "precision": "auto",
}


def _train_identity(train: dict[str, Any]) -> dict[str, Any]:
    identity = {k: v for k, v in train.items()
                if _TRAIN_KEYS_HASHED_ONLY_WHEN_SET.get(k, object()) != v}  # fmt: skip
    if identity.get("attention") == "auto":
        identity["attention"] = "sdpa"
    return identity


class CaptureSpec(msgspec.Struct, kw_only=True, frozen=True):
    # The feature set stored per sample (``batch.FEATURE_KEYS_BY_METHOD``); empty: the one the
    # strategy reads. Set explicitly it must agree with the strategy.
    method: str = ""
    mode: Literal["prefill", "decode"] = "prefill"
    temperature: float = 0.0  # decode mode: 0 = greedy
    max_new_tokens: int = 512
    batch_size: int = 4
    max_batch_tokens: int = 8192
    # Backpressure on the trainers' outstanding samples (pending + unacked in their consumer).
    high_water_samples: int = 10_000
    low_water_samples: int = 5_000
    # Backpressure on the feature bytes outstanding in the store (0: off). Protects a store that
    # evicts when full (mooncake://) from silently losing untrained samples.
    high_water_bytes: int = 0
    low_water_bytes: int = 0


class EvalSpec(msgspec.Struct, kw_only=True, frozen=True):
    max_samples: int = 64  # eval-split samples per checkpoint
    batch_size: int = 4
    # Real speculative decoding per checkpoint: the prompt part (before the first loss token) of
    # the first ``serving_prompts`` eval samples, ``max_new_tokens`` each, ``num_draft_tokens``
    # drafted per target verification. 0 prompts: offline metrics only.
    serving_prompts: int = 8
    num_draft_tokens: int = 3
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy, checked token for token against the target (lossless)


TrackingBackend = Literal["none", "tensorboard", "wandb", "mlflow"]


class TrackingSpec(msgspec.Struct, kw_only=True, frozen=True):
    """Where the trainer and the evaluator send their scalars (``specforge_common.tracking``).

    Operational, not part of the run: it is left out of ``RunSpec.spec_hash``.
    """

    backend: TrackingBackend = "none"
    dir: str = ""  # tensorboard; empty: <output_dir>/<run_id>/tensorboard (train/ and eval/ in it)
    project: str = "specforge"  # wandb: the project; mlflow: the experiment name
    entity: str = ""  # wandb: the team or user; empty: the login's default
    tracking_uri: str = ""  # mlflow: the tracking server or store; empty: mlflow's default


class RunSpec(Record, kw_only=True, frozen=True):
    """Everything that determines a run. Stored in the KV bucket; its hash stamps every record."""

    run_id: str
    target: TargetSpec
    draft: DraftSpec = DraftSpec()
    train: TrainSpec = TrainSpec()
    capture: CaptureSpec = CaptureSpec()
    eval: EvalSpec = EvalSpec()
    max_length: int = 2048
    chat_template: str = ""  # empty: the tokenizer's own template
    loss_mask_policy: Literal["assistant", "last_turn"] = "assistant"
    min_loss_tokens: int = 1
    store_uri: str = "file://./runs/features"
    output_dir: str = "./runs"  # checkpoints: <output_dir>/<run_id>/checkpoints/
    seed: int = 0
    eval_fraction: float = 0.05
    # Replay: the run whose samples log, enqueue summary and vocab map the trainer reads
    # (``specforge replay``); empty = this run itself.
    data_run: str = ""
    tracking: TrackingSpec = TrackingSpec()  # where metrics go; not hashed

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)
        if self.data_run:
            validate_run_id(self.data_run)
        if self.max_length <= 0:
            raise ValueError("max_length must be positive")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        wanted = algorithm(self.draft.strategy).capture_method
        if self.capture.method and self.capture.method != wanted:
            raise ValueError(
                f"strategy {self.draft.strategy!r} trains on {wanted!r} features but "
                f"capture.method is {self.capture.method!r}; leave capture.method empty"
            )

    @property
    def capture_method(self) -> str:
        """The feature set this run captures and trains on."""
        return self.capture.method or algorithm(self.draft.strategy).capture_method

    @property
    def draft_architecture(self) -> str:
        """Registry name of the draft architecture the trainer builds."""
        return self.draft.architecture or algorithm(self.draft.strategy).architecture

    def draft_vocab_size(self, target_vocab_size: int) -> int:
        """Tokens the draft predicts over: ``draft.draft_vocab_size`` for an algorithm with a
        reduced draft vocabulary (EAGLE-3), the target's whole vocabulary otherwise."""
        if algorithm(self.draft.strategy).reduced_vocab:
            return self.draft.draft_vocab_size
        return target_vocab_size

    def resolved(self) -> RunSpec:
        """This spec with the strategy's defaults spelled out (what goes on the bus)."""
        return msgspec.structs.replace(
            self,
            draft=msgspec.structs.replace(self.draft, architecture=self.draft_architecture),
            capture=msgspec.structs.replace(self.capture, method=self.capture_method),
        )

    @property
    def samples_run(self) -> str:
        """The run whose sample streams this run reads: itself, or the run it replays."""
        return self.data_run or self.run_id

    def spec_hash(self) -> str:
        """Stable short hash of the spec; records produced under it carry it.

        ``tracking`` is left out: where the metrics go changes nothing the run produces, and
        the specs stored before it existed keep their hash. So do the train keys added since,
        while at their defaults (``_train_identity``).
        """
        identity = msgspec.to_builtins(self)
        del identity["tracking"]
        identity["train"] = _train_identity(identity["train"])
        canonical = msgspec.json.encode(identity, order="sorted")
        return hashlib.sha256(canonical).hexdigest()[:16]


# --- work items and samples ----------------------------------------------------------------


class Message(msgspec.Struct, frozen=True, gc=False):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class PromptTask(Record, kw_only=True, frozen=True):
    """One prompt to capture. Either a conversation or pre-tokenized ids with a loss mask."""

    run_id: str
    prompt_id: str
    split: Split
    messages: list[Message] | None = None
    input_ids: list[int] | None = None
    loss_mask: list[int] | None = None
    loss_mask_policy: Literal["assistant", "last_turn", "all", "given"] = "assistant"
    attempt: int = 0
    run_spec_hash: str = ""
    # A trainer found this prompt's features missing (evicted): capture it again and announce
    # the new SampleRef on the recaptured subject instead of the split's log.
    recapture: bool = False

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.input_ids is None):
            raise ValueError("exactly one of messages or input_ids must be set")
        if self.input_ids is not None and self.loss_mask is not None:
            if len(self.loss_mask) != len(self.input_ids):
                raise ValueError("loss_mask must have the same length as input_ids")


class TensorSpec(msgspec.Struct, frozen=True, gc=False):
    """Name, dtype (torch name without the ``torch.`` prefix) and shape of one stored tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]


class FeatureLocation(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """Where a sample's tensors live in a FeatureStore, and how to check them on the way back."""

    uri: str
    tensors: tuple[TensorSpec, ...]
    nbytes: int
    checksum: str  # "<algorithm>:<hex digest>"


class SampleRef(Record, kw_only=True, frozen=True):
    """A captured sample: metadata only, the tensors are at ``features``."""

    sample_id: str
    run_id: str
    prompt_id: str
    split: Split
    producer: str
    features: FeatureLocation
    num_tokens: int
    run_spec_hash: str
    method: str = "eagle3"  # the capture method: which tensors ``features`` holds
    created_at: float = msgspec.field(default_factory=time.time)


class EnqueueSummary(Record, kw_only=True, frozen=True):
    """Written to the KV bucket by ``specforge enqueue`` once all its prompts are published.

    Capture workers publish ``EndOfSplit`` only after this exists and the prompt queue is
    drained, so an empty queue before enqueue finished is never mistaken for the end of data.
    The draft vocabulary map (tensors) lives in the feature store at ``vocab_map``.
    """

    run_id: str
    sources: list[str]
    train: int
    eval: int
    skipped: int
    vocab_map: FeatureLocation | None = None
    vocab_map_hash: str = ""
    tokens_counted: int = 0
    run_spec_hash: str
    created_at: float = msgspec.field(default_factory=time.time)


class EndOfSplit(Record, kw_only=True, frozen=True):
    """Marker on the samples subject: the producer saw the prompt queue drained for a split."""

    run_id: str
    split: Split
    producer: str
    samples_published: int
    run_spec_hash: str
    created_at: float = msgspec.field(default_factory=time.time)


# --- training and evaluation ---------------------------------------------------------------


class TrainerProgress(Record, kw_only=True, frozen=True):
    """A trainer rank's position, in the KV bucket: capture reads it for backpressure."""

    run_id: str
    rank: int
    step: int
    samples_consumed: int
    last_sequence: int  # samples-stream sequence of the last sample trained on
    done: bool = False
    run_spec_hash: str
    updated_at: float = msgspec.field(default_factory=time.time)


class CheckpointEvent(Record, kw_only=True, frozen=True):
    run_id: str
    step: int
    final: bool = False  # the last checkpoint of the run
    samples_consumed: int
    last_sequence: dict[int, int]  # rank -> last samples-stream sequence consumed
    checkpoint_uri: str
    checkpoint_sha256: str
    metrics: dict[str, float] = {}
    run_spec_hash: str
    created_at: float = msgspec.field(default_factory=time.time)


class EvalResult(Record, kw_only=True, frozen=True):
    """Acceptance of one checkpoint. Both acceptance-length conventions are named explicitly."""

    run_id: str
    step: int
    checkpoint_sha256: str
    acceptance_rates: list[float]  # offline, per draft position (eval split, teacher-forced)
    simulated_acceptance_length: float | None = None  # sum_k prod_{i<=k} acc_i, no bonus token
    serving_acceptance_length: float | None = None  # tokens per verification, bonus included
    # Real speculative decoding: P(draft position k accepted | positions < k accepted).
    serving_acceptance_rates: list[float] = []
    lossless: bool | None = None  # temperature 0: speculative output == target greedy output
    metrics: dict[str, float] = {}
    wall_seconds: dict[str, float] = {}
    run_spec_hash: str
    created_at: float = msgspec.field(default_factory=time.time)


class DeadLetter(Record, kw_only=True, frozen=True):
    """A message that can never succeed, with the reason, kept for a human."""

    subject: str
    reason: str
    payload: bytes
    service: str
    run_id: str | None = None
    deliveries: int = 0
    stream_sequence: int | None = None
    created_at: float = msgspec.field(default_factory=time.time)


BusRecord = (
    RunSpec | PromptTask | SampleRef | EndOfSplit | CheckpointEvent | EvalResult | DeadLetter
)
R = TypeVar("R", bound=Record)


# --- encoding ------------------------------------------------------------------------------


def _refuse_unencodable(obj: Any) -> Any:
    kind = type(obj)
    module = getattr(kind, "__module__", "") or ""
    if (
        module.startswith(("torch", "numpy"))
        or hasattr(obj, "__array__")
        or hasattr(obj, "__dlpack__")
    ):
        raise TensorOnBusError(
            f"a {module}.{kind.__name__} was put in a bus record; tensors travel through a "
            "FeatureStore and only their FeatureLocation goes on the bus"
        )
    raise ContractError(f"cannot encode a {kind.__name__} in a bus record")


_encoder = msgspec.msgpack.Encoder(enc_hook=_refuse_unencodable)
_decoders: dict[Any, msgspec.msgpack.Decoder] = {}


class _Header(msgspec.Struct):
    schema_version: int = -1
    kind: str = ""


_header_decoder = msgspec.msgpack.Decoder(_Header)
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def encode(record: Record) -> bytes:
    """msgpack bytes of a record; raises :class:`TensorOnBusError` for tensors anywhere in it."""
    try:
        return _encoder.encode(record)
    except ContractError:
        raise
    except (TypeError, ValueError) as exc:
        raise ContractError(f"cannot encode {type(record).__name__}: {exc}") from exc


def decode(data: bytes, record_type: Any, *, subject: str | None = None) -> Any:
    """Decode and strictly validate ``data`` as ``record_type`` (a Record class or a union).

    Every failure (garbage, wrong kind, wrong major version, missing or mistyped field) raises
    :class:`ContractError` with the subject, the offending field and the reason.
    """
    decoder = _decoders.get(record_type)
    if decoder is None:
        decoder = _decoders[record_type] = msgspec.msgpack.Decoder(record_type)
    try:
        record = decoder.decode(data)
    except msgspec.DecodeError as exc:
        _raise_version_error(data, subject)
        raise ContractError(
            str(exc).split(" - at `")[0], subject=subject, field=_field_of(exc)
        ) from exc
    if record.schema_version != SCHEMA_VERSION:
        _raise_version_error(data, subject)
    return record


def _field_of(exc: msgspec.DecodeError) -> str | None:
    """Dotted path of the offending field, from msgspec's message."""
    if not isinstance(exc, msgspec.ValidationError):
        return None
    text = str(exc)
    match = _PATH.search(text)
    parts = [match.group(1)] if match and match.group(1) else []
    missing = _MISSING.search(text)
    if missing:
        parts.append(missing.group(1))
    return ".".join(parts) or None


def _raise_version_error(data: bytes, subject: str | None) -> None:
    try:
        header = _header_decoder.decode(data)
    except msgspec.DecodeError:
        return
    if header.schema_version not in (-1, SCHEMA_VERSION):
        raise ContractError(
            f"{header.kind or 'record'} has schema_version {header.schema_version}; "
            f"this build reads version {SCHEMA_VERSION}",
            subject=subject,
            field="schema_version",
        )
