"""SFT rendering: every record shape, the loss mask, truncation, templates, bad records."""

from __future__ import annotations

import json

import pytest

from llmctl.cross_entropy import IGNORE_INDEX
from llmctl.data.batches import Example, ExampleBatches, pad_batch
from llmctl.data.chat_template import ChatTemplate, encode_example, encode_examples, prompt_ids, render_segments
from llmctl.data.readers import read_records
from llmctl.data.sft import held_out_indices, to_messages
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
    trained = [label for label in ex.labels if label != IGNORE_INDEX]
    assert trained == reply_ids
    n_prompt = len(tok.encode("### Human: What is the capital of France?\n")) + len(tok.encode("### Assistant:"))
    # targets of positions 0 .. n_prompt-2 are prompt tokens: all ignored; the rest all count
    assert all(label == IGNORE_INDEX for label in ex.labels[: n_prompt - 1])
    assert all(label != IGNORE_INDEX for label in ex.labels[n_prompt - 1:])
    assert full[-len(reply_ids):] == reply_ids
    # generation encodes the prompt exactly as training saw it
    assert ex.input_ids[:n_prompt] == prompt_ids(messages[:1], template, tok)


def test_multi_turn_trains_every_assistant_turn(tok):
    messages = [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    ex = encode_example(messages, ChatTemplate(), tok, max_len=256)
    trained = [label for label in ex.labels if label != IGNORE_INDEX]
    assert trained == tok.encode(" b") + [tok.eos_id] + tok.encode(" d") + [tok.eos_id]


def test_long_examples_are_truncated_on_the_reply_side_not_dropped(tok):
    messages = [("user", "short question"), ("assistant", "word " * 500)]
    ex = encode_example(messages, ChatTemplate(), tok, max_len=64)
    assert ex.truncated and len(ex.input_ids) == len(ex.labels) == 64
    assert ex.input_ids[:5] == tok.encode("### Human: short question\n")[:5]  # prompt kept whole
    long_prompt = [("user", "context " * 500), ("assistant", "the answer")]
    ex = encode_example(long_prompt, ChatTemplate(), tok, max_len=64)
    assert ex.truncated and any(label != IGNORE_INDEX for label in ex.labels)


def test_template_round_trip_and_jinja_matches(tok):
    template = ChatTemplate(user="<user>{content}</user>")
    assert ChatTemplate.from_state(template.to_state()) == template
    from jinja2 import Template

    messages = [("user", "Hi"), ("assistant", "Hello")]
    rendered = Template(ChatTemplate().to_jinja("<|endoftext|>")).render(
        messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=False)
    expected = "".join("<|endoftext|>" if t == "<eos>" else t for t, _ in render_segments(messages, ChatTemplate()))
    assert rendered == expected


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


@pytest.mark.parametrize("record, expected", [
    ({"instruction": "Name a city.", "context": "In France.", "response": "Paris", "category": "open_qa"},
     [("user", "Name a city.\n\nIn France."), ("assistant", "Paris")]),  # Dolly on the Hub
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]},
     [("user", "Hi"), ("assistant", "Hey")]),  # ShareGPT
    ({"question": "Why?", "answer": "Because."}, [("user", "Why?"), ("assistant", "Because.")]),
    ({"input": "2+2", "output": "4"}, [("user", "2+2"), ("assistant", "4")]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                   {"role": "assistant", "content": "Hey"}]}, [("user", "Hi there"), ("assistant", "Hey")]),
    ({"text": "Be kind. ### Human: a ### Assistant: b ### Human: c ### Assistant: d"},
     [("system", "Be kind."), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]),
])
def test_more_shapes_parse(record, expected):
    assert to_messages(record) == expected


def test_padded_batch_ignores_prompt_and_padding_targets_and_counts_every_reply_token(tok):
    """The rendered mask end to end: in (x, y) every target of a prompt or padding position is
    IGNORE_INDEX, every reply token and its end-of-text is a target, nothing else."""
    convs = [[("user", "What is 2 + 2?"), ("assistant", "Four.")],
             [("system", "Be brief."), ("user", "Name a colour."), ("assistant", "Blue, or perhaps green.")]]
    examples = encode_examples(convs, ChatTemplate(), tok, max_len=256)
    assert examples == [encode_example(c, ChatTemplate(), tok, 256) for c in convs]  # batched = one by one
    x, y = pad_batch(examples, pad_id=tok.eos_id)
    for row, (conv, ex) in enumerate(zip(convs, examples)):
        prompt = prompt_ids(conv[:-1], ChatTemplate(), tok)
        reply = tok.encode(" " + conv[-1][1]) + [tok.eos_id]
        n = len(ex.input_ids)
        assert x[row, :n].tolist() == prompt + reply[:-1]
        assert y[row, : len(prompt) - 1].eq(IGNORE_INDEX).all()  # targets inside the prompt
        assert y[row, len(prompt) - 1: n].tolist() == reply  # every reply token counts
        assert y[row, n:].eq(IGNORE_INDEX).all() and x[row, n:].eq(tok.eos_id).all()  # padding
    assert int((y != IGNORE_INDEX).sum()) == sum(len(tok.encode(" " + c[-1][1])) + 1 for c in convs)


def test_example_batches_resume_exactly():
    examples = [Example([i, i + 1], [IGNORE_INDEX, i + 2], False) for i in range(7)]
    a = ExampleBatches(examples, 3, 0, seed=5)
    for _ in range(4):  # into the second epoch
        a.next_batch()
    b = ExampleBatches(examples, 3, 0, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert xa.equal(xb) and ya.equal(yb)


def test_held_out_split_is_fixed_and_disjoint():
    assert held_out_indices(400, 0.05) == held_out_indices(400, 0.05) and len(held_out_indices(400, 0.05)) == 20
    assert held_out_indices(1, 0.05) == set() and len(held_out_indices(3, 0.05)) == 1
