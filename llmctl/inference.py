"""What `llmctl eval` and `llmctl generate` score and sample from: the network, and the mixture its config asks for.

The network is the trained `Transformer`, with its copy-pointer head when it has one: the
distribution training optimised. A config may also ask for counted n-grams (`model.ngram_order`,
`model.cache_weight`, `llmctl/ngram.py`): counts of the training text and of the window,
mixed into the network's distribution here, at inference only, never inside the model.
Evaluation scores both from one forward pass (`Predictor.score`); generation
(`Predictor.generation`) samples from the network, or from the mixture when asked.

Generation keeps its state per stream: a `KVCache` of keys and values for the network and,
when the pointer or the counts read the window, a `WindowRing` of the last inputs (and their
final hidden states, the pointer's keys).

Shapes: B batch, T positions, Q query positions, V vocabulary, L = max_seq_len slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.config import ModelConfig
from llmctl.cross_entropy import IGNORE_INDEX
from llmctl.ngram import CountMixture
from llmctl.window import WindowRing, WindowView


class KVCache:
    """Keys and values of every token a generation has seen: per layer a ring of L = max_seq_len
    slots, (B, K, L, D), filled by `Transformer.forward(..., cache=cache)`
    (or `Transformer.hidden`).

    Keys are stored after RoPE at their absolute positions. RoPE makes a score depend only on
    the distance between query and key, so once the ring is full and each new token overwrites
    the oldest, every query still sees its last L tokens at distances 0..L-1 — the distances
    seen in training — and nothing is re-rotated (a sliding window, as in Mistral). A model
    trained with attention sinks keeps them: the sink logit joins every softmax whatever the
    ring holds. (StreamingLLM's alternative, keeping the first tokens as sinks, needs positions
    re-assigned inside the cache; models without learned sinks simply slide.)

    While the ring is filling, one forward may take up to `room()` tokens (a prefill); once it
    slides, one token at a time.
    """

    def __init__(self, cfg: ModelConfig):
        self.size = cfg.max_seq_len
        self.keys: list[torch.Tensor | None] = [None] * cfg.n_layers  # allocated on first use,
        self.values: list[torch.Tensor | None] = [None] * cfg.n_layers  # in the dtype autocast gives
        self.pos = 0  # tokens seen so far = absolute position of the next token
        self._mask: torch.Tensor | None = None  # (T, S) for the step in progress; None = attend to all
        # Each slot's absolute position (-1 = empty), set by `begin`. With block-local attention
        # a token attends only to its own block of `block` positions (absolute position // block).
        self.block = cfg.attention_block if 0 < cfg.attention_block < cfg.max_seq_len else 0
        self.slot_pos: torch.Tensor | None = None  # (L,)

    def room(self) -> int:
        return self.size - self.pos if self.pos < self.size else 1

    def begin(self, T: int, device: torch.device) -> None:
        """Prepare a step of T new tokens: new token i sees the cached tokens and new tokens 0..i."""
        if T < 1 or T > self.room():
            raise ValueError(f"a cached step takes 1..{self.room()} tokens now, got {T}")
        S = self.pos + T
        if self.slot_pos is None:
            self.slot_pos = torch.full((self.size,), -1, dtype=torch.long, device=device)
        query_pos = torch.arange(self.pos, S, device=device)  # (T,)
        self.slot_pos[query_pos % self.size] = query_pos
        if not self.block:
            self._mask = None if T == 1 else (
                torch.arange(S, device=device)[None, :] <= torch.arange(self.pos, S, device=device)[:, None])
            return
        key_pos = self.slot_pos[:S] if S <= self.size else self.slot_pos  # the keys `update` will return
        self._mask = ((key_pos[None, :] >= 0) & (key_pos[None, :] <= query_pos[:, None])
                      & (key_pos[None, :] // self.block == query_pos[:, None] // self.block))  # (T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this step's k, v (B, K, T, D); return all visible keys, values (B, K, S, D) and the mask."""
        if self.keys[layer] is None:
            shape = (k.size(0), k.size(1), self.size, k.size(3))
            self.keys[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        keys, values = self.keys[layer], self.values[layer]
        T = k.size(2)
        if self.pos + T <= self.size:  # filling: slot = position, in order
            keys[:, :, self.pos: self.pos + T] = k
            values[:, :, self.pos: self.pos + T] = v
            return keys[:, :, : self.pos + T], values[:, :, : self.pos + T], self._mask
        slot = self.pos % self.size  # full: overwrite the oldest token; order no longer matters
        keys[:, :, slot] = k[:, :, 0]
        values[:, :, slot] = v[:, :, 0]
        return keys, values, self._mask  # None unless attention is block-local

    def advance(self, T: int) -> None:
        self.pos += T


@dataclass
class Predictor:
    model: torch.nn.Module  # the network: llmctl's Transformer, or a wrapped transformers model
    counts: CountMixture | None = None  # mixed into the network's distribution where given

    def score(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The summed loss of the scored targets of (x, y), (B, T) each (-100 = not scored),
        under the network and under the mixture (None without counts), from one forward."""
        if self.counts is None:
            return self.model(x, y, reduction="sum"), None
        losses = self.model(x, y, reduction="none").view_as(y).float()  # (B, T), 0 where not scored
        window = WindowView.of_sequence(x, x.size(1), self.model.cfg.max_seq_len)
        mixed = -self.counts.mix_targets(-losses, window, y).masked_fill(y == IGNORE_INDEX, 0.0)
        return losses.sum(), mixed.sum()

    def generation(self, mix: bool = False, cache_in_mix: bool = True) -> "Generation":
        """A fresh generation state; with `mix` (and counts) it samples from the mixture,
        without the window cache's part unless `cache_in_mix`."""
        counts = self.counts if mix else None
        if counts is not None and not cache_in_mix:
            counts = counts.without_cache()
        return Generation(self.model, counts)


class Generation:
    """One stream's state: `feed` the tokens that follow those fed so far, get the
    distribution of the next one. llmctl models keep a KV cache (tokens fed at once: up to
    `room()`); other models re-run what they are fed."""

    def __init__(self, model: torch.nn.Module, counts: CountMixture | None = None):
        self.model, self.counts = model, counts
        cfg = getattr(model, "cfg", None)
        self.cache = KVCache(cfg) if isinstance(cfg, ModelConfig) else None
        reads_window = getattr(model, "pointer", None) is not None or counts is not None
        self.ring = WindowRing(cfg.max_seq_len) if self.cache is not None and reads_window else None

    def room(self) -> int:
        return self.cache.room() if self.cache is not None else 1 << 62

    def feed(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> the next token's logits (B, V); log-probabilities where a pointer or
        counts are mixed in (their softmax is the same distribution)."""
        if self.cache is None:
            return self.model(idx, last_only=True)[:, -1]
        model = self.model
        h = model.hidden(idx, self.cache)  # (B, T, C)
        logits = model.logits(h[:, -1:])  # (B, 1, V)
        if self.ring is None:
            return logits[:, -1]
        positions = self.ring.push(idx)  # (T,)
        view = self.ring.view(positions[-1:])
        if model.pointer is not None:
            self.ring.push_hidden(h, positions)
            offered, known = view.offered()  # (B, L), (L,)
            logits = model.pointer.mix(h[:, -1:], self.ring.hidden, offered, view.earlier() & known, logits)
        if self.counts is not None:
            logits = self.counts.mix_log_probs(logits, view)
        return logits[:, -1]
