"""Continuous batching (llmctl/batching.py): requests decoded together give what `complete` gives
alone, token for token (greedy, fp32) and seed for seed, whether they arrive together or join a
running batch; cancelling frees a row, the queue is bounded, over-window prompts are refused,
stop strings and chat templates behave as in `complete`, and window-reading models decode
per stream under the same scheduler."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from llmctl.batching import BatchGenerator, QueueFull, batch_generate
from llmctl.config import ModelConfig
from llmctl.errors import ConfigError, LlmctlError
from llmctl.generate import Sampling, chat_prompt, complete, generate_text
from llmctl.inference import BatchKVCache
from llmctl.loading import LoadedModel
from llmctl.model import Transformer

PROMPTS = ["First Citizen:", "Before we proceed any further, hear me speak.", "O",
           "You are all resolved rather to die than to famish?", "Speak, speak."]
CONTEXT = 96


def tiny_loaded(tokenizer, seed: int = 0, **overrides) -> LoadedModel:
    cfg = ModelConfig(**{**dict(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                max_seq_len=CONTEXT, pad_vocab_multiple=64, init_std=0.3), **overrides})
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            if block.attn.sinks is not None:
                block.attn.sinks.normal_()  # sinks that matter, not the zero init
    return LoadedModel(model, tokenizer, CONTEXT, "memory", None, None, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def tok(small_tok):
    from llmctl.data.tokenizer import load_tokenizer

    return load_tokenizer(str(small_tok))


@pytest.fixture(scope="module")
def loaded(tok):
    return tiny_loaded(tok)


def record_batches(monkeypatch, loaded: LoadedModel, gate: threading.Semaphore | None = None) -> list[int]:
    """Rows of every batched decode forward (prefills are not counted); with a gate, every
    forward first takes a permit from it."""
    sizes: list[int] = []
    original = loaded.model.hidden

    def hidden(idx, cache=None):
        if gate is not None:
            assert gate.acquire(timeout=30), "the test never released the forward"
        if isinstance(cache, BatchKVCache):
            sizes.append(idx.size(0))
        return original(idx, cache)

    monkeypatch.setattr(loaded.model, "hidden", hidden)
    return sizes


def reference(loaded, prompts, **sampling):
    return [complete(loaded, p, **sampling) for p in prompts]


@pytest.mark.parametrize("overrides", [{}, {"use_attention_sinks": True, "attention_block": 16, "n_kv_heads": 4}],
                         ids=["plain", "sinks+blocks"])
def test_greedy_batch_equals_one_at_a_time_for_prompts_arriving_together(tok, monkeypatch, overrides):
    loaded = tiny_loaded(tok, seed=1, **overrides)
    expected = reference(loaded, PROMPTS, max_new_tokens=30, temperature=0)
    assert len({tuple(c.token_ids) for c in expected}) == len(PROMPTS)  # varied, not one echo
    sizes = record_batches(monkeypatch, loaded)
    got = batch_generate(loaded, PROMPTS, max_new_tokens=30, temperature=0)
    for want, have in zip(expected, got):
        assert have.token_ids == want.token_ids and have.text == want.text
        assert have.finish_reason == want.finish_reason and have.prompt_tokens == want.prompt_tokens
    assert max(sizes) == len(PROMPTS)  # all decoded in one forward per step
    assert len(sizes) <= 30  # one batched forward per step, not one per request


def test_requests_joining_a_running_batch_match_too(loaded, monkeypatch):
    expected = reference(loaded, PROMPTS, max_new_tokens=25, temperature=0)
    gate = threading.Semaphore(0)
    sizes = record_batches(monkeypatch, loaded, gate)
    greedy = Sampling(max_new_tokens=25, temperature=0)
    with BatchGenerator(loaded, max_batch=8) as engine:
        first = [engine.submit(chat_prompt(loaded, PROMPTS[0])[0], greedy)]
        while engine.waiting:  # admitted: its prefill waits at the gate
            time.sleep(0.001)
        first.append(engine.submit(chat_prompt(loaded, PROMPTS[1])[0], greedy))
        gate.release(1 + 1 + 1 + 5)  # prefill, a step alone, the second's prefill, 5 steps together
        while len(sizes) < 6:
            time.sleep(0.001)
        later = [engine.submit(chat_prompt(loaded, p)[0], greedy) for p in PROMPTS[2:]]
        gate.release(10_000)
        streams = first + later
        texts = [s.text(timeout=30) for s in streams]
    for want, stream, text in zip(expected, streams, texts):
        assert stream.token_ids == want.token_ids and text == want.text
    assert sizes[:6] == [1, 2, 2, 2, 2, 2] and max(sizes) == 5  # joined one by one, then all five together


def test_seeds_give_completes_text_whatever_else_shares_the_batch(loaded):
    settings = [dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=20), dict(temperature=0),
                dict(temperature=1.2, top_p=0.8, repetition_penalty=1.3), dict(temperature=1.0, top_p=0.9)]
    expected = [complete(loaded, p, max_new_tokens=20, seed=40 + i, **s)
                for i, (p, s) in enumerate(zip(PROMPTS, settings))]
    with BatchGenerator(loaded) as engine:
        streams = [engine.submit(chat_prompt(loaded, p)[0], Sampling(max_new_tokens=20, seed=40 + i, **s))
                   for i, (p, s) in enumerate(zip(PROMPTS, settings))]
        for want, stream in zip(expected, streams):
            assert "".join(stream) == want.text and stream.token_ids == want.token_ids
    assert [s.seed for s in streams] == [40, 41, 42, 43, 44]
    # batch_generate numbers seeds as `llmctl generate` numbers samples: prompt i gets seed + i
    batched = batch_generate(loaded, PROMPTS[:3], max_new_tokens=15, temperature=1.0, seed=9)
    assert [c.text for c in batched] == [complete(loaded, p, max_new_tokens=15, temperature=1.0, seed=9 + i).text
                                         for i, p in enumerate(PROMPTS[:3])]


def test_deltas_are_exactly_completes_on_text_sync_and_async(loaded):
    seen: list[str] = []
    want = complete(loaded, PROMPTS[1], on_text=seen.append, max_new_tokens=30, temperature=1.0, top_p=1.0, seed=5)
    sampling = Sampling(max_new_tokens=30, temperature=1.0, top_p=1.0, seed=5)
    ids = chat_prompt(loaded, PROMPTS[1])[0]

    async def consume() -> tuple[list[str], int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:  # the loop keeps running while the stream is read
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        with BatchGenerator(loaded) as engine:
            stream = engine.submit(ids, sampling)
            deltas = [d async for d in stream]
        done.set()
        await task
        return deltas, ticks

    deltas, ticks = asyncio.run(consume())
    assert deltas == seen and ticks > 1
    with BatchGenerator(loaded) as engine:
        stream = engine.submit(ids, sampling)
        assert list(stream) == seen and stream.text() == want.text and list(stream) == seen  # re-readable
        assert (stream.prompt_tokens, stream.completion_tokens, stream.finish_reason) == (len(ids), 30, "length")


def test_cancel_frees_the_row_for_a_waiting_request_and_the_queue_is_bounded(loaded, monkeypatch):
    expected = complete(loaded, PROMPTS[2], max_new_tokens=20, temperature=0)
    gate = threading.Semaphore(0)
    record_batches(monkeypatch, loaded, gate)
    engine = BatchGenerator(loaded, max_batch=1, max_waiting=1)
    greedy = Sampling(max_new_tokens=40, temperature=0)
    a = engine.submit(chat_prompt(loaded, PROMPTS[0])[0], greedy)
    gate.release(1)  # a's prefill
    while a.first_token_at is None:
        time.sleep(0.001)
    assert (engine.active, engine.waiting) == (1, 0)
    b = engine.submit(chat_prompt(loaded, PROMPTS[2])[0], Sampling(max_new_tokens=20, temperature=0))
    assert (engine.active, engine.waiting) == (1, 1)
    with pytest.raises(QueueFull, match="1 requests are already waiting"):
        engine.submit(chat_prompt(loaded, PROMPTS[0])[0], greedy)
    a.cancel()
    gate.release(2)  # a's step already under way, then the next one: a leaves, b's prefill takes its row
    while b.first_token_at is None:
        time.sleep(0.001)
    assert a.done and a.finish_reason == "cancelled" and a.completion_tokens == 2
    assert (engine.active, engine.waiting) == (1, 0)
    c = engine.submit(chat_prompt(loaded, PROMPTS[0])[0], greedy)
    assert engine.waiting == 1
    c.cancel()  # a waiting request leaves the queue at once
    assert c.done and c.finish_reason == "cancelled" and c.text() == "" and engine.waiting == 0
    gate.release(10_000)
    assert b.text(timeout=30) == expected.text and b.finish_reason == "length"
    d = engine.submit(chat_prompt(loaded, PROMPTS[0])[0], greedy)
    engine.close()  # cancels what is left
    assert d.done and d.finish_reason in ("cancelled", "length")
    with pytest.raises(LlmctlError, match="closed"):
        engine.submit([1, 2], greedy)


def test_submit_refuses_what_does_not_fit_the_window(loaded):
    with BatchGenerator(loaded) as engine:
        with pytest.raises(ConfigError, match="90 tokens and max_new_tokens 7 make 97, past the model's context of 96"):
            engine.submit([5] * 90, Sampling(max_new_tokens=7))
        with pytest.raises(ConfigError, match="empty"):
            engine.submit([], Sampling())
        with pytest.raises(ConfigError, match="outside the vocabulary"):
            engine.submit([1, loaded.tokenizer.vocab_size + 100], Sampling(max_new_tokens=2))
        fits = engine.submit([5] * 90, Sampling(max_new_tokens=6, temperature=0))  # 96: exactly the window
        fits.text(timeout=30)
        assert fits.completion_tokens <= 6 and fits.finish_reason in ("stop", "length")
    with pytest.raises(ConfigError, match="prompt 1: .*past the model's context"):
        batch_generate(loaded, ["a", "b " * 120], max_new_tokens=4)
    with pytest.raises(ConfigError, match="unknown sampling option"):
        batch_generate(loaded, ["a"], max_new=4)


def test_stop_strings_cut_as_in_complete(loaded):
    free = generate_text(loaded, PROMPTS[4], max_new_tokens=30, temperature=0)
    stop = next(free[i: i + 2] for i in range(len(free) // 3, len(free)) if free[i: i + 2].isprintable())
    want = complete(loaded, PROMPTS[4], max_new_tokens=30, temperature=0, stop=[stop])
    assert want.finish_reason == "stop" and stop not in want.text
    got = batch_generate(loaded, [PROMPTS[4], PROMPTS[0]], max_new_tokens=30, temperature=0, stop=[stop])
    assert got[0].text == want.text and got[0].finish_reason == "stop"
    with BatchGenerator(loaded) as engine:
        stream = engine.submit(chat_prompt(loaded, PROMPTS[4])[0], Sampling(max_new_tokens=30, temperature=0,
                                                                            stop=(stop,)))
        assert "".join(stream) == want.text and stream.finish_reason == "stop"


def test_chat_template_reply_is_rendered_stripped_and_stopped_as_in_complete(tok):
    from llmctl.data.chat_template import ChatTemplate

    loaded = tiny_loaded(tok, seed=2)
    loaded.template = ChatTemplate().to_state()
    expected = reference(loaded, PROMPTS[:3], max_new_tokens=20, temperature=0)
    got = batch_generate(loaded, PROMPTS[:3], max_new_tokens=20, temperature=0)
    assert [c.text for c in got] == [c.text for c in expected]
    assert all(c.templated and c.prompt_tokens == e.prompt_tokens for c, e in zip(got, expected))
    # The server's way in: ids rendered by chat_prompt, the template passed along.
    ids, template = chat_prompt(loaded, PROMPTS[0])
    with BatchGenerator(loaded) as engine:
        assert engine.submit(ids, Sampling(max_new_tokens=20, temperature=0), template=template).text() \
            == expected[0].text


def test_copy_pointer_and_transformers_models_decode_per_stream_exactly(tok):
    pointer = tiny_loaded(tok, seed=3, copy_pointer=True)
    expected = reference(pointer, PROMPTS, max_new_tokens=15, temperature=0)
    with BatchGenerator(pointer) as engine:
        assert not engine.batched
        streams = [engine.submit(chat_prompt(pointer, p)[0], Sampling(max_new_tokens=15, temperature=0))
                   for p in PROMPTS]
        assert [s.text() for s in streams] == [c.text for c in expected]

    from transformers import LlamaConfig, LlamaForCausalLM

    from llmctl.loading import TransformersLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=CONTEXT, initializer_range=0.3)).eval()
    loaded = LoadedModel(TransformersLM(hf), tok, CONTEXT, "hf", None, None, torch.device("cpu"), torch.float32)
    cached = complete(loaded, PROMPTS[1], max_new_tokens=12, temperature=0)
    # A transformers model re-runs its context each step, with or without use_cache.
    assert cached.token_ids == complete(loaded, PROMPTS[1], max_new_tokens=12, temperature=0, use_cache=False).token_ids
    got = batch_generate(loaded, PROMPTS[:3], max_new_tokens=12, temperature=0)
    assert got[1].token_ids == cached.token_ids
    assert [c.text for c in got] == [complete(loaded, p, max_new_tokens=12, temperature=0).text for p in PROMPTS[:3]]


def test_a_failing_step_fails_its_streams_and_the_engine_goes_on(loaded, monkeypatch):
    original = loaded.model.hidden
    calls = {"n": 0}

    def hidden(idx, cache=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return original(idx, cache)

    monkeypatch.setattr(loaded.model, "hidden", hidden)
    with BatchGenerator(loaded) as engine:
        broken = engine.submit([1, 2, 3], Sampling(max_new_tokens=10, temperature=0))
        with pytest.raises(LlmctlError, match="generation failed: RuntimeError: out of memory"):
            broken.text(timeout=30)
        assert broken.finish_reason == "error"
        fine = engine.submit(chat_prompt(loaded, PROMPTS[0])[0], Sampling(max_new_tokens=10, temperature=0))
        monkeypatch.setattr(loaded.model, "hidden", original)
        assert fine.text(timeout=30) == complete(loaded, PROMPTS[0], max_new_tokens=10, temperature=0).text
