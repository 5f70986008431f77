"""Collate, and the samples stream against a real nats-server and a real file store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from specforge_common.bus import Bus
from specforge_common.contracts import DeadLetter, SampleRef
from specforge_common.featurestore import open_store
from specforge_common.targets import make_tiny_target
from specforge_trainer.data import BatchReader, SampleError, SampleStream, check_sample, collate
from tests.support import seed_captured_run, tiny_run_spec
from tests.trainer import stream_records


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


def sample(length: int, hidden: int = 4, start: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.arange(start, start + length)
    loss_mask = torch.zeros(length, dtype=torch.int64)
    loss_mask[length // 2 :] = 1
    return {
        "input_ids": ids,
        "loss_mask": loss_mask,
        "aux_hidden_states": torch.randn(length, 3 * hidden),
        "hidden_states": torch.randn(length, hidden),
    }


# --- collate -----------------------------------------------------------------------------------


def test_collate_right_pads_with_zeros_and_keeps_each_loss_mask() -> None:
    a, b = sample(3, start=10), sample(5, start=20)
    batch = collate([a, b])
    assert batch.input_ids.shape == (2, 5) and batch.input_ids.dtype == torch.int64
    assert batch.aux_hidden_states.shape == (2, 5, 12) and batch.hidden_states.shape == (2, 5, 4)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.input_ids.tolist() == [[10, 11, 12, 0, 0], [20, 21, 22, 23, 24]]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]]
    assert torch.equal(batch.aux_hidden_states[0, :3], a["aux_hidden_states"])
    assert torch.equal(batch.hidden_states[1], b["hidden_states"])
    assert not batch.aux_hidden_states[0, 3:].any() and not batch.hidden_states[0, 3:].any()
    assert batch.num_tokens == 8


def test_a_batch_of_one_is_the_sample() -> None:
    s = sample(6)
    batch = collate([s])
    for key in ("input_ids", "loss_mask", "aux_hidden_states", "hidden_states"):
        assert torch.equal(getattr(batch, key), s[key][None])
    assert batch.attention_mask.tolist() == [[1] * 6]


def test_collate_refuses_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_check_sample_names_what_is_wrong() -> None:
    assert check_sample(sample(4), aux_size=12, hidden_size=4) == 4
    bad = sample(4)
    del bad["hidden_states"]
    with pytest.raises(SampleError, match="missing"):
        check_sample(bad)
    bad = sample(4)
    bad["loss_mask"] = bad["loss_mask"][:3]
    with pytest.raises(SampleError, match="loss_mask"):
        check_sample(bad)
    with pytest.raises(SampleError, match="width"):
        check_sample(sample(4), hidden_size=8)


# --- the stream --------------------------------------------------------------------------------


def open_stream(bus: Bus, spec, **kw) -> SampleStream:
    return SampleStream(bus, open_store(spec.store_uri), spec.run_id, spec_hash=spec.spec_hash(),
                        **kw)  # fmt: skip


async def collect(stream: SampleStream) -> list:
    async with stream:
        return [s async for s in stream]


async def test_stream_yields_the_train_refs_in_stream_order_then_stops_at_the_marker(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path)
    refs = await seed_captured_run(bus, spec, n_train=5, n_eval=3)
    stream = open_stream(bus, spec)
    got = await collect(stream)
    assert [s.ref.sample_id for s in got] == [r.sample_id for r in refs["train"]]
    seqs = [s.seq for s in got]
    assert seqs == sorted(seqs) and all(s.epoch == 0 for s in got)
    assert stream.stats.end_sequence is not None and stream.stats.end_sequence > seqs[-1]
    store = open_store(spec.store_uri)
    for s in got:
        expected = store.get(s.ref.features)
        assert all(torch.equal(s.tensors[k], expected[k]) for k in expected)
    assert stream.stats.samples == 5 and stream.stats.skipped_foreign == 0
    assert await stream.next() is None  # stays finished


async def test_two_epochs_replay_the_same_samples_twice(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path)
    refs = await seed_captured_run(bus, spec, n_train=4, n_eval=2)
    got = await collect(open_stream(bus, spec, epochs=2))
    ids = [r.sample_id for r in refs["train"]]
    assert [s.ref.sample_id for s in got] == ids + ids
    assert [s.epoch for s in got] == [0] * 4 + [1] * 4
    assert [s.seq for s in got[:4]] == [s.seq for s in got[4:]]


async def test_a_sample_ref_of_another_spec_is_skipped(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path)
    subjects = await bus.ensure_streams(run_id)
    other = tiny_run_spec(run_id, target, tmp_path, seed=1)  # same run id, another spec
    stale = SampleRef(sample_id="stale", run_id=run_id, prompt_id="old", split="train",
                      producer="old-capture",
                      features=open_store(spec.store_uri).put("stale", sample(4, hidden=64)),
                      num_tokens=4, run_spec_hash=other.spec_hash())  # fmt: skip
    await bus.publish(subjects.samples("train"), stale, msg_id="stale")
    refs = await seed_captured_run(bus, spec, n_train=3, n_eval=1)
    stream = open_stream(bus, spec)
    got = await collect(stream)
    assert [s.ref.sample_id for s in got] == [r.sample_id for r in refs["train"]]
    assert stream.stats.skipped_foreign == 1 and stream.stats.dead_lettered == 0


async def test_an_undecodable_samples_log_message_is_dead_lettered_and_skipped(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    """A broken producer's bytes in the samples log must not stop the trainer."""
    spec = tiny_run_spec(run_id, target, tmp_path)
    subjects = await bus.ensure_streams(run_id)
    await bus.js.publish(subjects.samples("train"), b"\xc1 not a record")
    refs = await seed_captured_run(bus, spec, n_train=3, n_eval=1)
    stream = open_stream(bus, spec)
    got = await collect(stream)
    assert [s.ref.sample_id for s in got] == [r.sample_id for r in refs["train"]]
    assert stream.stats.dead_lettered == 0  # the bus dead-lettered it: no sample was lost
    (letter,) = [r for _, r in await stream_records(bus, run_id, "dlq", DeadLetter)]
    assert letter.payload == b"\xc1 not a record" and letter.stream_sequence == 1
    assert "unreadable record" in letter.reason and letter.subject == subjects.samples("train")


async def test_a_sample_whose_features_are_gone_is_dead_lettered_and_skipped(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path)
    refs = await seed_captured_run(bus, spec, n_train=4, n_eval=1)
    open_store(spec.store_uri).delete(refs["train"][1].features)
    stream = open_stream(bus, spec)
    got = await collect(stream)
    kept = [r.sample_id for i, r in enumerate(refs["train"]) if i != 1]
    assert [s.ref.sample_id for s in got] == kept
    assert stream.stats.dead_lettered == 1
    letters = [r for _, r in await stream_records(bus, run_id, "dlq", DeadLetter)]
    assert len(letters) == 1 and letters[0].service == "trainer"
    assert "FeatureMissingError" in letters[0].reason
    assert letters[0].subject == f"sf.{run_id}.samples.train"


async def test_samples_of_another_capture_method_are_refused_naming_both(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    """A block-drafter trainer given EAGLE-3 samples: every one dead-lettered, none trained."""
    spec = tiny_run_spec(run_id, target, tmp_path)
    await seed_captured_run(bus, spec, n_train=3, n_eval=1)
    stream = open_stream(bus, spec, method="dflash", recapture_timeout_s=0)
    assert await collect(stream) == []
    assert stream.stats.dead_lettered == 3
    letters = [r for _, r in await stream_records(bus, run_id, "dlq", DeadLetter)]
    assert len(letters) == 3
    assert all("holds 'eagle3' features" in d.reason and "on 'dflash' features" in d.reason
               for d in letters)  # fmt: skip


async def test_the_stream_follows_a_log_that_is_still_being_written(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path)
    await bus.ensure_streams(run_id)
    stream = open_stream(bus, spec)
    reading = asyncio.create_task(collect(stream))
    await asyncio.sleep(0.2)  # the reader is waiting on an empty log
    assert not reading.done()
    refs = await seed_captured_run(bus, spec, n_train=3, n_eval=1)
    got = await asyncio.wait_for(reading, 10)
    assert [s.ref.sample_id for s in got] == [r.sample_id for r in refs["train"]]
    assert stream.stats.wait_s > 0.1


async def test_batches_never_span_epochs_and_only_the_last_is_last(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path)
    refs = await seed_captured_run(bus, spec, n_train=5, n_eval=1)
    async with open_stream(bus, spec, epochs=2, prefetch=2) as stream:
        reader = BatchReader(stream, 3)
        batches = []
        while (batch := await reader.next()) is not None:
            batches.append(batch)
    assert [b.num_samples for b in batches] == [3, 2, 3, 2]
    assert [b.epoch for b in batches] == [0, 0, 1, 1]
    assert [b.last for b in batches] == [False, False, False, True]
    assert batches[1].last_sequence == batches[3].last_sequence
    lengths = [r.num_tokens for r in refs["train"]]
    assert batches[0].num_tokens == sum(lengths[:3])
    train_batch = batches[0].collate()
    assert train_batch.input_ids.shape == (3, max(lengths[:3]))
    assert train_batch.attention_mask.sum(1).tolist() == lengths[:3]


# --- epoch shuffle -----------------------------------------------------------------------------


async def epoch_orders(bus: Bus, spec, **options) -> list[list[str]]:
    """The sample ids of each epoch, in the order the stream yields them."""
    store = open_store(spec.store_uri)
    orders: list[list[str]] = []
    async with SampleStream(bus, store, spec.run_id, spec_hash=spec.spec_hash(),
                            **options) as stream:  # fmt: skip
        async for s in stream:
            while s.epoch >= len(orders):
                orders.append([])
            orders[s.epoch].append(s.ref.sample_id)
    return orders


async def test_epoch_shuffle_is_a_seeded_permutation_and_epoch_0_keeps_stream_order(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path)
    refs = await seed_captured_run(bus, spec, n_train=10, n_eval=1)
    split = [r.sample_id for r in refs["train"]]
    a = await epoch_orders(bus, spec, epochs=3, shuffle_window=4, shuffle_seed=7)
    b = await epoch_orders(bus, spec, epochs=3, shuffle_window=4, shuffle_seed=7)
    c = await epoch_orders(bus, spec, epochs=3, shuffle_window=4, shuffle_seed=8)
    assert a == b  # a pure function of (stream, seed, epoch)
    assert a[0] == split  # epoch 0 in stream order
    assert all(sorted(order) == sorted(split) for order in a + c)  # each epoch a permutation
    assert a[1] != split and a[1] != a[2] and a[1:] != c[1:]
    # Resume inside a shuffled epoch: the rest of the same order, by index.
    rest = await epoch_orders(bus, spec, epochs=2, first_epoch=1, start_index=6,
                              shuffle_window=4, shuffle_seed=7)  # fmt: skip
    assert rest == [[], a[1][6:]]
