"""Every subject, stream and bucket name of a run, in one place.

Each run gets its own streams, so retention, replay and deletion are per run:

    sf.<run>.prompts            PROMPTS      work queue: each PromptTask goes to one capture worker
    sf.<run>.samples.<split>    SAMPLES      durable log of SampleRefs (and EndOfSplit markers)
    sf.<run>.checkpoints        CHECKPOINTS  CheckpointEvents
    sf.<run>.evals              EVALS        EvalResults
    sf.<run>.dlq                DLQ          DeadLetters
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .contracts import Split, validate_run_id

StreamKind = Literal["prompts", "samples", "checkpoints", "evals", "dlq"]
STREAM_KINDS: tuple[StreamKind, ...] = ("prompts", "samples", "checkpoints", "evals", "dlq")

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
        return [self.all_samples if kind == "samples" else getattr(self, kind)]
