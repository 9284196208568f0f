"""Instruction data for SFT: records -> conversations -> token ids with a loss mask.

A record in any of the usual shapes becomes a list of messages (role, content):

    alpaca   {"instruction", "input"?, "output"}  (Dolly: "context"?, "response")
    prompt   {"prompt", "completion" | "response"}
    chat     {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}
    text     {"text": "### Human: ... ### Assistant: ..."}

A `ChatTemplate` renders messages into segments of text, each marked as trained or not:
everything a user or system wrote, and the assistant prefix, carries no loss; each
assistant reply and the end-of-text token after it do. Segments are tokenized one by one,
so the mask is exact at every boundary, and generation encodes a prompt the same way
(`prompt_ids`), so training and generation cannot drift apart. The template is a plain
dict in the checkpoint; `to_jinja()` gives the same format as a transformers chat template.

Sources (`sft.datasets`) use the data-spec syntax with `:N` caps: the registered Hub sets
(`SFT_REGISTERED`), `hf:ORG/NAME[/CONFIG]`, and local `json:`, `jsonl:` and `parquet:` globs.
Held-out instructions are a source's own validation split where it has one, else a fixed
fraction of its records picked by a seed that does not change with `run.seed`, so every run
on the same data scores the same prompts. A malformed record stops the run with its file and
line; a record with an empty reply (nothing to learn) is skipped and counted, never silently.
Records are small, so they are read and tokenized on every run rather than cached: tokenizing
is batched (`encode_examples`), about a second for 15k conversations.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmctl.config import SFT_FORMATS as FORMATS
from llmctl.errors import ConfigError, LlmctlError

IGNORE = -100  # target id that cross-entropy skips
ROLES = ("system", "user", "assistant")
HOLDOUT_SEED = 0  # held-out records do not move when run.seed changes


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes text. `{content}` is replaced by the message."""

    system: str = "{content}\n\n"
    user: str = "### Human: {content}\n"
    assistant_prefix: str = "### Assistant:"  # the generation prompt; no loss
    assistant: str = " {content}"  # the reply; trained, then EOS (trained)
    after_assistant: str = "\n"  # between an EOS and the next turn; no loss

    def to_state(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, str]) -> "ChatTemplate":
        return cls(**state)

    def to_jinja(self, eos_token: str) -> str:
        """The same rendering as a transformers chat template (for export)."""
        def part(fmt: str) -> str:
            before, _, after = fmt.partition("{content}")
            return f"{json.dumps(before)} + message['content'] + {json.dumps(after)}"
        return (
            "{% for message in messages %}"
            f"{{% if message['role'] == 'system' %}}{{{{ {part(self.system)} }}}}"
            f"{{% elif message['role'] == 'user' %}}{{{{ {part(self.user)} }}}}"
            f"{{% else %}}{{{{ {json.dumps(self.assistant_prefix)} + {part(self.assistant)} + "
            f"{json.dumps(eos_token)} + {json.dumps(self.after_assistant)} }}}}{{% endif %}}"
            "{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {json.dumps(self.assistant_prefix)} }}}}{{% endif %}}"
        )


Message = tuple[str, str]  # (role, content)


# --------------------------------------------------------------------------- records -> messages

def detect_format(record: dict[str, Any]) -> str:
    if "messages" in record or "conversations" in record:
        return "chat"
    if "instruction" in record and ("output" in record or "response" in record):
        return "alpaca"  # Alpaca (instruction/input/output) or Dolly (instruction/context/response)
    if "prompt" in record and ("completion" in record or "response" in record):
        return "prompt"
    if "text" in record:
        return "text"
    raise ValueError(f"fields {sorted(record)} match no known shape (alpaca: instruction/output; "
                     f"prompt/completion or prompt/response; chat: messages; text with ### Assistant:)")


def _field(record: dict[str, Any], key: str, fmt: str) -> str:
    if key not in record:
        raise ValueError(f"no '{key}' field ({fmt} format needs it; fields: {', '.join(sorted(record))})")
    value = record[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' is {type(value).__name__}, not text")
    return value


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
        if not isinstance(m[content_key], str):
            raise ValueError(f"message {i} has {content_key} of type {type(m[content_key]).__name__}, not text")
        messages.append((_ROLE_ALIASES.get(m[role_key], m[role_key]), m[content_key]))
    return messages


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
        reply_key = "completion" if "completion" in record else "response"
        messages = [("user", _field(record, "prompt", fmt)), ("assistant", _field(record, reply_key, fmt))]
    elif fmt == "chat":
        messages = _chat_messages(record)
    elif fmt == "text":
        messages = _text_messages(_field(record, "text", fmt))
    else:
        raise ConfigError(f"sft.format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if not any(role == "assistant" and content.strip() for role, content in messages):
        raise EmptyReply("no assistant reply to learn from")
    return messages



# --------------------------------------------------------------------------- messages -> ids + mask

def render_segments(messages: list[Message], template: ChatTemplate) -> list[tuple[str, bool]]:
    """(text, trained) segments; the EOS after each reply is added at tokenization."""
    segments: list[tuple[str, bool]] = []
    for i, (role, content) in enumerate(messages):
        if role == "system":
            segments.append((template.system.format(content=content), False))
        elif role == "user":
            segments.append((template.user.format(content=content), False))
        else:
            segments.append((template.assistant_prefix, False))
            segments.append((template.assistant.format(content=content), True))
            segments.append(("<eos>", True))
            if i < len(messages) - 1:
                segments.append((template.after_assistant, False))
    return segments


@dataclass
class Example:
    input_ids: list[int]  # (T,) tokens the model reads
    labels: list[int]  # (T,) next-token targets, IGNORE where no loss
    truncated: bool


def encode_example(messages: list[Message], template: ChatTemplate, tokenizer, max_len: int) -> Example:
    """Token ids and shifted targets for one conversation, at most `max_len` long.

    Too long: the reply side is cut; if the prompt alone leaves no room, its oldest
    tokens go first so that at least a quarter of the window stays for the reply.
    """
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_trained in render_segments(messages, template):
        seg = [tokenizer.eos_id] if text == "<eos>" else tokenizer.encode(text)
        ids += seg
        trained += [is_trained] * len(seg)
    truncated = len(ids) > max_len + 1
    if truncated:
        first_trained = trained.index(True)
        keep_prompt = min(first_trained, max_len + 1 - max(1, (max_len + 1) // 4))
        start = first_trained - keep_prompt
        ids, trained = ids[start: start + max_len + 1], trained[start: start + max_len + 1]
    labels = [t if m else IGNORE for t, m in zip(ids[1:], trained[1:])]
    return Example(ids[:-1], labels, truncated)


def prompt_ids(messages: list[Message], template: ChatTemplate, tokenizer) -> list[int]:
    """What generation feeds the model: the conversation so far plus the assistant prefix."""
    ids: list[int] = []
    for text, _ in render_segments(messages, template):
        ids += [tokenizer.eos_id] if text == "<eos>" else tokenizer.encode(text)
    return ids + tokenizer.encode(template.assistant_prefix)


# --------------------------------------------------------------------------- local files -> records

def read_records(path: Path, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) pairs from a json (array), jsonl or parquet file; `where` names the line/row."""
    if kind == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise LlmctlError(f"{path} line {n} is not valid JSON ({e.msg}); fix or remove that line") from None
    elif kind == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LlmctlError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); "
                              f"json: expects one array of objects, jsonl: one object per line") from None
        if not isinstance(data, list):
            raise LlmctlError(f"{path} holds a JSON {type(data).__name__}, not an array of records; "
                              f"use jsonl: for one object per line")
        for i, record in enumerate(data):
            yield f"{path} record {i}", record
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise LlmctlError(f"{path} is not a readable parquet file: {str(e).splitlines()[0]}") from None
        for i, record in enumerate(table.to_pylist()):
            yield f"{path} row {i}", record
    else:
        raise ConfigError(f"unknown SFT file kind '{kind}'; use json:, jsonl: or parquet:")


# --------------------------------------------------------------------------- batches

def pad_batch(examples: list[Example], pad_id: int):
    """(x, y) of shape (B, T_max): right-padded, so no real token ever attends to padding
    (attention is causal) and padding positions carry IGNORE targets. One example per row:
    examples never attend to one another."""
    import torch

    T = max(len(e.input_ids) for e in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        x[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        y[row, : len(e.labels)] = torch.tensor(e.labels)
    return x, y


class ExampleBatches:
    """Endless micro-batches of examples drawn by a seeded permutation, epoch after epoch.

    The position (epoch, index into the permutation) and the generator are the whole state,
    so a resumed run draws exactly the batches it would have drawn."""

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int, seed: int):
        import torch

        if not examples:
            raise LlmctlError("no SFT training examples; check sft.datasets")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.index = 0, 0
        self.order = torch.randperm(len(examples), generator=self.generator).tolist()

    def next_batch(self):
        import torch

        chosen = []
        for _ in range(self.batch_size):
            if self.index == len(self.order):
                self.epoch, self.index = self.epoch + 1, 0
                self.order = torch.randperm(len(self.examples), generator=self.generator).tolist()
            chosen.append(self.examples[self.order[self.index]])
            self.index += 1
        return pad_batch(chosen, self.pad_id)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch": self.epoch, "index": self.index,
                "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.epoch, self.index, self.order = int(state["epoch"]), int(state["index"]), list(state["order"])
