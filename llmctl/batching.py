"""Continuous batching: many generations decoded together, one forward per step (`llmctl serve`).

`BatchGenerator` owns one background decode thread, the only thread that runs the model.
Requests are `submit`ted from any thread (or an asyncio event loop) and come back as a
`Stream` of text deltas. Each step of the decode thread:

1. admits waiting requests while fewer than `max_batch` are active: each prompt is prefilled
   in a forward of its own (batch 1) straight into a free row of a `BatchKVCache`
   (`llmctl.inference`), and its first token is sampled at once;
2. runs ONE batched forward of every active row's last token, each row at its own position
   (per-row RoPE angles and a (B, 1, 1, S) mask over the rows' slots);
3. samples each row's next token, passes it through the row's text pipeline, and drops rows
   that finished (end of text, a stop string, max_new_tokens) or were cancelled; the last
   row moves into the freed one, so the active rows are always 0..n-1 and a waiting request
   joins at the next step.

Requests never go past the model's window (`submit` refuses prompt + max_new_tokens over
`context_length`), so the batched path never slides. Sampling is `llmctl.generate`'s, per
request: repetition penalty, temperature, top-k and top-p as `next_token` applies them (rows
with the same settings are filtered together, which gives each row what it gives alone), then
one draw per row from the request's own CPU `torch.Generator` seeded as `complete` seeds it,
so a seed gives the same text as `llmctl generate --seed` (up to the rounding of a batched
matmul, which only matters at exact ties). Text is released by generate's `IncrementalDecoder`,
`StopFilter` and `LeadStrip`, so a stream yields exactly the deltas `complete`'s `on_text` gets.

What is batched: llmctl Transformers, with or without attention sinks and block-local
attention (both live in the mask) — every preset but cpu-10m. Where inference reads the
window itself — a copy pointer (`model.copy_pointer`), or counts mixed in by
`Sampling.counts` — and for transformers models, each request keeps its own
`llmctl.inference.Generation` (its KV cache, ring and counts) and the same scheduler feeds
it one token per step, after the batched forward: concurrent and exact, one forward per such
request per step instead of a shared one.

Thread-safety: the model runs only on the decode thread, under `torch.inference_mode` and
autocast to `loaded.dtype` (as `token_stream`). Streams can be read from any thread
(`for delta in stream`, `stream.text()`) or from asyncio (`async for delta in stream`, which
never blocks the event loop: the decode thread wakes it with `call_soon_threadsafe`).
A task cancelled while awaiting `async for` cancels its stream; otherwise call `cancel()`
when nobody reads a stream any more (a client that went away), which frees its row at the
next step.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

import torch

from llmctl.config import ModelConfig
from llmctl.errors import ConfigError, LlmctlError
from llmctl.generate import (Completion, IncrementalDecoder, Sampling, _as_loaded,
                             apply_repetition_penalty, chat_prompt, filter_logits, next_token, sampled_counts,
                             text_filters)
from llmctl.inference import BatchKVCache, Generation

if TYPE_CHECKING:
    from llmctl.data.chat_template import ChatTemplate
    from llmctl.loading import LoadedModel
    from llmctl.ngram import CountMixture

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class QueueFull(LlmctlError):
    """`submit` found `max_waiting` requests already waiting for a row: try again later (HTTP 429)."""


class Stream:
    """One request: its text deltas as they are produced, and how it ended.

    Read it once or many times, from any thread (`for delta in stream`, `text()`) or from
    asyncio (`async for delta in stream`); every reader gets every delta from the start.
    Iterating after a failure raises `LlmctlError` once the deltas produced before it are out."""

    def __init__(self, engine: "BatchGenerator", prompt_ids: list[int], sampling: Sampling, seed: int,
                 template: "ChatTemplate | None", counts: "CountMixture | None"):
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.seed = seed
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None  # "stop" (end of text or a stop string), "length", "cancelled", "error"
        self.eos = False  # the model ended the text itself (finish_reason "stop")
        self.error: BaseException | None = None
        self.templated = template is not None
        self._visible = False  # the text holds more than whitespace (before that a reply may not end)
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None  # perf_counter when the first token was sampled
        self.finished_at: float | None = None
        # Decode-thread state.
        self._engine = engine
        self._counts = counts
        self._generator = torch.Generator().manual_seed(seed)
        self._decoder = IncrementalDecoder(engine.loaded.tokenizer, prompt_ids)
        self._stops, self._lead = text_filters(sampling.stop, template)
        self._history: torch.Tensor | None = None  # (1, prompt + new) ids, for the repetition penalty
        self._last = 0  # the token the next step feeds
        self._generation: Generation | None = None  # its own state when it is not batched
        self._cancel = False
        # Reader side.
        self._cond = threading.Condition()
        self._chunks: list[str] = []
        self._done = False
        self._wakers: set[Callable[[], None]] = set()

    # ------------------------------------------------------------------ readers

    @property
    def done(self) -> bool:
        return self._done

    def __iter__(self) -> Iterator[str]:
        read = 0
        while True:
            with self._cond:
                while read == len(self._chunks) and not self._done:
                    self._cond.wait()
                chunks, done = self._chunks[read:], self._done
            read += len(chunks)
            yield from chunks
            if done:
                break
        self._raise_error()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:  # called on the decode thread
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        with self._cond:
            self._wakers.add(wake)
        read = 0
        try:
            while True:
                event.clear()  # before looking, so a delta published after the look sets it again
                with self._cond:
                    chunks, done = self._chunks[read:], self._done
                read += len(chunks)
                for chunk in chunks:
                    yield chunk
                if done:
                    break
                if not chunks:
                    await event.wait()
        except asyncio.CancelledError:
            self.cancel()  # the task reading it is gone
            raise
        finally:
            with self._cond:
                self._wakers.discard(wake)
        self._raise_error()

    def text(self, timeout: float | None = None) -> str:
        """Block until the stream is over; the whole text (the deltas joined)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"the stream is still running after {timeout} s")
            text = "".join(self._chunks)
        self._raise_error()
        return text

    def cancel(self) -> None:
        """Stop generating: a waiting request leaves the queue now, an active one frees its
        row at the next step (finish_reason "cancelled"; the text so far stays readable)."""
        self._engine._cancel(self)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise LlmctlError(f"generation failed: {type(self.error).__name__}: {self.error}") from self.error

    # ------------------------------------------------------------------ decode thread

    def _publish(self, text: str) -> None:
        with self._cond:
            self._chunks.append(text)
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._cond:
            if self._done:
                return
            self.eos = reason == "eos"
            self.finish_reason = "stop" if reason == "eos" else reason
            self.error = error
            self.finished_at = time.perf_counter()
            self._done = True
            self._generation = None
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def _emit(self, text: str) -> None:
        self._visible = self._visible or bool(text.strip())
        text = self._lead.feed(text)
        if text:
            self._publish(text)

    def _may_end(self) -> bool:
        """As in `complete`: a chat reply is never empty, so no end-of-text before visible text."""
        return not self.templated or self._visible

    def _take(self, token: int) -> bool:
        """The token sampled next (as `complete` handles it); True when the stream is over."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token == self._engine.eos_id:
            self._end_text("eos")
            return True
        self.token_ids.append(token)
        self.completion_tokens += 1
        self._emit(self._stops.feed(self._decoder.push(token)))
        if self._stops.stopped:
            self._finish("stop")
            return True
        if self.completion_tokens >= self.sampling.max_new_tokens:
            self._end_text("length")
            return True
        self._last = token
        if self._history is not None:
            self._history[0, self.prompt_tokens + self.completion_tokens - 1] = token
        return False

    def _end_text(self, reason: str) -> None:
        self._emit(self._stops.feed(self._decoder.flush()))
        if self._stops.stopped:
            reason = "stop"
        self._emit(self._stops.finish())
        self._finish(reason)

    def _seen(self) -> torch.Tensor:
        """(1, t): the prompt and the tokens so far, what the repetition penalty looks at."""
        return self._history[:, : self.prompt_tokens + self.completion_tokens]


class BatchGenerator:
    """Continuous batching over one loaded model; see the module docstring.

        engine = BatchGenerator(llmctl.load_model("experiments/runs/demo"))
        stream = engine.submit(ids, Sampling(max_new_tokens=64, temperature=0))
        for delta in stream: print(delta, end="")
        engine.close()
    """

    def __init__(self, loaded: "LoadedModel", max_batch: int = 16, max_waiting: int = 64):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a whole number >= 1, got {max_batch!r}")
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise ConfigError(f"max_waiting must be a whole number >= 0, got {max_waiting!r}")
        self.loaded = loaded
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.model = loaded.model
        self.device = next(self.model.parameters()).device
        self.dtype = loaded.dtype
        self.eos_id = loaded.tokenizer.eos_id
        cfg = getattr(self.model, "cfg", None)
        # Requests of such a model share the batched forward unless they mix counts in.
        self.batched = isinstance(cfg, ModelConfig) and getattr(self.model, "pointer", None) is None
        self.vocab_size = _vocab_size(self.model)
        self._cache: BatchKVCache | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Stream] = deque()
        self._rows: list[Stream] = []  # row b of the batch cache decodes stream _rows[b]
        self._solo: list[Stream] = []  # streams with a Generation of their own
        self._admitting = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode steps run (batched forwards, or solo rounds)

    # ------------------------------------------------------------------ API

    @property
    def active(self) -> int:
        """Requests being decoded (at most max_batch)."""
        with self._lock:
            return len(self._rows) + len(self._solo) + self._admitting

    @property
    def waiting(self) -> int:
        """Requests waiting for a row (at most max_waiting)."""
        with self._lock:
            return len(self._waiting)

    def submit(self, prompt_ids: list[int], sampling: Sampling, *, template: "ChatTemplate | None" = None) -> Stream:
        """Queue a request; it starts at the next step where a row is free. `template`: the
        SFT chat template the prompt was rendered with (`llmctl.generate.chat_prompt`), or
        None: as in `complete`, the reply's lead is dropped and a next user turn stops it.
        Raises ConfigError for an empty or over-window prompt, QueueFull when max_waiting
        requests are already waiting."""
        if not isinstance(sampling, Sampling):
            raise TypeError("sampling must be an llmctl.generate.Sampling")
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ConfigError("the prompt is empty; generation needs at least one token to continue")
        if self.vocab_size and not all(0 <= i < self.vocab_size for i in ids):
            raise ConfigError(f"the prompt holds token ids outside the vocabulary (0..{self.vocab_size - 1})")
        context = self.loaded.context_length
        if len(ids) + sampling.max_new_tokens > context:
            raise ConfigError(f"the prompt's {len(ids)} tokens and max_new_tokens {sampling.max_new_tokens} "
                              f"make {len(ids) + sampling.max_new_tokens}, past the model's context of "
                              f"{context} tokens; shorten the prompt or lower max_new_tokens")
        if isinstance(template, dict):
            from llmctl.data.chat_template import ChatTemplate

            template = ChatTemplate.from_state(template)
        seed = sampling.seed if sampling.seed is not None else secrets.randbelow(2**31)
        stream = Stream(self, ids, sampling, seed, template, sampled_counts(self.loaded, sampling.counts))
        with self._wake:
            if self._closed:
                raise LlmctlError("the batch generator is closed")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the most allowed: "
                                f"{self.max_waiting}); try again shortly")
            self._waiting.append(stream)
            self._wake.notify()
        self.start()
        return stream

    def start(self) -> None:
        """Start the decode thread (submit does it when needed)."""
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name="llmctl-decode", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the decode thread after its current step; every unfinished stream is cancelled."""
        with self._wake:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._wake.notify_all()
            thread = self._thread
        for stream in waiting:
            stream._finish("cancelled")
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> "BatchGenerator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cancel(self, stream: Stream) -> None:
        with self._wake:
            try:
                self._waiting.remove(stream)
            except ValueError:  # active (or over): the decode thread drops it at its next step
                stream._cancel = True
                self._wake.notify()
                return
        stream._finish("cancelled")

    # ------------------------------------------------------------------ decode thread

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    self._drop_cancelled()  # first, so a waiting request can take a freed row at once
                    with self._wake:
                        while not (self._closed or self._waiting or self._rows or self._solo):
                            self._wake.wait()
                        if self._closed:
                            break
                        joining = []
                        while self._waiting and len(self._rows) + len(self._solo) + len(joining) < self.max_batch:
                            joining.append(self._waiting.popleft())
                        self._admitting = len(joining)
                    for stream in joining:
                        joins = self._start(stream)
                        with self._lock:  # active stays the same while it moves from admitting to a row
                            self._admitting -= 1
                            if joins is not None:
                                joins.append(stream)
                    if self._rows:
                        self._batched_step()
                    for stream in list(self._solo):
                        self._solo_step(stream)
                    self.steps += 1
        except BaseException as e:  # noqa: BLE001 (a bug here must not leave readers waiting forever)
            for stream in self._rows + self._solo:
                stream._finish("error", e)
            raise
        finally:
            with self._wake:
                self._closed = True
                left = list(self._waiting) + self._rows + self._solo
                self._waiting.clear()
            self._rows, self._solo = [], []
            for stream in left:
                stream._finish("cancelled")

    def _forward(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        from llmctl.runtime import autocast

        with autocast(self.device, self.dtype):
            return fn()

    def _start(self, stream: Stream) -> list[Stream] | None:
        """Prefill a joining request and sample its first token; returns the list it decodes
        in from the next step (the batch's rows, or the solo streams), None when it is over."""
        if stream._cancel:
            stream._finish("cancelled")
            return None
        batched = self.batched and stream._counts is None
        row = len(self._rows)
        try:
            ids = torch.tensor([stream.prompt_ids], dtype=torch.long, device=self.device)  # (1, P)
            if stream.sampling.repetition_penalty != 1.0:
                stream._history = torch.empty(1, stream.prompt_tokens + stream.sampling.max_new_tokens,
                                              dtype=torch.long, device=self.device)
                stream._history[:, : stream.prompt_tokens] = ids
            if batched:
                if self._cache is None:
                    self._cache = BatchKVCache(self.model.cfg, self.max_batch)
                view = self._cache.row(row)
                logits = self._forward(lambda: self.model.logits(self.model.hidden(ids, view)[:, -1:])[:, -1])
            else:
                stream._generation = Generation(self.model, stream._counts, self.loaded.context_length)
                logits = self._forward(lambda: stream._generation.feed(ids))
            logits = self._hold_eos(logits, [stream])
            history = stream._seen() if stream._history is not None else None
            token = int(next_token(logits, stream.sampling, stream._generator, history)[0])
        except Exception as e:  # noqa: BLE001 (this request fails, the others go on)
            if batched and self._cache is not None:
                self._cache.lengths[row] = 0
            stream._finish("error", e)
            return None
        if stream._take(token):
            if batched:
                self._cache.lengths[row] = 0
            return None
        return self._rows if batched else self._solo

    def _batched_step(self) -> None:
        """One forward of every row's last token, then one token per row."""
        rows, cache = self._rows, self._cache
        n = cache.n = len(rows)
        try:
            ids = torch.tensor([[s._last] for s in rows], dtype=torch.long, device=self.device)  # (n, 1)
            logits = self._forward(lambda: self.model.logits(self.model.hidden(ids, cache))[:, -1])  # (n, V)
            tokens = self._sample(self._hold_eos(logits, rows), rows)
        except Exception as e:  # noqa: BLE001 (the batch fails together; the engine goes on)
            for stream in rows:
                stream._finish("error", e)
            self._rows = []
            cache.lengths = [0] * cache.rows
            return
        finished = [b for b in range(n) if rows[b]._take(tokens[b])]
        self._remove_rows(finished)

    def _hold_eos(self, logits: torch.Tensor, rows: list[Stream]) -> torch.Tensor:
        """logits (n, V) with end-of-text ruled out for the rows that may not end yet."""
        held = [b for b, s in enumerate(rows) if not s._may_end()]
        if not held or self.eos_id is None:
            return logits
        logits = logits.clone()
        logits[held, self.eos_id] = -math.inf
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[Stream]) -> list[int]:
        """`next_token` for every row of logits (n, V): rows with the same settings filtered
        together, then each row's draw from its own generator."""
        logits = logits.float()
        penalised = [b for b, s in enumerate(rows) if s.sampling.repetition_penalty != 1.0]
        if penalised:
            logits = logits.clone()
            for b in penalised:  # each row's own history
                s = rows[b]
                logits[b: b + 1] = apply_repetition_penalty(logits[b: b + 1], s._seen(), s.sampling.repetition_penalty)
        groups: dict[tuple[float, int, float] | None, list[int]] = {}
        for b, s in enumerate(rows):
            p = s.sampling
            groups.setdefault(None if p.temperature == 0 else (p.temperature, p.top_k, p.top_p), []).append(b)
        tokens = [0] * len(rows)
        for key, members in groups.items():
            part = logits if len(members) == len(rows) else logits[members]
            if key is None:
                for b, token in zip(members, part.argmax(dim=-1).tolist()):
                    tokens[b] = token
                continue
            temperature, top_k, top_p = key
            probs = filter_logits(part / temperature, top_k, top_p).softmax(dim=-1).cpu()
            for j, b in enumerate(members):
                tokens[b] = int(torch.multinomial(probs[j: j + 1], 1, generator=rows[b]._generator)[0, 0])
        return tokens

    def _remove_rows(self, gone: list[int]) -> None:
        """Drop rows (their streams are over); the last rows move into the gaps."""
        rows, cache = self._rows, self._cache
        for b in sorted(gone, reverse=True):
            last = len(rows) - 1
            if b != last:
                cache.move(last, b)
                rows[b] = rows[last]
            else:
                cache.lengths[b] = 0
            rows.pop()
        cache.n = len(rows)

    def _solo_step(self, stream: Stream) -> None:
        """One token of a request with its own `Generation`."""
        if stream._cancel:
            return
        try:
            ids = torch.tensor([[stream._last]], dtype=torch.long, device=self.device)
            logits = self._forward(lambda: stream._generation.feed(ids))
            logits = self._hold_eos(logits, [stream])
            history = stream._seen() if stream._history is not None else None
            token = int(next_token(logits, stream.sampling, stream._generator, history)[0])
        except Exception as e:  # noqa: BLE001
            self._solo.remove(stream)
            stream._finish("error", e)
            return
        if stream._take(token):
            self._solo.remove(stream)

    def _drop_cancelled(self) -> None:
        gone = [b for b, s in enumerate(self._rows) if s._cancel]
        streams = [self._rows[b] for b in gone]
        if gone:
            self._remove_rows(gone)
        for stream in [s for s in self._solo if s._cancel]:
            self._solo.remove(stream)
            streams.append(stream)
        for stream in streams:
            stream._finish("cancelled")


def _vocab_size(model: torch.nn.Module) -> int | None:
    size = getattr(model, "vocab_size", None)
    if size is None:
        size = getattr(getattr(getattr(model, "hf", None), "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def batch_generate(checkpoint_or_model: Any, prompts: list[str], *, device: str = "auto", dtype: str = "float32",
                   raw: bool = False, max_batch: int = 16, **sampling: Any) -> list[Completion]:
    """Complete many prompts at once, decoded together (`BatchGenerator`); one `Completion`
    per prompt, in order. Like `complete`: an SFT checkpoint's chat template renders each
    prompt (`raw=True` opts out) and `sampling` holds `Sampling`'s fields; with a seed, prompt
    i uses seed + i (as `llmctl generate` numbers its samples), so `complete(..., seed=seed + i)`
    redoes it alone. A prompt and max_new_tokens must fit the model's context.
    `Completion.seconds` runs from submission, waiting for a row included.

        >>> llmctl.batch_generate("experiments/runs/demo", ["Once upon a time", "The king"], temperature=0)
    """
    unknown = set(sampling) - {f.name for f in fields(Sampling)}
    if unknown:
        raise ConfigError(f"unknown sampling option(s): {', '.join(sorted(unknown))}; "
                          f"use {', '.join(f.name for f in fields(Sampling))}")
    params = Sampling(**sampling)
    if isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts):
        raise ConfigError("prompts must be a list of non-empty strings")
    loaded = _as_loaded(checkpoint_or_model, device, dtype)
    encoded = [chat_prompt(loaded, prompt, raw) for prompt in prompts]
    base = params.seed if params.seed is not None else secrets.randbelow(2**31)
    streams: list[Stream] = []
    with BatchGenerator(loaded, max_batch=max_batch, max_waiting=max(len(prompts), 1)) as engine:
        for i, (ids, template) in enumerate(encoded):
            try:
                streams.append(engine.submit(ids, replace(params, seed=base + i), template=template))
            except ConfigError as e:
                raise ConfigError(f"prompt {i}: {e}") from None
        texts = [stream.text() for stream in streams]
    return [Completion(text, s.completion_tokens, s.prompt_tokens, s.finished_at - s.submitted_at,
                       "eos" if s.eos else s.finish_reason, s.seed, list(s.token_ids), s.prompt_tokens,
                       s.templated, loaded.context_length)
            for text, s in zip(texts, streams)]
