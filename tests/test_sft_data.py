"""SFT rendering: every record shape, the loss mask, truncation, templates, bad records."""

from __future__ import annotations

import json

import pytest

from llmctl.data.sft import (IGNORE, ChatTemplate, encode_example, prompt_ids, read_records, render_segments,
                             to_messages)
from llmctl.data.tokenizer import load_tokenizer
from llmctl.errors import LlmctlError


@pytest.fixture(scope="module")
def tok(gpt2_dir):
    return load_tokenizer(str(gpt2_dir))


@pytest.mark.parametrize("record, expected", [
    ({"instruction": "Add 2 and 2.", "input": "", "output": "4"}, [("user", "Add 2 and 2."), ("assistant", "4")]),
    ({"instruction": "Translate.", "input": "Hallo", "output": "Hello"},
     [("user", "Translate.\n\nHallo"), ("assistant", "Hello")]),
    ({"prompt": "Hi?", "completion": "Hello."}, [("user", "Hi?"), ("assistant", "Hello.")]),
    ({"prompt": "Hi?", "response": "Hello."}, [("user", "Hi?"), ("assistant", "Hello.")]),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hey"}]},
     [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hey")]),
    ({"text": "### Human: Why? ### Assistant: Because."}, [("user", "Why?"), ("assistant", "Because.")]),
])
def test_every_shape_parses(record, expected):
    assert to_messages(record) == expected


@pytest.mark.parametrize("record, fragment", [
    ({"instruction": "x"}, "match no known shape"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role 'wizard'"),
    ({"text": "no separator"}, "no '### Assistant:' separator"),
    ({"prompt": "x", "completion": ""}, "no assistant reply"),
    (["not", "an", "object"], "must be a JSON object"),
])
def test_malformed_records_say_what_is_wrong(record, fragment):
    with pytest.raises(ValueError, match=fragment):
        to_messages(record)


def test_mask_covers_exactly_the_reply_and_eos(tok):
    template = ChatTemplate()
    messages = [("user", "What is the capital of France?"), ("assistant", "Paris is the capital.")]
    ex = encode_example(messages, template, tok, max_len=256)
    full = ex.input_ids + [ex.labels[-1]]
    reply_ids = tok.encode(" Paris is the capital.") + [tok.eos_id]
    trained = [label for label in ex.labels if label != IGNORE]
    assert trained == reply_ids
    n_prompt = len(tok.encode("### Human: What is the capital of France?\n")) + len(tok.encode("### Assistant:"))
    # targets of positions 0 .. n_prompt-2 are prompt tokens: all ignored; the rest all count
    assert all(label == IGNORE for label in ex.labels[: n_prompt - 1])
    assert all(label != IGNORE for label in ex.labels[n_prompt - 1:])
    assert full[-len(reply_ids):] == reply_ids
    # generation encodes the prompt exactly as training saw it
    assert ex.input_ids[:n_prompt] == prompt_ids(messages[:1], template, tok)


def test_multi_turn_trains_every_assistant_turn(tok):
    messages = [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    ex = encode_example(messages, ChatTemplate(), tok, max_len=256)
    trained = [label for label in ex.labels if label != IGNORE]
    assert trained == tok.encode(" b") + [tok.eos_id] + tok.encode(" d") + [tok.eos_id]


def test_long_examples_are_truncated_on_the_reply_side_not_dropped(tok):
    messages = [("user", "short question"), ("assistant", "word " * 500)]
    ex = encode_example(messages, ChatTemplate(), tok, max_len=64)
    assert ex.truncated and len(ex.input_ids) == len(ex.labels) == 64
    assert ex.input_ids[:5] == tok.encode("### Human: short question\n")[:5]  # prompt kept whole
    long_prompt = [("user", "context " * 500), ("assistant", "the answer")]
    ex = encode_example(long_prompt, ChatTemplate(), tok, max_len=64)
    assert ex.truncated and any(label != IGNORE for label in ex.labels)


def test_template_round_trip_and_jinja_matches(tok):
    template = ChatTemplate(user="<user>{content}</user>")
    assert ChatTemplate.from_state(template.to_state()) == template
    from jinja2 import Template

    messages = [("user", "Hi"), ("assistant", "Hello")]
    rendered = Template(ChatTemplate().to_jinja("<|endoftext|>")).render(
        messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=False)
    expected = "".join("<|endoftext|>" if t == "<eos>" else t for t, _ in render_segments(messages, ChatTemplate()))
    assert rendered == expected + "\n"


def test_dolly_file_reads_with_line_numbers(tmp_path):
    from conftest import shared_file

    dolly = shared_file("sft/dolly_open_qa.jsonl")
    records = list(read_records(dolly, "jsonl"))
    assert len(records) == 3742 and records[0][0].endswith(":1")
    assert all(to_messages(r)[1][0] == "assistant" for _, r in records[:50])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{broken\n')
    with pytest.raises(LlmctlError, match="line 2 is not valid JSON"):
        list(read_records(bad, "jsonl"))
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"instruction": "i", "output": "o"}]))
    assert [r for _, r in read_records(arr, "json")] == [{"instruction": "i", "output": "o"}]
