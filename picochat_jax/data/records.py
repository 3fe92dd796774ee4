"""Readers for chat (SFT), eval and preference JSONL, file-compatible with the original picochat.

Every malformed row raises DataError naming the file, the 1-based line number and the field. Rows are
never skipped silently; blank lines are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    def __init__(self, path: str | Path, line: int | None, field_name: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field_name, problem
        where = f"{path}:{line}" if line is not None else str(path)
        what = f" field '{field_name}'" if field_name else ""
        super().__init__(f"{where}:{what} {problem}")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    category: str = "general"
    group: str | None = None
    source: str = ""
    line: int = 0

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        return self.messages[:-1]

    @property
    def target(self) -> str:
        return self.messages[-1].content

    @property
    def last_user(self) -> str:
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")


@dataclass(frozen=True)
class EvalRow:
    prompt: tuple[Message, ...]
    category: str = "general"
    answerable: bool = True
    must_include: tuple[str, ...] = ()
    must_include_any: tuple[tuple[str, ...], ...] = ()
    must_not_include: tuple[str, ...] = ()
    reference: str | None = None
    source: str = ""
    line: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    split: str = "default"  # `split` / `eval_split`: the report breaks pass rates down by it
    choice: bool = False  # a multiple-choice row (`choice_labels`): the gate's non-choice rate leaves it out

    @property
    def user(self) -> str:
        return next((m.content for m in reversed(self.prompt) if m.role == "user"), "")


@dataclass(frozen=True)
class PreferenceRow:
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    source: str = ""
    line: int = 0


DEFAULT_MAX_ROW_BYTES = 1 << 20  # one chat/eval/preference row; a larger one is almost always a broken export


def max_row_bytes_default() -> int:
    """The row-size limit: PICOCHAT_MAX_ROW_BYTES when set, else 1 MiB."""
    raw = os.environ.get("PICOCHAT_MAX_ROW_BYTES")
    if raw is None:
        return DEFAULT_MAX_ROW_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"PICOCHAT_MAX_ROW_BYTES must be a whole number of bytes, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"PICOCHAT_MAX_ROW_BYTES must be positive, got {value}")
    return value


def check_readable_file(path: str | Path) -> Path:
    """A path that names an existing regular file; otherwise a one-line error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"file not found: {path}")
    if path.is_dir():
        raise DataError(path, None, None, "is a folder, expected a file")
    return path


def decode_utf8(raw: bytes, path: str | Path, line: int | None = None, offset: int = 0) -> str:
    """Bytes as text, or a DataError naming the line and the byte offset (in the file) of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = offset + exc.start
        if line is None:
            line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(path, line, None, f"is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {at}); "
                        "re-save the file as UTF-8") from None


def read_text_file(path: str | Path) -> str:
    """A whole text file as UTF-8, with file-naming errors for folders and bad bytes."""
    path = check_readable_file(path)
    return decode_utf8(path.read_bytes(), path)


def iter_jsonl(path: str | Path, max_row_bytes: int | None = None,
               errors: list[DataError] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file.

    Each line is checked for size (`max_row_bytes`, None = no limit), UTF-8 and JSON. With `errors` given, a bad
    line is recorded there and reading goes on (to report every error); otherwise the first one raises.
    """
    path = check_readable_file(path)
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            start, offset = offset, offset + len(raw)
            try:
                if max_row_bytes is not None and len(raw) > max_row_bytes:
                    raise DataError(path, lineno, None, f"row is {len(raw):,} bytes, over the limit of "
                                    f"{max_row_bytes:,} (set PICOCHAT_MAX_ROW_BYTES or --max-row-bytes to allow it)")
                text = decode_utf8(raw, path, lineno, start)
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(path, lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
            except DataError as exc:
                if errors is None:
                    raise
                errors.append(exc)
                continue
            yield lineno, obj


def read_rows(path: str | Path, parse: Callable[[dict[str, Any], Path, int], Any],
              max_row_bytes: int | None = None, errors: list[DataError] | None = None) -> list[Any]:
    """Parse every row of a JSONL file. Without `errors`, the first bad row raises; with it, every bad row
    is recorded there and the good ones are returned. A file without rows is an error either way."""
    path = Path(path)
    limit = max_row_bytes_default() if max_row_bytes is None else max_row_bytes
    rows = []
    for line, obj in iter_jsonl(path, limit, errors):
        try:
            rows.append(parse(obj, path, line))
        except DataError as exc:
            if errors is None:
                raise
            errors.append(exc)
    if not rows and not errors:
        raise DataError(path, None, None, "has no rows (the file is empty)")
    return rows


def _text(obj: dict[str, Any], key: str, path: Path, line: int, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(path, line, key, "is missing")
        return None
    if not isinstance(value, str):
        raise DataError(path, line, key, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(path, line, key, "is empty")
    return value


def _system_message(obj: dict[str, Any], path: Path, line: int) -> Message | None:
    """`system` and serialized `tools` merge into one leading system message."""
    system = _text(obj, "system", path, line, required=False)
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError(path, line, "tools", f"must be a list, got {type(tools).__name__}")
    parts = [p for p in (system,) if p]
    if tools:
        parts.append("Tools:\n" + json.dumps(tools, ensure_ascii=False, sort_keys=True))
    return Message("system", "\n\n".join(parts)) if parts else None


def _messages(obj: dict[str, Any], path: Path, line: int) -> list[Message]:
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        raise DataError(path, line, "messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(path, line, where, "must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise DataError(path, line, f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(path, line, f"{where}.content", "must be a string")
        out.append(Message(role.lower(), content))
    return out


def _prompt_and_maybe_answer(obj: dict[str, Any], path: Path, line: int) -> list[Message]:
    msgs: list[Message] = []
    system = _system_message(obj, path, line)
    if system:
        msgs.append(system)
    if "messages" in obj:
        msgs.extend(_messages(obj, path, line))
    else:
        msgs.append(Message("user", _text(obj, "user", path, line)))
    return msgs


def parse_chat_row(obj: dict[str, Any], path: Path, line: int) -> Conversation:
    msgs = _prompt_and_maybe_answer(obj, path, line)
    if "messages" not in obj:
        msgs.append(Message("assistant", _text(obj, "assistant", path, line)))
    if msgs[-1].role != "assistant":
        raise DataError(path, line, "messages", f"last message must be from the assistant, got {msgs[-1].role!r}")
    if not msgs[-1].content.strip():
        raise DataError(path, line, f"messages[{len(msgs) - 1}].content", "final assistant message is empty")
    if not any(m.role == "user" for m in msgs):
        raise DataError(path, line, "messages", "needs at least one user message")
    category = obj.get("category", "general")
    if not isinstance(category, str):
        raise DataError(path, line, "category", "must be a string")
    return Conversation(tuple(msgs), category, obj.get("group"), str(path), line)


def read_chat_jsonl(path: str | Path, max_row_bytes: int | None = None,
                    errors: list[DataError] | None = None) -> list[Conversation]:
    return read_rows(path, parse_chat_row, max_row_bytes, errors)


def _str_list(obj: dict[str, Any], key: str, path: Path, line: int) -> tuple[str, ...]:
    value = obj.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(path, line, key, "must be a list of strings")
    return tuple(value)


def parse_eval_row(obj: dict[str, Any], path: Path, line: int) -> EvalRow:
    prompt = _prompt_and_maybe_answer(obj, path, line)
    if prompt[-1].role == "assistant":  # a messages-style row that carries its reference answer
        reference = prompt[-1].content
        prompt = prompt[:-1]
    else:
        reference = obj.get("assistant") if isinstance(obj.get("assistant"), str) else None
    groups = obj.get("must_include_any", [])
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and g and all(isinstance(s, str) for s in g) for g in groups
    ):
        raise DataError(path, line, "must_include_any", "must be a list of non-empty lists of strings")
    answerable = obj.get("answerable", True)
    if not isinstance(answerable, bool):
        raise DataError(path, line, "answerable", "must be true or false")
    known = {"user", "messages", "system", "tools", "assistant", "category", "answerable", "must_include",
             "must_include_any", "must_not_include", "expected", "split", "eval_split"}
    must_include = _str_list(obj, "must_include", path, line)
    expected = obj.get("expected")
    if expected is not None:  # the original's exact-answer field: required in the reply, and the reference
        if not isinstance(expected, str) or not expected.strip():
            raise DataError(path, line, "expected", "must be a non-empty string")
        must_include += (expected,)
        reference = reference if reference is not None else expected
    split = obj.get("split", obj.get("eval_split", "default"))
    if not isinstance(split, str) or not split.strip():
        raise DataError(path, line, "split", "must be a non-empty string")
    return EvalRow(
        prompt=tuple(prompt),
        category=str(obj.get("category", "general")),
        answerable=answerable,
        split=split.strip(),
        choice=bool(obj.get("choice_labels")),
        must_include=must_include,
        must_include_any=tuple(tuple(g) for g in groups),
        must_not_include=_str_list(obj, "must_not_include", path, line),
        reference=reference,
        source=str(path),
        line=line,
        extra={k: v for k, v in obj.items() if k not in known},
    )


def read_eval_jsonl(path: str | Path, max_row_bytes: int | None = None,
                    errors: list[DataError] | None = None) -> list[EvalRow]:
    return read_rows(path, parse_eval_row, max_row_bytes, errors)


def parse_preference_row(obj: dict[str, Any], path: Path, line: int) -> PreferenceRow:
    key = "prompt" if "prompt" in obj else "user"
    prompt = [Message("user", _text(obj, key, path, line))]
    system = _system_message(obj, path, line)
    if system:
        prompt.insert(0, system)
    return PreferenceRow(tuple(prompt), _text(obj, "chosen", path, line), _text(obj, "rejected", path, line),
                         str(path), line)


def read_preference_jsonl(path: str | Path, max_row_bytes: int | None = None,
                          errors: list[DataError] | None = None) -> list[PreferenceRow]:
    return read_rows(path, parse_preference_row, max_row_bytes, errors)
