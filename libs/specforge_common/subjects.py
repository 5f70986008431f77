"""Every subject, stream and bucket name of a run, in one place.

Each run gets its own streams, so retention, replay and deletion are per run:

    sf.<run>.prompts            PROMPTS      work queue: each PromptTask goes to one capture worker
    sf.<run>.prompts.recapture  PROMPTS      work queue: prompts a trainer found evicted
    sf.<run>.samples.<split>    SAMPLES      durable log of SampleRefs (and EndOfSplit markers)
    sf.<run>.samples.recaptured SAMPLES      SampleRefs of re-captured samples (not a split)
    sf.<run>.checkpoints        CHECKPOINTS  CheckpointEvents
    sf.<run>.evals              EVALS        EvalResults
    sf.<run>.dlq                DLQ          DeadLetters
    sf.<run>.promptlog.<key>    PROMPTLOG    the last PromptTask of each prompt id (key: a hash
                                             of it), kept after the work queue dropped it

The PROMPTLOG stream exists so that a sample whose features were evicted from the store can be
captured again from its prompt. Re-capture requests have their own subject (and capture consumer)
so they neither wait behind the whole prompt queue nor count toward the end of data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from .contracts import Split, validate_run_id

StreamKind = Literal["prompts", "samples", "checkpoints", "evals", "dlq", "promptlog"]
STREAM_KINDS: tuple[StreamKind, ...] = (
    "prompts", "samples", "checkpoints", "evals", "dlq", "promptlog",
)  # fmt: skip

# KV: run id -> RunSpec, "<run>.enqueue" -> EnqueueSummary, "<run>.progress.<rank>" ->
# TrainerProgress.
RUNS_BUCKET = "sf_runs"


def enqueue_key(run_id: str) -> str:
    return f"{run_id}.enqueue"


def progress_key(run_id: str, rank: int) -> str:
    """KV key of a trainer rank's TrainerProgress."""
    return f"{run_id}.progress.{rank}"


def progress_prefix(run_id: str) -> str:
    return f"{run_id}.progress."


def kv_subject(key: str) -> str:
    """The subject a KV entry is stored under (what a dead letter of an unreadable one names)."""
    return f"$KV.{RUNS_BUCKET}.{key}"


def run_of_subject(subject: str) -> str | None:
    """The run a subject belongs to: ``sf.<run>.…`` or the KV key ``<run>[.…]``; None for
    anything else."""
    tokens = subject.split(".")
    if len(tokens) >= 2 and tokens[0] == "sf":
        return tokens[1]
    if len(tokens) >= 3 and tokens[:2] == ["$KV", RUNS_BUCKET]:
        return tokens[2]
    return None


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a trailing ``>`` one or more."""
    want, have = pattern.split("."), subject.split(".")
    if want[-1] == ">":
        return len(have) >= len(want) and all(
            w in ("*", h) for w, h in zip(want[:-1], have, strict=False)
        )
    return len(want) == len(have) and all(w in ("*", h) for w, h in zip(want, have, strict=True))


@dataclass(frozen=True)
class RunSubjects:
    run_id: str

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)

    @property
    def prefix(self) -> str:
        return f"sf.{self.run_id}"

    @property
    def prompts(self) -> str:
        return f"{self.prefix}.prompts"

    def samples(self, split: Split) -> str:
        return f"{self.prefix}.samples.{split}"

    @property
    def all_samples(self) -> str:
        return f"{self.prefix}.samples.>"

    @property
    def recapture_prompts(self) -> str:
        """Where a trainer asks for an evicted sample's prompt to be captured again."""
        return f"{self.prefix}.prompts.recapture"

    @property
    def recaptured(self) -> str:
        """SampleRefs of re-captured samples: in the SAMPLES stream, but no split's log."""
        return f"{self.prefix}.samples.recaptured"

    def prompt_log(self, prompt_id: str) -> str:
        """The prompt log subject of one prompt id (any characters: the token is a hash)."""
        key = hashlib.sha256(prompt_id.encode()).hexdigest()[:32]
        return f"{self.prefix}.promptlog.{key}"

    @property
    def all_prompt_logs(self) -> str:
        return f"{self.prefix}.promptlog.>"

    @property
    def checkpoints(self) -> str:
        return f"{self.prefix}.checkpoints"

    @property
    def evals(self) -> str:
        return f"{self.prefix}.evals"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    def stream(self, kind: StreamKind) -> str:
        """Stream name: ``SF_<run>_<KIND>`` (stream names may not contain dots)."""
        return f"SF_{self.run_id}_{kind.upper()}"

    def stream_subjects(self, kind: StreamKind) -> list[str]:
        """The stream's subjects; the first is the one its records are read from by default."""
        if kind == "prompts":
            return [self.prompts, self.recapture_prompts]
        if kind == "samples":
            return [self.all_samples]
        if kind == "promptlog":
            return [self.all_prompt_logs]
        return [getattr(self, kind)]
