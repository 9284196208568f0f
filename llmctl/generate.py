"""Sampling: a KV-cache engine on token ids, and `complete` / `generate_text` on strings.

Three layers, each usable alone:
- `next_token(logits, sampling, generator, history)`: a pure function. Repetition penalty
  (CTRL: positive logits of seen tokens divided by R, negative ones multiplied), then
  temperature (0 = greedy), top-k, top-p (nucleus: the smallest set of tokens whose
  probability reaches P), then one draw from an explicit CPU `torch.Generator`, so a seed
  gives the same sample on any device.
- `token_stream(model, prompt_ids, ...)`: yields new token ids. With llmctl's Transformer
  the prompt (its last max_seq_len tokens) is run once into a `KVCache` and then each step
  feeds one token (past the context length the cache slides, see `llmctl.inference.KVCache`);
  other models (transformers) and `use_cache=False` re-run the last max_seq_len tokens
  every step.
- `complete(...)`: strings in and out. Text is decoded incrementally — a delta is released
  only when it does not end in a partial UTF-8 character — and text that could be the start
  of a stop string is held back until it is known not to be one, so what `on_text` receives
  is exactly the final text, streamed. Stop strings are not included in the result.
  For an SFT checkpoint the prompt is rendered with the chat template saved in it
  (`chat_prompt`), the same code that rendered the training data; `raw=True` opts out.
  `complete_ids(...)` does the same on a prompt already encoded (a whole conversation, for
  `llmctl chat`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmctl.errors import ConfigError

if TYPE_CHECKING:
    from llmctl.data.tokenizer import TextTokenizer
    from llmctl.loading import LoadedModel
    from llmctl.ngram import CountMixture


NUCLEUS_FIRST = 256  # tokens ranked before falling back to a full sort for top-p
COUNTS_CHOICES = ("off", "ngram", "all")


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256  # stop after this many new tokens
    temperature: float = 0.8  # 0 = greedy (always the most likely token)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 0.95  # keep the smallest set of tokens whose probability reaches p; 1 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context; 1 = off
    stop: tuple[str, ...] = ()  # stop before the first of these strings
    seed: int | None = None  # None = a fresh random seed (reported, so a sample can be redone)
    # Where the checkpoint has counted n-grams (model.ngram_order / cache_weight): sample from
    # the network alone ("off"), mixed with the training text's n-grams ("ngram"), or with
    # those and the window cache ("all"). Off by default: see benchmarks/bench_samples.py.
    counts: str = "off"

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        _check(math.isfinite(self.temperature) and self.temperature >= 0,
               f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        _check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty")
        _check(self.counts in COUNTS_CHOICES, f"counts must be one of {', '.join(COUNTS_CHOICES)}, got {self.counts!r}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# --------------------------------------------------------------------------- one token

def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V), history (B, t) ids seen so far; CTRL's penalty (Keskar et al., 2019)."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(1, history)
    return logits.scatter(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) with every token outside the top-k / top-p set at -inf."""
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        log_total = logits.logsumexp(dim=-1, keepdim=True)  # (B, 1)
        # A trained model's nucleus is usually a few dozen tokens: rank the top 256 first; if
        # they hold top_p of the mass, nothing outside them can be in the nucleus and the
        # 50k-token sort (20x slower) is skipped. Flat distributions fall back to the sort.
        top, order = logits.topk(min(logits.size(-1), NUCLEUS_FIRST), dim=-1)  # (B, k), descending
        probs = (top - log_total).exp()
        cumulative = probs.cumsum(dim=-1)
        if top.size(-1) < logits.size(-1) and not bool((cumulative[:, -1] >= top_p).all()):
            top, order = logits.sort(dim=-1, descending=True)
            probs = (top - log_total).exp()
            cumulative = probs.cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        top = top.masked_fill(cumulative - probs >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, top)
    return logits


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator,
               history: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) token ids on the CPU."""
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1).cpu()
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = logits.softmax(dim=-1).cpu()  # drawn on the CPU: the same seed, the same sample anywhere
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------- token ids

@torch.no_grad()
def token_stream(model: torch.nn.Module, prompt_ids: list[int], sampling: Sampling,
                 generator: torch.Generator, *, context_length: int, eos_id: int | None = None,
                 dtype: torch.dtype = torch.float32, use_cache: bool = True,
                 counts: "CountMixture | None" = None, eos_allowed: Callable[[], bool] | None = None
                 ) -> Iterator[int]:
    """Yield up to max_new_tokens new ids after the prompt; stops early at EOS (not yielded),
    which is never drawn while `eos_allowed()` says no. A prompt longer than the context is cut
    to its last `context_length` tokens. With `counts`, tokens are drawn from the network mixed
    with them (`llmctl.inference`)."""
    from llmctl.inference import Generation
    from llmctl.runtime import autocast

    if not prompt_ids:
        raise ConfigError("the prompt is empty; generation needs at least one token to continue")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, P)
    history = ids  # (1, t): what the repetition penalty looks at
    state = Generation(model, counts) if use_cache else None

    def forward(x: torch.Tensor) -> torch.Tensor:  # (1, T) -> (1, V)
        with autocast(device, dtype):
            return (state or Generation(model, counts)).feed(x)  # without the cache: afresh every step

    if state is not None:
        # One prefill of the prompt's last context_length tokens: all that the first new token
        # can see, as without the cache (earlier prompt tokens still count for the penalty).
        logits = forward(ids[:, -context_length:])
    for step in range(sampling.max_new_tokens):
        if state is None:
            logits = forward(history[:, -context_length:])
        if eos_id is not None and eos_allowed is not None and not eos_allowed():
            logits = logits.clone()
            logits[:, eos_id] = -math.inf
        token = next_token(logits, sampling, generator, history)  # (1,) on the CPU
        value = int(token)
        if value == eos_id:
            return
        yield value
        token = token.to(device).view(1, 1)
        history = torch.cat([history, token], dim=1)
        if state is not None and step + 1 < sampling.max_new_tokens:
            logits = forward(token)


# --------------------------------------------------------------------------- text

class IncrementalDecoder:
    """Token ids in, text deltas out, never splitting a multi-byte character.

    Byte-level BPE tokens can end inside a UTF-8 character; decoding them alone gives U+FFFD.
    So the ids since the last release are re-decoded together with the chunk released before
    them, and new text is released only when it does not end in U+FFFD (the approach of
    text-generation-inference). That leading chunk — the prompt's last tokens at first — also
    keeps tokenizers that drop a leading space when decoding a lone token right.
    """

    CONTEXT = 5  # prompt tokens decoded along with the first new ones

    def __init__(self, tokenizer: "TextTokenizer", prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0  # ids[prefix:read] decode to text already released
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix: self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            self._trim()
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is left (bytes that never completed a character decode to U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix: self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.read = len(self.ids)
        return after[len(before):]

    def _trim(self) -> None:
        if self.prefix > 64:  # released ids before the window are never decoded again
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0


class StopFilter:
    """Accumulates text, cuts it at the first stop string, and holds back any tail that could
    still grow into one, so released text never has to be taken back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.text = ""
        self.released = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        checked = len(self.text)
        self.text += delta
        hits = [i for s in self.stops if (i := self.text.find(s, max(0, checked - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.finish()
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        safe = len(self.text) - hold
        out = self.text[self.released: safe]
        self.released = max(self.released, safe)
        return out

    def finish(self) -> str:
        out = self.text[self.released:]
        self.released = len(self.text)
        return out


class LeadStrip:
    """Drops a fixed prefix (an SFT template's reply lead, " ") from the start of streamed
    text, holding back the first characters until they are known to be it or not."""

    def __init__(self, lead: str):
        self.lead, self.held, self.done = lead, "", not lead

    def feed(self, delta: str) -> str:
        if self.done:
            return delta
        self.held += delta
        if len(self.held) < len(self.lead) and self.lead.startswith(self.held):
            return ""
        self.done = True
        return self.held.removeprefix(self.lead)


@dataclass
class Completion:
    text: str  # the generated text (prompt not included; stop string not included)
    tokens: int  # new tokens generated
    prompt_tokens: int
    seconds: float
    finish_reason: str  # "eos", "stop" or "length"
    seed: int
    token_ids: list[int] = field(default_factory=list)
    prompt_used: int = 0  # prompt tokens the model saw: the last context_length of them
    templated: bool = False  # the prompt went through an SFT checkpoint's chat template
    context: int = 0  # the model's window (max_seq_len): the most tokens one prediction sees

    @property
    def slid(self) -> bool:
        """Whether a new token was predicted from more text than the window holds: the window
        then slid (see `token_stream`), and that token saw only the last `context` tokens."""
        return 0 < self.context < self.prompt_used + self.tokens - 1

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def text_filters(stop: tuple[str, ...], template: Any) -> tuple[StopFilter, LeadStrip]:
    """The stop filter and lead strip of a reply (`complete`, `llmctl.batching`): with an SFT
    chat template (a `ChatTemplate`), the reply's lead (" ") is dropped and the start of a next
    user turn is one more stop string."""
    if template is None:
        return StopFilter(stop), LeadStrip("")
    next_turn = template.user.partition("{content}")[0].strip()
    extra = (next_turn,) if next_turn and next_turn not in stop else ()
    return StopFilter(stop + extra), LeadStrip(template.assistant.partition("{content}")[0])


def _as_loaded(checkpoint_or_model: Any, device: str, dtype: str) -> "LoadedModel":
    from llmctl.loading import LoadedModel, load_model

    if isinstance(checkpoint_or_model, LoadedModel):
        return checkpoint_or_model
    if isinstance(checkpoint_or_model, (str, Path)):
        return load_model(checkpoint_or_model, device=device, dtype=dtype)
    raise TypeError("checkpoint_or_model must be a checkpoint path, run directory, transformers "
                    "model id, or a LoadedModel from llmctl.load_model")


def sampled_counts(loaded: "LoadedModel", choice: str) -> "CountMixture | None":
    """The part of a checkpoint's counts that `Sampling.counts` mixes into sampling."""
    counts = getattr(loaded, "counts", None)
    if counts is None or choice == "off":
        return None
    if choice == "ngram":
        return counts.without_cache() if counts.ngram_weight else None
    return counts


def chat_prompt(loaded: "LoadedModel", prompt: str, raw: bool = False) -> tuple[list[int], Any]:
    """(prompt ids, template or None): an SFT checkpoint's chat template renders `prompt` as a
    user turn plus the assistant prefix, exactly as in training (`llmctl.data.sft.prompt_ids`);
    other models, or `raw`, take the text as it is."""
    if raw or not getattr(loaded, "template", None):
        return loaded.tokenizer.encode(prompt), None
    from llmctl.data.chat_template import ChatTemplate, prompt_ids

    template = ChatTemplate.from_state(loaded.template)
    return prompt_ids([("user", prompt)], template, loaded.tokenizer), template


def complete(checkpoint_or_model: Any, prompt: str, *, on_text: Callable[[str], None] | None = None,
             device: str = "auto", dtype: str = "float32", use_cache: bool = True, raw: bool = False,
             **sampling: Any) -> Completion:
    """Continue `prompt`; `on_text` receives the text as it is produced. `sampling` holds the
    fields of `Sampling` (max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed).

    For an SFT checkpoint the prompt is a user turn: its chat template renders it, the reply's
    leading template text (a space) is not returned, and the start of a next user turn stops
    the reply; `raw=True` feeds the text as it is."""
    unknown = set(sampling) - {f.name for f in fields(Sampling)}
    if unknown:
        raise ConfigError(f"unknown sampling option(s): {', '.join(sorted(unknown))}; "
                          f"use {', '.join(f.name for f in fields(Sampling))}")
    params = Sampling(**sampling)
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError("the prompt is empty; give some text to continue (--prompt TEXT or --prompt-file F)")
    loaded = _as_loaded(checkpoint_or_model, device, dtype)
    prompt_ids, template = chat_prompt(loaded, prompt, raw)
    return complete_ids(loaded, prompt_ids, params, template=template, on_text=on_text, use_cache=use_cache)


def complete_ids(loaded: "LoadedModel", prompt_ids: list[int], params: Sampling, *, template: Any = None,
                 on_text: Callable[[str], None] | None = None, use_cache: bool = True) -> Completion:
    """`complete` on a prompt already encoded: a conversation rendered by `template` (a
    `ChatTemplate`, whose reply lead is stripped and whose next user turn stops the reply) or,
    with `template=None`, plain text. `llmctl chat` renders whole conversations this way."""
    if not prompt_ids:
        raise ConfigError("the prompt encodes to no tokens; give some text to continue")
    seed = params.seed if params.seed is not None else int(torch.seed() % 2**31)
    generator = torch.Generator().manual_seed(seed)
    decoder = IncrementalDecoder(loaded.tokenizer, prompt_ids)
    stops, lead = text_filters(params.stop, template)
    parts: list[str] = []
    visible = [False]  # the reply holds more than whitespace

    def eos_allowed() -> bool:  # a chat reply is never empty: no end-of-text before its first visible text
        return visible[0]

    def emit(text: str) -> None:
        visible[0] = visible[0] or bool(text.strip())
        text = lead.feed(text)
        if text:
            parts.append(text)
            if on_text is not None:
                on_text(text)

    new_ids: list[int] = []
    finish = "length"
    start = time.perf_counter()
    stream = token_stream(loaded.model, prompt_ids, params, generator, context_length=loaded.context_length,
                          eos_id=loaded.tokenizer.eos_id, dtype=loaded.dtype, use_cache=use_cache,
                          counts=sampled_counts(loaded, params.counts),
                          eos_allowed=eos_allowed if template is not None else None)
    for token in stream:
        new_ids.append(token)
        emit(stops.feed(decoder.push(token)))
        if stops.stopped:
            finish = "stop"
            stream.close()
            break
    else:
        finish = "eos" if len(new_ids) < params.max_new_tokens else "length"
        emit(stops.feed(decoder.flush()))
        if stops.stopped:
            finish = "stop"
        emit(stops.finish())
    seconds = time.perf_counter() - start
    return Completion("".join(parts), len(new_ids), len(prompt_ids), seconds, finish, seed, new_ids,
                      min(len(prompt_ids), loaded.context_length), template is not None, loaded.context_length)


def generate_text(checkpoint_or_model: Any, prompt: str, **sampling: Any) -> str:
    """The text a model writes after `prompt`.

    `checkpoint_or_model`: an llmctl checkpoint file or run directory, a transformers model
    folder or Hub id, or a `LoadedModel` (`llmctl.load_model(...)`, to load once and sample
    many times). `sampling`: max_new_tokens, temperature (0 = greedy), top_k, top_p,
    repetition_penalty, stop (strings), seed; also device, dtype, on_text (a callback
    receiving text as it streams) and use_cache.

        >>> llmctl.generate_text("experiments/runs/demo", "Once upon a time", temperature=0)
    """
    return complete(checkpoint_or_model, prompt, **sampling).text


def unescape(text: str) -> str:
    """`\\n`, `\\t` and `\\\\` typed on a command line (`--stop "\\n\\n"`) become the characters."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}.get(m[1], m[0]), text)


def read_prompt(prompt: str | None, prompt_file: str | Path | None) -> str:
    """The prompt from --prompt or --prompt-file (exactly one), checked to be non-empty."""
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        path = Path(prompt_file).expanduser()
        try:
            prompt = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"--prompt-file {path} does not exist") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompt-file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"--prompt-file {path} cannot be read ({e.strerror})") from None
    if prompt is None:
        raise ConfigError("no prompt; give --prompt TEXT or --prompt-file F")
    if not prompt:
        raise ConfigError("the prompt is empty; give some text to continue (--prompt TEXT or --prompt-file F)")
    return prompt


def generate_samples(checkpoint_or_model: Any, prompt: str, num_samples: int = 1, *,
                     on_text: Callable[[str], None] | None = None,
                     on_sample_end: Callable[[int, Completion], None] | None = None,
                     device: str = "auto", dtype: str = "float32", use_cache: bool = True, raw: bool = False,
                     **sampling: Any) -> list[Completion]:
    """`llmctl generate`: load once, then `num_samples` completions; sample i uses seed + i,
    so each one can be redone alone. Options are checked before the model is loaded."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples!r}")
    params = Sampling(**sampling)  # bad values fail here, before any loading
    if not prompt:
        raise ConfigError("the prompt is empty; give some text to continue (--prompt TEXT or --prompt-file F)")
    loaded = _as_loaded(checkpoint_or_model, device, dtype)
    base = params.seed if params.seed is not None else int(torch.seed() % 2**31)
    results = []
    for i in range(num_samples):
        options = {f.name: getattr(params, f.name) for f in fields(Sampling)} | {"seed": base + i}
        result = complete(loaded, prompt, on_text=on_text, use_cache=use_cache, raw=raw, **options)
        results.append(result)
        if on_sample_end is not None:
            on_sample_end(i, result)
    return results
