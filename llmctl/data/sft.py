"""Instruction data for SFT: `sft.datasets` -> conversations, split into train and held out.

A record in any of the usual shapes becomes a list of messages (role, content), which
`llmctl.data.chat_template` turns into token ids:

    alpaca   {"instruction", "input"?, "output"}  (Dolly: "context"?, "response")
    prompt   {"prompt" | "question" | "input", "completion" | "response" | "answer" | "output"}
    chat     {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}
    text     {"text": "### Human: ... ### Assistant: ..."}

Sources (`sft.datasets`) use the data-spec syntax with `:N` caps: the registered Hub sets
(`SFT_REGISTERED`), `hf:ORG/NAME[/CONFIG]`, and local `json:`, `jsonl:` and `parquet:` globs.
Held-out instructions are a source's own validation split where it has one, else a fixed
fraction of its records picked by a seed that does not change with `run.seed`, so every run
on the same data scores the same prompts. A malformed record stops the run with its file and
line; a record with an empty reply (nothing to learn) is skipped and counted, never silently.
Records are small, so they are read and tokenized on every run rather than cached.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llmctl.config import SFT_FORMATS as FORMATS
from llmctl.data.chat_template import ROLES, Message
from llmctl.data.readers import read_records
from llmctl.errors import ConfigError, LlmctlError

HOLDOUT_SEED = 0  # held-out records do not move when run.seed changes


# --------------------------------------------------------------------------- records -> messages

def detect_format(record: dict[str, Any]) -> str:
    if "messages" in record or "conversations" in record:
        return "chat"
    if "instruction" in record and ("output" in record or "response" in record):
        return "alpaca"  # Alpaca (instruction/input/output) or Dolly (instruction/context/response)
    if _first_key(record, PROMPT_KEYS) and _first_key(record, REPLY_KEYS):
        return "prompt"
    if "text" in record:
        return "text"
    raise ValueError(f"fields {sorted(record)} match no known shape (alpaca: instruction/output; "
                     f"prompt/completion, prompt/response or question/answer; chat: messages; "
                     f"text with ### Assistant:)")


def _field(record: dict[str, Any], key: str, fmt: str) -> str:
    if key not in record:
        raise ValueError(f"no '{key}' field ({fmt} format needs it; fields: {', '.join(sorted(record))})")
    value = record[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' is {type(value).__name__}, not text")
    return value


PROMPT_KEYS = ("prompt", "question", "input")  # prompt shape: the first of these present ...
REPLY_KEYS = ("completion", "response", "answer", "output")  # ... and the first of these


def _first_key(record: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in record), None)


_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_TURN = re.compile(r"(### Human:|### Assistant:)")


def _chat_messages(record: dict[str, Any]) -> list[Message]:
    """`messages: [{role, content}]`, or ShareGPT's `conversations: [{from, value}]`."""
    key = "messages" if "messages" in record else "conversations"
    role_key, content_key = ("role", "content") if key == "messages" else ("from", "value")
    raw = record.get(key)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"'{key}' must be a non-empty list of {{{role_key}, {content_key}}} objects")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise ValueError(f"message {i} needs '{role_key}' and '{content_key}'")
        if not isinstance(m[role_key], str) or _ROLE_ALIASES.get(m[role_key], m[role_key]) not in ROLES:
            raise ValueError(f"message {i} has role {m[role_key]!r}; use system, user or assistant")
        messages.append((_ROLE_ALIASES.get(m[role_key], m[role_key]), _content(m[content_key], i, content_key)))
    return messages


def _content(value: Any, i: int, key: str) -> str:
    """A message's text: a string, None (a turn with no text), or OpenAI-style parts
    [{"type": "text", "text": ...}, ...] joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ValueError(f"message {i} has {key} of type {type(value).__name__}, not text")


def _text_messages(text: str) -> list[Message]:
    """`### Human: ... ### Assistant: ...`, one turn or several; text before the first marker
    becomes a system message."""
    parts = _TURN.split(text)  # [before, marker, content, marker, content, ...]
    if "### Assistant:" not in parts:
        raise ValueError("'text' has no '### Assistant:' separator")
    messages = [("system", parts[0].strip())] if parts[0].strip() else []
    for marker, content in zip(parts[1::2], parts[2::2]):
        messages.append(("user" if marker == "### Human:" else "assistant", content.strip()))
    return messages


class EmptyReply(ValueError):
    """A well-formed record with nothing to train on: skipped and counted, not an error."""


def to_messages(record: dict[str, Any], fmt: str = "auto") -> list[Message]:
    """One record -> messages; raises ValueError with what is wrong (the caller adds where)."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "alpaca":
        instruction = _field(record, "instruction", fmt)
        extra_key = "input" if "input" in record else "context"  # Dolly calls the input "context"
        extra = _field(record, extra_key, fmt) if extra_key in record else ""
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        reply_key = "output" if "output" in record else "response"  # Dolly: "response"
        messages = [("user", user), ("assistant", _field(record, reply_key, fmt))]
    elif fmt == "prompt":
        prompt_key, reply_key = _first_key(record, PROMPT_KEYS) or "prompt", _first_key(record, REPLY_KEYS) or "completion"
        messages = [("user", _field(record, prompt_key, fmt)), ("assistant", _field(record, reply_key, fmt))]
    elif fmt == "chat":
        messages = _chat_messages(record)
    elif fmt == "text":
        messages = _text_messages(_field(record, "text", fmt))
    else:
        raise ConfigError(f"sft.format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if not any(role == "assistant" and content.strip() for role, content in messages):
        raise EmptyReply("no assistant reply to learn from")
    return messages


# --------------------------------------------------------------------------- specs -> conversations

# Instruction sets on the Hub that a user can name without hf: (none has a validation split).
SFT_REGISTERED: dict[str, tuple[str, str | None]] = {
    "tatsu-lab/alpaca": ("tatsu-lab/alpaca", None),  # 52k, instruction/input/output
    "yahma/alpaca-cleaned": ("yahma/alpaca-cleaned", None),  # 52k, Alpaca with fixes
    "databricks/databricks-dolly-15k": ("databricks/databricks-dolly-15k", None),  # 15k human-written
}
_SFT_FORMS = (f"shakespeare-dialogue (shipped), a registered set ({', '.join(SFT_REGISTERED)}), hf:ORG/NAME[/CONFIG], "
              f"json:GLOB, jsonl:GLOB or parquet:GLOB, with :N to cap at N records")


def parse_sft_spec(raw: str):
    """An `sft.datasets` entry -> `llmctl.data.sources.SourceSpec` (kind hub, json, jsonl or parquet)."""
    import dataclasses

    from llmctl.data import shakespeare
    from llmctl.data.sources import REGISTERED, SourceSpec, parse_spec

    spec_text = raw.strip()
    head, sep, tail = spec_text.rpartition(":")
    name = head if sep and re.fullmatch(r"[-+]?\d+", tail) else spec_text
    if name == shakespeare.DIALOGUE_NAME:
        cap = int(tail) if name != spec_text else None
        if cap is not None and cap < 1:
            raise ConfigError(f"sft.datasets '{raw}': the cap :{tail} must be a positive number of records")
        return SourceSpec(raw, "shipped", name, cap)
    if name in SFT_REGISTERED:
        return dataclasses.replace(parse_spec(f"hf:{spec_text}"), raw=raw)
    try:
        spec = parse_spec(raw)
    except ConfigError as e:
        if "unknown data source" in str(e) or "empty data spec" in str(e):
            raise ConfigError(f"unknown SFT data source '{raw}' in sft.datasets; use {_SFT_FORMS}") from None
        raise
    if spec.kind == "text":
        raise ConfigError(f"sft.datasets '{raw}': text: files have no instruction/response structure; "
                          f"use jsonl:, json: or parquet: records (alpaca, prompt/response, chat or "
                          f"'### Human: ... ### Assistant: ...' text)")
    if spec.kind == "shipped" or (spec.kind == "hub" and spec.target in REGISTERED):
        raise ConfigError(f"sft.datasets '{raw}' is a pretraining corpus, not instruction data; "
                          f"use {_SFT_FORMS}")
    if spec.field is not None:
        raise ConfigError(f"sft.datasets '{raw}': SFT records are read whole; drop '#{spec.field}' "
                          f"(set sft.format to name the record shape)")
    return spec


def check_sft_sources(specs: list[str]) -> list:
    """Parse every spec and check that local files exist, before any slow work."""
    from llmctl.data.sources import local_files

    parsed = [parse_sft_spec(s) for s in specs]
    for spec in parsed:
        if spec.kind not in ("hub", "shipped"):
            local_files(spec)
    return parsed


def iter_records(spec, split: str = "train") -> Iterator[tuple[str, Any]] | None:
    """(where, record) of a source's split; None when it has no such split (local files
    have only "train")."""
    if spec.kind != "hub":
        from llmctl.data import shakespeare
        from llmctl.data.sources import local_files

        if split != "train":
            return None
        if spec.kind == "shipped":
            return shakespeare.dialogue_records()
        return ((where, record) for f in local_files(spec) for where, record in read_records(f, spec.kind))
    return _hub_records(spec, split)


SFT_DATASET_FIX = "use a local file with --set 'sft.datasets=[\"jsonl:PATH\"]'"


def sft_hub_dataset(spec) -> tuple[str, str | None]:
    """(path, config) of an SFT Hub spec, as `datasets.load_dataset` takes them."""
    return SFT_REGISTERED.get(spec.target) or (
        ("/".join(spec.target.split("/")[:2]), spec.target.split("/")[2]) if spec.target.count("/") == 2
        else (spec.target, None))


def _hub_records(spec, split: str) -> Iterator[tuple[str, Any]] | None:
    from llmctl.data.hub import Missing, dataset_cached, hub_offline, require_hub

    path, config = sft_hub_dataset(spec)
    require_hub(Missing(f"dataset '{spec.raw}'", SFT_DATASET_FIX), cached=dataset_cached(path, config))
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(path, config, split=split)
    except ValueError as e:
        if split != "train" and "split" in str(e).lower():
            return None
        raise LlmctlError(f"cannot load '{spec.raw}' split {split}: {str(e).splitlines()[0]}") from None
    except (ConnectionError, OSError) as e:
        hint = "populate the cache while online first" if hub_offline() else "check the name and your connection"
        raise LlmctlError(f"cannot load '{spec.raw}' from the Hub ({type(e).__name__}); {hint}, "
                          f"or use a local jsonl:/json:/parquet: file") from None
    except Exception as e:  # datasets raises its own types (DatasetNotFoundError, ...)
        raise LlmctlError(f"cannot load '{spec.raw}' from the Hub: {str(e).splitlines()[0]}") from None
    return ((f"{spec.raw} ({split} row {i})", row) for i, row in enumerate(ds))


def conversation(where: str, record: Any, fmt: str) -> list[Message]:
    """`to_messages` with the record's place in the message: one line a user can act on."""
    try:
        return to_messages(record, fmt)
    except EmptyReply:
        raise
    except ValueError as e:
        hint = " (or set sft.format to the shape it is in)" if fmt == "auto" else f" (sft.format is {fmt})"
        raise LlmctlError(f"{where}: {e}; fix or remove that record{hint}") from None


@dataclass
class SFTData:
    """Conversations of every source, split into train and held-out validation."""

    train: list[list[Message]] = field(default_factory=list)
    validation: list[list[Message]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)  # per source: counts and how it was split
    skipped: int = 0  # records with an empty reply
    first_skipped: str | None = None  # where the first of them is


def _conversations(records: Iterator[tuple[str, Any]], fmt: str, cap: int | None, data: SFTData
                   ) -> list[list[Message]]:
    out: list[list[Message]] = []
    for where, record in records:
        if cap is not None and len(out) >= cap:
            break
        try:
            out.append(conversation(where, record, fmt))
        except EmptyReply:
            data.skipped += 1
            data.first_skipped = data.first_skipped or where
    return out


def held_out_indices(n: int, fraction: float) -> set[int]:
    """max(1, round(n * fraction)) of n records (none when n < 2), picked by a fixed seed."""
    if n < 2:
        return set()
    k = min(n - 1, max(1, round(n * fraction)))
    return set(random.Random(HOLDOUT_SEED).sample(range(n), k))


def load_sft_data(specs: list[str], fmt: str, validation_fraction: float) -> SFTData:
    """Every source's conversations (caps applied), with held-out validation: a source's own
    validation split, else a fixed `validation_fraction` of its records."""
    data = SFTData()
    for spec in check_sft_sources(specs):
        train = _conversations(iter_records(spec, "train") or iter(()), fmt, spec.cap, data)
        own = iter_records(spec, "validation") if spec.kind == "hub" else None
        if own is not None:
            validation, how = _conversations(own, fmt, spec.cap, data), "its validation split"
        else:
            held = held_out_indices(len(train), validation_fraction)
            validation = [c for i, c in enumerate(train) if i in held]
            train = [c for i, c in enumerate(train) if i not in held]
            how = f"{len(validation)} held out ({validation_fraction:g})"
        data.train += train
        data.validation += validation
        data.sources.append({"spec": spec.raw, "train": len(train), "validation": len(validation), "held_out": how})
    return data


def record_at(spec_text: str, index: int) -> tuple[str, Any]:
    """The `index`-th record (0-based, caps ignored) of a source's train split, for inspection."""
    from itertools import islice

    if index < 0:
        raise ConfigError(f"--index {index} must be >= 0")
    spec = check_sft_sources([spec_text])[0]
    found = list(islice(iter_records(spec, "train") or iter(()), index, index + 1))
    if not found:
        raise ConfigError(f"'{spec_text}' has fewer than {index + 1} records; pass a smaller --index")
    return found[0]
