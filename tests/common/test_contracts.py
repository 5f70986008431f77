"""Contracts: every record round-trips; every kind of bad input raises one typed error."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from specforge_common.config import build_run_spec
from specforge_common.contracts import (
    SCHEMA_VERSION,
    CheckpointEvent,
    ContractError,
    DeadLetter,
    DraftSpec,
    EndOfSplit,
    EvalResult,
    FeatureLocation,
    Message,
    PromptTask,
    RunSpec,
    SampleRef,
    TargetSpec,
    TensorOnBusError,
    TensorSpec,
    TrainSpec,
    decode,
    encode,
)

SUBJECT = "sf.r.samples.train"


def sample_ref(**over) -> SampleRef:
    fields = dict(
        sample_id="s-1",
        run_id="r",
        prompt_id="p-1",
        split="train",
        producer="capture-0",
        features=FeatureLocation(
            uri="file:ab/s-1.safetensors",
            tensors=(
                TensorSpec("aux_hidden_states", "bfloat16", (1, 7, 1728)),
                TensorSpec("input_ids", "int64", (1, 7)),
            ),
            nbytes=24_448,
            checksum="xxh3_128:00ff",
        ),
        num_tokens=7,
        run_spec_hash="0123456789abcdef",
    )
    return SampleRef(**(fields | over))


RECORDS = [
    RunSpec(run_id="r", target=TargetSpec(path="/models/t"), train=TrainSpec(epochs=2), seed=3),
    PromptTask(
        run_id="r",
        prompt_id="p",
        split="eval",
        messages=[Message("user", "hi"), Message("assistant", "hello")],
    ),
    PromptTask(run_id="r", prompt_id="q", split="train", input_ids=[1, 2], loss_mask=[0, 1]),
    sample_ref(),
    EndOfSplit(run_id="r", split="train", producer="c", samples_published=4, run_spec_hash="h"),
    CheckpointEvent(
        run_id="r",
        step=10,
        samples_consumed=40,
        last_sequence={0: 12, 1: 13},
        checkpoint_uri="file:///ckpt/step-10",
        checkpoint_sha256="ab" * 32,
        metrics={"loss": 1.5},
        run_spec_hash="h",
    ),
    EvalResult(
        run_id="r",
        step=10,
        checkpoint_sha256="ab" * 32,
        acceptance_rates=[0.7, 0.5],
        simulated_acceptance_length=1.05,
        serving_acceptance_length=2.0,
        lossless=True,
        run_spec_hash="h",
    ),
    DeadLetter(subject=SUBJECT, reason="bad", payload=b"\x00\x01", service="trainer"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_round_trips(record) -> None:
    data = encode(record)
    assert decode(data, type(record), subject=SUBJECT) == record
    assert decode(data, type(record)).schema_version == SCHEMA_VERSION


def _raw(record) -> dict:
    return msgspec.msgpack.decode(encode(record))


def test_wrong_schema_version_is_rejected_with_field_and_subject() -> None:
    raw = _raw(sample_ref())
    raw["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ContractError) as err:
        decode(msgspec.msgpack.encode(raw), SampleRef, subject=SUBJECT)
    assert err.value.field == "schema_version"
    assert err.value.subject == SUBJECT
    assert str(SCHEMA_VERSION + 1) in err.value.reason


def test_newer_major_with_changed_fields_still_reports_the_version() -> None:
    raw = _raw(sample_ref())
    raw["schema_version"] = 7
    raw["num_tokens"] = "seven"  # a v7 layout change: the version is the real cause
    with pytest.raises(ContractError) as err:
        decode(msgspec.msgpack.encode(raw), SampleRef, subject=SUBJECT)
    assert err.value.field == "schema_version"


@pytest.mark.parametrize("garbage", [b"", b"\xc1", b"not msgpack at all", b"\x93\x01\x02"])
def test_garbage_bytes_raise_contract_error(garbage: bytes) -> None:
    with pytest.raises(ContractError) as err:
        decode(garbage, SampleRef, subject=SUBJECT)
    assert err.value.subject == SUBJECT


@pytest.mark.parametrize(
    ("path", "expected_field"),
    [(("num_tokens",), "num_tokens"), (("features", "nbytes"), "features.nbytes")],
)
def test_missing_field_is_named(path: tuple[str, ...], expected_field: str) -> None:
    raw = _raw(sample_ref())
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    with pytest.raises(ContractError) as err:
        decode(msgspec.msgpack.encode(raw), SampleRef, subject=SUBJECT)
    assert err.value.field == expected_field
    assert "missing" in err.value.reason


def test_mistyped_nested_field_is_named() -> None:
    raw = _raw(sample_ref())
    raw["features"]["tensors"][0]["shape"][1] = "seven"
    with pytest.raises(ContractError) as err:
        decode(msgspec.msgpack.encode(raw), SampleRef, subject=SUBJECT)
    assert err.value.field == "features.tensors[0].shape[1]"


def test_record_of_another_kind_is_rejected() -> None:
    with pytest.raises(ContractError) as err:
        decode(encode(sample_ref()), PromptTask, subject="sf.r.prompts")
    assert err.value.field == "kind"


def test_invalid_values_are_rejected_on_decode() -> None:
    raw = _raw(RECORDS[1])
    raw["split"] = "test"
    with pytest.raises(ContractError) as err:
        decode(msgspec.msgpack.encode(raw), PromptTask)
    assert err.value.field == "split"
    raw = _raw(RECORDS[1])
    raw["input_ids"] = [1, 2]  # both a conversation and ids
    with pytest.raises(ContractError, match="exactly one"):
        decode(msgspec.msgpack.encode(raw), PromptTask)


@pytest.mark.parametrize(
    "tensor",
    [torch.zeros(3), torch.zeros(2, 2, dtype=torch.bfloat16), np.zeros(3)],
    ids=["torch", "torch-bf16", "numpy"],
)
def test_tensors_can_never_be_encoded(tensor) -> None:
    task = PromptTask(run_id="r", prompt_id="p", split="train", input_ids=tensor)
    with pytest.raises(TensorOnBusError, match="FeatureStore"):
        encode(task)
    letter = DeadLetter(subject=SUBJECT, reason="x", payload=b"", service="s")
    with pytest.raises(TensorOnBusError):
        encode(CheckpointEvent(**{
            "run_id": "r", "step": 1, "samples_consumed": 1, "last_sequence": {0: 1},
            "checkpoint_uri": "u", "checkpoint_sha256": "s", "run_spec_hash": "h",
            "metrics": {"loss": tensor},
        }))  # fmt: skip
    assert encode(letter)  # the same encoder still works for legitimate records


@pytest.mark.parametrize("bad", ["", "a.b", "has space", "x" * 65, "-lead", "a>b", "a*"])
def test_run_ids_that_would_break_subjects_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="run id"):
        RunSpec(run_id=bad, target=TargetSpec(path="/m"))


def test_run_spec_hash_is_stable_and_sensitive() -> None:
    a = RunSpec(run_id="r", target=TargetSpec(path="/m"), seed=1)
    b = RunSpec(run_id="r", target=TargetSpec(path="/m"), seed=1)
    c = RunSpec(run_id="r", target=TargetSpec(path="/m"), seed=2)
    assert a.spec_hash() == b.spec_hash() == decode(encode(a), RunSpec).spec_hash()
    assert a.spec_hash() != c.spec_hash()
    assert len(a.spec_hash()) == 16


# Hashes computed before ``RunSpec`` had a ``tracking`` section: records stamped with them (and
# runs stored under them) must stay valid, so the hash of these specs may never change.
PINNED_SPEC_HASHES = [
    (lambda: RunSpec(run_id="r", target=TargetSpec(path="/models/t")), "7d11e8892ad2e768"),
    (
        lambda: RunSpec(
            run_id="r",
            target=TargetSpec(path="/models/t"),
            train=TrainSpec(epochs=2),
            seed=3,
            draft=DraftSpec(aux_layer_ids=(1, 2, 3), config={"x": 1.5}),
        ),  # fmt: skip
        "c6574ecc6e18e081",
    ),
    (
        lambda: build_run_spec(
            {
                "run_id": "r1",
                "target": {"path": "/models/t"},
                "train": {"epochs": 3, "learning_rate": 3e-4},
                "eval": {"serving_prompts": 2},
            },
            ["strategy=dflash"],
            {},
        ),  # fmt: skip
        "5583e1a12150d109",
    ),
]


@pytest.mark.parametrize(("make", "expected"), PINNED_SPEC_HASHES)
def test_existing_spec_hashes_never_change(make, expected: str) -> None:
    spec = make()
    assert spec.spec_hash() == expected
    assert decode(encode(spec), RunSpec).spec_hash() == expected


def test_train_keys_added_later_hash_only_when_set_away_from_their_defaults() -> None:
    """``attention``, ``loss_chunk_tokens``, ``activation_checkpointing`` and ``precision`` at
    their defaults leave the pinned hash alone (``auto`` attention hashes as the ``sdpa`` it
    replaced as the default); any other value is a different run."""

    def spec(**train) -> RunSpec:
        return RunSpec(run_id="r", target=TargetSpec(path="/models/t"), train=TrainSpec(**train))

    pinned = "7d11e8892ad2e768"
    assert spec().train.attention == "auto" and spec().spec_hash() == pinned
    assert spec(attention="sdpa", loss_chunk_tokens=1024, activation_checkpointing=False,
                precision="auto").spec_hash() == pinned  # fmt: skip
    changes = [
        {"attention": "flex"},
        {"attention": "reference"},
        {"loss_chunk_tokens": 0},
        {"activation_checkpointing": True},
        {"precision": "bf16"},
        {"precision": "fp32"},
    ]
    hashes = {spec(**change).spec_hash() for change in changes}
    assert len(hashes) == len(changes) and pinned not in hashes
    # A spec stored before ``auto`` existed (it says ``sdpa``) is the same run as today's.
    base = {"run_id": "r", "target": {"path": "/models/t"}}
    stored = decode(
        encode(build_run_spec(base | {"train": {"attention": "sdpa"}}, [], {})), RunSpec
    )
    assert stored.spec_hash() == build_run_spec(base, [], {}).spec_hash()
