"""Read chat/instruction datasets from JSONL into validated rows, collecting (not raising on) malformed lines.

Each line is one JSON object in one of two formats (an optional ``"id"``, a string or an integer, may be added;
other extra keys are ignored):

- ``{"prompt": str, "response": str}``
- ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: the LAST message must be
  from the assistant and is the response (the only part trained on); all earlier messages are the prompt.

Malformed rows are skipped and listed with their line number and reason in :class:`DatasetStats`; if their
fraction exceeds ``max_bad_fraction`` a :class:`DataError` says which rows and how to fix them. Blank lines are
ignored. The same checks apply to in-memory records (e.g. a Hugging Face dataset) through :func:`rows_from_records`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
RowFormat = Literal["prompt_response", "messages"]
_REPORT_LIMIT = 10


class DataError(ValueError):
    """A dataset cannot be used as given (missing/empty file, too many malformed rows, nothing left to train on)."""


@dataclass(frozen=True)
class Row:
    """One valid dataset row, normalized to a conversation whose last message is the assistant response."""

    sample_id: int  # index among the accepted rows of the source (0, 1, 2, ...)
    line: int  # 1-based line number in the source file (record index + 1 for in-memory records)
    messages: tuple[dict[str, str], ...]  # {"role", "content"} dicts; messages[-1] is the assistant response
    format: RowFormat
    row_id: str | None = None  # the row's own "id", if it had one

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Everything before the response."""
        return [dict(m) for m in self.messages[:-1]]

    @property
    def response(self) -> str:
        """The assistant response text (the training target)."""
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class RejectedRow:
    """A row that was not used, with its 1-based line number and the reason."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class DatasetStats:
    """What reading and tokenizing one dataset kept and dropped.

    ``rejected`` rows were malformed and count toward ``max_bad_fraction``. ``dropped`` rows were well formed but
    could not be used (too long for ``max_seq_len`` under the truncation policy, or a chat template whose prompt
    rendering is not a prefix of the conversation): they are reported, never counted as bad rows.
    """

    source: str
    num_rows: int = 0  # non-blank lines (records) seen
    rejected: list[RejectedRow] = field(default_factory=list)
    dropped: list[RejectedRow] = field(default_factory=list)
    num_samples: int = 0  # samples kept after tokenization
    num_truncated: int = 0  # kept, but cut at the right to max_seq_len
    num_tokens: int = 0  # tokens of the kept samples
    num_loss_tokens: int = 0  # target tokens (response + EOS) of the kept samples

    @property
    def num_rejected(self) -> int:
        return len(self.rejected)

    @property
    def num_dropped(self) -> int:
        return len(self.dropped)

    def rejected_report(self, limit: int = _REPORT_LIMIT) -> str:
        """``"<source>: 3 of 120 rows rejected: line 4: invalid JSON (...); line 9: missing 'response'"``."""
        return f"{self.source}: {self.num_rejected} of {self.num_rows} rows rejected: {_join(self.rejected, limit)}"

    def dropped_report(self, limit: int = _REPORT_LIMIT) -> str:
        """``"<source>: 2 of 120 rows dropped: line 7: too long (...)"``."""
        return f"{self.source}: {self.num_dropped} of {self.num_rows} rows dropped: {_join(self.dropped, limit)}"

    def summary(self) -> str:
        """One line for the log: rows, samples, tokens, and what was rejected, dropped or truncated."""
        return (
            f"{self.source}: {self.num_rows} rows -> {self.num_samples} samples, {self.num_tokens} tokens "
            f"({self.num_loss_tokens} target); rejected {self.num_rejected}, dropped {self.num_dropped}, "
            f"truncated {self.num_truncated}"
        )


def _join(items: list[RejectedRow], limit: int) -> str:
    text = "; ".join(str(item) for item in items[:limit])
    if len(items) > limit:
        text += f"; ... ({len(items) - limit} more)"
    return text


class _BadRow(Exception):
    """Internal: a record failed validation; the message is the reason shown to the user."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_record(record: Any) -> tuple[tuple[dict[str, str], ...], RowFormat, str | None]:
    """Validate one decoded record; return ``(messages, format, row_id)`` or raise ``_BadRow(reason)``."""
    if not isinstance(record, dict):
        raise _BadRow(f"not a JSON object (got {_type_name(record)})")
    row_id = record.get("id")
    if row_id is not None:
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
            raise _BadRow(f"'id' must be a string or an integer, got {_type_name(row_id)}")
        row_id = str(row_id)

    has_pr = "prompt" in record or "response" in record
    if "messages" in record:
        if has_pr:
            raise _BadRow("has both 'messages' and 'prompt'/'response': use one format per row")
        return _parse_messages(record["messages"]), "messages", row_id
    if not has_pr:
        found = ", ".join(sorted(map(str, record))) or "none"
        raise _BadRow(f"needs 'prompt' and 'response', or 'messages' (found keys: {found})")
    for key in ("prompt", "response"):
        if key not in record:
            raise _BadRow(f"missing '{key}'")
        if not isinstance(record[key], str):
            raise _BadRow(f"'{key}' must be a string, got {_type_name(record[key])}")
    if not record["response"].strip():
        raise _BadRow("empty response")
    messages = ({"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]})
    return messages, "prompt_response", row_id


def _parse_messages(messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise _BadRow(f"'messages' must be a non-empty list, got {_type_name(messages)}")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _BadRow(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise _BadRow(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _BadRow(f"messages[{i}].content must be a string, got {_type_name(content)}")
        parsed.append({"role": role, "content": content})
    if parsed[-1]["role"] != "assistant":
        raise _BadRow(f"last message must be from the assistant (it is the response), got {parsed[-1]['role']!r}")
    if len(parsed) < 2:
        raise _BadRow("'messages' has no prompt before the assistant response")
    if not parsed[-1]["content"].strip():
        raise _BadRow("empty response")
    return tuple(parsed)


def rows_from_records(
    records: Iterable[Any], *, source: str, max_bad_fraction: float = 0.0
) -> tuple[list[Row], DatasetStats]:
    """Validate in-memory records (dicts in either row format, e.g. a Hugging Face dataset) into rows.

    Same checks and errors as :func:`read_jsonl`; the "line" of a record is its 1-based index.
    """
    return _collect(enumerate(records, start=1), source=source, max_bad_fraction=max_bad_fraction)


def _collect(
    records: Iterable[tuple[int, Any]], *, source: str, max_bad_fraction: float
) -> tuple[list[Row], DatasetStats]:
    """Validate ``(line, record)`` pairs; a record that is a ``_BadRow`` was already rejected while decoding.

    Raises :class:`DataError` when there are no records, no valid rows, or more than ``max_bad_fraction`` of the
    records are malformed (the message lists the first rows and their reasons). Below the threshold, rejected
    rows are logged as a warning and listed in the returned stats.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    stats = DatasetStats(source=source)
    rows: list[Row] = []
    for line, record in records:
        stats.num_rows += 1
        try:
            if isinstance(record, _BadRow):
                raise record
            messages, fmt, row_id = _parse_record(record)
        except _BadRow as bad:
            stats.rejected.append(RejectedRow(line, str(bad)))
            continue
        rows.append(Row(sample_id=len(rows), line=line, messages=messages, format=fmt, row_id=row_id))

    if stats.num_rows == 0:
        raise DataError(f"{source}: the dataset is empty (no rows): point data at a file with one JSON object per line")
    if stats.rejected:
        fraction = stats.num_rejected / stats.num_rows
        if fraction > max_bad_fraction or not rows:
            raise DataError(
                f"{stats.rejected_report()}. That is {fraction:.1%} of the rows, more than "
                f"data.max_bad_fraction={max_bad_fraction}: fix the rows or raise data.max_bad_fraction."
            )
        logger.warning("%s (within data.max_bad_fraction=%s; skipped)", stats.rejected_report(), max_bad_fraction)
    return rows, stats


def _decode_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, _BadRow(f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if line_no == 1:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, _BadRow(f"invalid JSON ({e.msg}: column {e.colno})")


def read_jsonl(path: str | Path, *, max_bad_fraction: float = 0.0) -> tuple[list[Row], DatasetStats]:
    """Read and validate a JSONL dataset (format in the module docstring).

    Returns the valid rows (``sample_id`` = 0, 1, ... in file order) and the stats listing rejected lines.
    Raises :class:`DataError` if the file is missing, empty, or has more than ``max_bad_fraction`` malformed rows.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"dataset file {str(path)!r} {what}: check the data path (relative paths are from the cwd)")
    return _collect(_decode_lines(path), source=str(path), max_bad_fraction=max_bad_fraction)
