"""The chat template: how a conversation becomes token ids, for training and for generation alike.

A `ChatTemplate` renders messages (role, content) into segments of text, each marked as
trained or not: everything a user or system wrote, and the assistant prefix, carries no
loss; each assistant reply and the end-of-text token after it do. Segments are tokenized one
by one, so the mask is exact at every boundary, and generation encodes a prompt the same way
(`prompt_ids`), so training and generation cannot drift apart. The template is a plain dict
in the checkpoint; `to_jinja()` gives the same format as a transformers chat template.
Tokenizing many conversations is batched (`encode_examples`), about a second for 15k.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from llmctl.cross_entropy import IGNORE_INDEX
from llmctl.data.batches import Example

ROLES = ("system", "user", "assistant")
Message = tuple[str, str]  # (role, content), role one of ROLES


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
            f"{json.dumps(eos_token)} }}}}{{% if not loop.last %}}{{{{ {json.dumps(self.after_assistant)} }}}}"
            f"{{% endif %}}{{% endif %}}"
            "{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {json.dumps(self.assistant_prefix)} }}}}{{% endif %}}"
        )


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


def encode_example(messages: list[Message], template: ChatTemplate, tokenizer, max_len: int) -> Example:
    """Token ids and shifted targets for one conversation, at most `max_len` long.

    Too long: the reply side is cut; if the prompt alone leaves no room, its oldest
    tokens go first so that at least a quarter of the window stays for the reply.
    """
    pieces = [([tokenizer.eos_id] if text == "<eos>" else tokenizer.encode(text), trained)
              for text, trained in render_segments(messages, template)]
    return _assemble(pieces, max_len)


def encode_examples(conversations: list[list[Message]], template: ChatTemplate, tokenizer,
                    max_len: int) -> list[Example]:
    """`encode_example` for many conversations, with one batched tokenizer call over the
    distinct segment texts (the template's fixed parts repeat in every example)."""
    rendered = [render_segments(messages, template) for messages in conversations]
    texts = sorted({text for segments in rendered for text, _ in segments if text != "<eos>"})
    ids_of = dict(zip(texts, tokenizer.encode_batch(texts))) if texts else {}
    return [_assemble([([tokenizer.eos_id] if text == "<eos>" else ids_of[text], trained)
                       for text, trained in segments], max_len) for segments in rendered]


def _assemble(pieces: list[tuple[list[int], bool]], max_len: int) -> Example:
    """Encoded segments (ids, trained) -> one Example, truncated as encode_example describes."""
    ids: list[int] = []
    trained: list[bool] = []
    for seg, is_trained in pieces:
        ids += seg
        trained += [is_trained] * len(seg)
    truncated = len(ids) > max_len + 1
    if truncated:
        first_trained = trained.index(True)
        keep_prompt = min(first_trained, max_len + 1 - max(1, (max_len + 1) // 4))
        start = first_trained - keep_prompt
        ids, trained = ids[start: start + max_len + 1], trained[start: start + max_len + 1]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], trained[1:])]
    return Example(ids[:-1], labels, truncated)


def prompt_ids(messages: list[Message], template: ChatTemplate, tokenizer) -> list[int]:
    """What generation feeds the model: the conversation so far plus the assistant prefix."""
    ids: list[int] = []
    for text, _ in render_segments(messages, template):
        ids += [tokenizer.eos_id] if text == "<eos>" else tokenizer.encode(text)
    return ids + tokenizer.encode(template.assistant_prefix)
