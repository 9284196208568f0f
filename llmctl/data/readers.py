"""Local files -> documents: plain text, JSON Lines, JSON arrays and Parquet.

Every reader streams: it holds one document (text), one line (JSONL) or one record batch
(Parquet) at a time, so memory does not grow with the file. The exception is `json:`, a
single JSON array, which has to be parsed whole; use JSONL or Parquet for big data.

Empty and whitespace-only documents are skipped everywhere. A record without the text
field, a field that is not a string, a line that is not JSON or bytes that are not UTF-8
raise one `LlmctlError` naming the file (and line) and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from llmctl.errors import ConfigError, LlmctlError

# A text block longer than this is cut at line boundaries into several documents, so one
# file without blank lines cannot become a single multi-gigabyte string (or tokenizer call).
MAX_BLOCK_CHARS = 1 << 20
PARQUET_BATCH = 1024  # rows per record batch read from a Parquet file


def _not_utf8(path: Path, e: UnicodeDecodeError) -> LlmctlError:
    return LlmctlError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                       f"convert it, e.g. iconv -t utf-8")


def read_text(path: Path) -> Iterator[str]:
    """A text file's documents: blocks of lines separated by blank (or whitespace-only) lines."""
    block: list[str] = []
    size = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    block.append(line.rstrip("\n"))
                    size += len(line)
                    if size >= MAX_BLOCK_CHARS:
                        yield "\n".join(block)
                        block, size = [], 0
                elif block:
                    yield "\n".join(block)
                    block, size = [], 0
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    if block:
        yield "\n".join(block)


def _field_text(record: object, field: str, where: str, fix: str) -> str | None:
    """The text of one record, None when it is empty; raises on a missing or non-string field."""
    if isinstance(record, str) and field == "text":
        return record if record.strip() else None  # a bare string is its own text
    if not isinstance(record, dict):
        raise LlmctlError(f"{where} is a JSON {type(record).__name__}, not an object with a "
                          f"'{field}' field")
    if field not in record:
        shown = ", ".join(list(record)[:8]) or "none"
        raise LlmctlError(f"{where} has no '{field}' field (fields: {shown}); {fix}")
    text = record[field]
    if text is None:
        return None
    if not isinstance(text, str):
        raise LlmctlError(f"{where}: field '{field}' is a {type(text).__name__}, not a string")
    return text if text.strip() else None


def _field_fix(kind: str) -> str:
    return f"name the text field with {kind}:PATH#FIELD"


def read_records(path: Path, kind: str) -> Iterator[tuple[str, object]]:
    """(where, record) pairs from a jsonl, json (one array) or parquet file, streamed where the
    format allows; `where` names the line, element or row for messages. Pretraining text
    (`read_jsonl`, `read_json`) and SFT conversations (llmctl.data.sft) both read through it."""
    if kind == "jsonl":
        lineno = 0
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise LlmctlError(f"{path} line {lineno} is not valid JSON ({e.msg}); jsonl: expects "
                                          f"one JSON object per line: fix or remove that line") from None
                    yield f"{path}:{lineno}", record
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
    elif kind == "json":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
        except json.JSONDecodeError as e:
            raise LlmctlError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); json: expects "
                              f"one JSON array of objects (use jsonl: for one object per line)") from None
        if not isinstance(data, list):
            raise LlmctlError(f"{path} holds a JSON {type(data).__name__}, not an array of records; "
                              f"json: expects [{{...}}, ...] (use jsonl: for one object per line)")
        for i, record in enumerate(data):
            yield f"{path} record {i}", record
    elif kind == "parquet":
        row = 0
        for batch in _parquet_file(path).iter_batches(batch_size=PARQUET_BATCH):
            for record in batch.to_pylist():
                yield f"{path} row {row}", record
                row += 1
    else:
        raise ConfigError(f"unknown record file kind '{kind}'; use json:, jsonl: or parquet:")


def read_jsonl(path: Path, field: str, first_only: bool = False) -> Iterator[str]:
    """One JSON object per line; blank lines are skipped. `first_only` checks the first record."""
    fix = _field_fix("jsonl")
    for where, record in read_records(path, "jsonl"):
        text = _field_text(record, field, where, fix)
        if first_only:
            return
        if text is not None:
            yield text


def read_json(path: Path, field: str) -> Iterator[str]:
    """A JSON array of objects (or of strings); the whole file is parsed at once."""
    fix = _field_fix("json")
    for where, record in read_records(path, "json"):
        text = _field_text(record, field, where, fix)
        if text is not None:
            yield text


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise LlmctlError(f"{path} is not a readable Parquet file: {str(e).splitlines()[0]}") from None


def check_parquet(path: Path, field: str) -> None:
    """The schema has the text field, as a string column."""
    import pyarrow as pa

    schema = _parquet_file(path).schema_arrow
    if field not in schema.names:
        raise LlmctlError(f"{path} has no '{field}' column (columns: {', '.join(schema.names[:8])}); "
                          f"{_field_fix('parquet')}")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
            or pa.types.is_null(kind)):  # an all-null column: no documents
        raise LlmctlError(f"{path}: column '{field}' holds {kind}, not strings")


def read_parquet(path: Path, field: str) -> Iterator[str]:
    """The text column, one record batch at a time."""
    check_parquet(path, field)
    for batch in _parquet_file(path).iter_batches(batch_size=PARQUET_BATCH, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None and text.strip():
                yield text


def check_jsonl(path: Path, field: str) -> None:
    """The first record parses and has the text field (later records are checked as read)."""
    for _ in read_jsonl(path, field, first_only=True):
        pass


READERS = {"jsonl": read_jsonl, "json": read_json, "parquet": read_parquet}
