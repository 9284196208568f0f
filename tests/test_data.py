"""Data: specs, documents, held-out splits, the cached token store, and batches."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from llmctl.config import DataConfig
from llmctl.data.batches import RandomWindows
from llmctl.data.holdout import tail_cut
from llmctl.data.sources import iter_documents, parse_spec
from llmctl.data.store import prepare_store
from llmctl.data.tokenizer import TextTokenizer, load_tokenizer
from llmctl.errors import ConfigError, LlmctlError


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> TextTokenizer:
    return load_tokenizer(str(gpt2_dir))


def test_gpt2_tokenizer_loads_from_folder(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eos_id == 50256 and gpt2.vocab_size == 50257
    assert TextTokenizer.from_state(gpt2.to_state()).encode("Hello world") == [15496, 995]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ConfigError, match="is not a folder"):
        load_tokenizer(str(tmp_path / "nope" / "deeper"))


def test_parse_spec():
    assert parse_spec("wikitext-2-raw-v1").kind == "hub"
    s = parse_spec("text:data/*.txt:100")
    assert (s.kind, s.target, s.cap) == ("text", "data/*.txt", 100)
    assert parse_spec("hf:org/name").target == "org/name"
    for bad, msg in [("wikitext", "unknown data source"), ("text:", "names no files"),
                     ("text:a.txt:0", "must be a positive"), ("", "empty data spec")]:
        with pytest.raises(ConfigError, match=msg):
            parse_spec(bad)


def test_text_documents_skip_blank_lines_and_respect_caps(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first para\nline two\n\n   \n\nsecond\n \nthird\n")
    assert list(iter_documents(parse_spec(f"text:{f}"))) == ["first para\nline two", "second", "third"]
    assert list(iter_documents(parse_spec(f"text:{f}:2"))) == ["first para\nline two", "second"]
    assert list(iter_documents(parse_spec(f"text:{f}"), "validation")) == []
    with pytest.raises(ConfigError, match="matches no files"):
        list(iter_documents(parse_spec(f"text:{tmp_path}/*.md")))


def test_hold_out_by_documents_or_by_stream():
    lengths = np.full(40, 10)  # 40 documents of 10 tokens, read from the last one backwards
    assert tail_cut(iter([lengths[::-1]]), 400, 40, 0.05) == (380, 2)  # the last 2 documents
    assert tail_cut(iter([np.array([1000])]), 1000, 1, 0.1) == (900, None)  # one document: a stream cut


def test_store_counts_match_direct_tokenization_and_is_reused(tmp_path, gpt2, wikitext_valid):
    text = tmp_path / "wiki.txt"
    text.write_text(wikitext_valid.read_text()[:200_000])
    cfg = DataConfig(datasets=[f"text:{text}"], tokenizer="gpt2", cache_dir=str(tmp_path / "cache"))
    store = prepare_store(cfg, gpt2)
    docs = list(iter_documents(parse_spec(f"text:{text}")))
    direct = sum(len(ids) + 1 for ids in gpt2.encode_batch(docs))
    assert store.meta["tokens"]["train"] + store.meta["tokens"]["validation"] == direct
    assert len(store.tokens("train")) + len(store.tokens("validation")) == direct
    assert store.meta["sources"][0]["train"]["documents"] + store.meta["sources"][0]["validation"]["documents"] == len(docs)
    assert store.tokens("train").dtype == np.uint16
    first_doc = gpt2.encode(docs[0]) + [gpt2.eos_id]
    assert store.tokens("train")[: len(first_doc)].tolist() == first_doc
    mtime = os.stat(store.path / "manifest.json").st_mtime_ns
    time.sleep(0.01)
    again = prepare_store(cfg, gpt2)
    assert again.path == store.path and os.stat(again.path / "manifest.json").st_mtime_ns == mtime
    # a changed source gives a new store, never a stale one
    text.write_text(text.read_text() + "\n\nOne more paragraph.\n")
    assert prepare_store(cfg, gpt2).path != store.path


def test_bad_sources_leave_no_cache(tmp_path, gpt2):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    cache = tmp_path / "cache"
    with pytest.raises(LlmctlError, match="yielded no text"):
        prepare_store(DataConfig(datasets=[f"text:{empty}"], cache_dir=str(cache)), gpt2)
    assert not any(cache.iterdir())


def test_hub_unreachable_fails_fast(monkeypatch, gpt2, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(LlmctlError, match=r"which cannot be reached \(http://127.0.0.1:9\).*\n"
                                          r"  dataset 'wikitext-2-raw-v1': use local text"):
        prepare_store(DataConfig(datasets=["wikitext-2-raw-v1"], cache_dir=str(tmp_path)), gpt2)
    with pytest.raises(LlmctlError, match="(?s)which cannot be reached.*tokenizer 'some-org/some-tokenizer'"):
        load_tokenizer("some-org/some-tokenizer")
    assert time.monotonic() - start < 15


def test_random_windows_are_seeded_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a = RandomWindows(tokens, seq_len=8, batch_size=4, seed=7)
    b = RandomWindows(tokens, seq_len=8, batch_size=4, seed=7)
    x, y = a.next_batch()
    assert x.shape == (4, 8) and torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x, b.next_batch()[0])
    state = a.state_dict()
    nxt = a.next_batch()[0]
    b.load_state_dict(state)
    assert torch.equal(b.next_batch()[0], nxt)
