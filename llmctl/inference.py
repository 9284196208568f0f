"""What `llmctl eval` and `llmctl generate` score and sample from: the network, and the mixture its config asks for.

The network is the trained `Transformer`, with its copy-pointer head when it has one: the
distribution training optimised. A config may also ask for counted n-grams (`model.ngram_order`,
`model.cache_weight`, `llmctl/ngram.py`): counts of the training text and of the window,
mixed into the network's distribution here, at inference only, never inside the model.
Evaluation scores both from one forward pass (`Predictor.score`); generation
(`Predictor.generation`) samples from the network, or from the mixture when asked.

Generation keeps its state per stream: a `KVCache` of keys and values for the network and,
when the pointer or the counts read the window, a `WindowRing` of the last inputs (and their
final hidden states, the pointer's keys). Continuous batching (`llmctl.batching`) keeps many
streams' keys and values in one `BatchKVCache`, a row each, decoded in one forward per step.

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

    def rope(self, model: torch.nn.Module, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables (T, D) for this step's positions pos .. pos + T - 1."""
        return model._rope(self.pos, self.pos + T)


class BatchKVCache:
    """Keys and values of up to `rows` generations decoded together (continuous batching,
    `llmctl.batching`): per layer (rows, K, slots, D), one row per generation, slot = position.

    Rows sit at different positions, so a decode step of rows 0..n-1 (`begin`) takes each row's
    RoPE angles at its own position and a (n, 1, 1, S) mask: row b sees slots 0..pos_b (and,
    with block-local attention, only those of its own block); slots past a row's length hold
    stale keys that the mask hides. A new generation is prefilled into its row through `row(r)`,
    a `KVCache`-like view, in a forward of its own, then decodes with the others.

    A generation never goes past max_seq_len tokens here (`BatchGenerator.submit` refuses it),
    so nothing slides. Slots are allocated as they are first needed, in steps of `GROW` (up to
    max_seq_len), in the dtype autocast gives the keys.
    """

    GROW = 64

    def __init__(self, cfg: ModelConfig, rows: int):
        self.size = cfg.max_seq_len
        self.rows = rows
        self.keys: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.values: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.lengths = [0] * rows  # tokens held by each row = position of its next token
        self.n = 0  # rows 0..n-1 take part in a decode step
        self.block = cfg.attention_block if 0 < cfg.attention_block < cfg.max_seq_len else 0
        self._pos: torch.Tensor | None = None  # (n,) positions of this step's tokens
        self._index: torch.Tensor | None = None  # (n,) 0..n-1
        self._mask: torch.Tensor | None = None  # (n, 1, 1, S) or None = attend to all
        self._span = 0  # S: slots a step reads

    def row(self, r: int) -> "_RowView":
        """Row r as a one-row cache: feed it the tokens that follow those it holds (a prefill)."""
        return _RowView(self, r)

    def begin(self, T: int, device: torch.device) -> None:
        """A decode step: one new token for each of rows 0..n-1, at position lengths[b]."""
        if T != 1:
            raise ValueError(f"a batched decode step takes one token per row, got {T}")
        lengths = self.lengths[: self.n]
        S = max(lengths) + 1
        if S > self.size:
            raise ValueError(f"a row would pass max_seq_len ({self.size})")
        self._span = S
        self._pos = torch.tensor(lengths, dtype=torch.long, device=device)
        self._index = torch.arange(self.n, device=device)
        if not self.block and min(lengths) == S - 1:
            self._mask = None  # every row sees every slot up to S
            return
        key_pos = torch.arange(S, device=device)[None, :]
        query_pos = self._pos[:, None]
        mask = key_pos <= query_pos
        if self.block:
            mask &= key_pos // self.block == query_pos // self.block
        self._mask = mask[:, None, None, :]  # (n, 1, 1, S)

    def rope(self, model: torch.nn.Module, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 1, 1, D) RoPE tables: each row's own position."""
        return model.rope_cos[self._pos][:, None, None, :], model.rope_sin[self._pos][:, None, None, :]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store each row's new k, v (n, K, 1, D) at its position; return (n, K, S, D) twice and the mask."""
        keys, values = self._storage(layer, self._span, k, v)
        keys[self._index, :, self._pos] = k[:, :, 0]
        values[self._index, :, self._pos] = v[:, :, 0]
        return keys[: self.n, :, : self._span], values[: self.n, :, : self._span], self._mask

    def advance(self, T: int) -> None:
        for b in range(self.n):
            self.lengths[b] += T

    def move(self, src: int, dst: int) -> None:
        """Row src's generation moves to row dst (whose own is over): the rows stay 0..n-1."""
        length = self.lengths[src]
        for tensors in (self.keys, self.values):
            for t in tensors:
                if t is not None and length:
                    t[dst, :, :length] = t[src, :, :length]
        self.lengths[dst], self.lengths[src] = length, 0

    def _storage(self, layer: int, needed: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        have = 0 if keys is None else keys.size(2)
        if needed > have:
            slots = min(self.size, max(2 * have, -(-needed // self.GROW) * self.GROW))
            shape = (self.rows, k.size(1), slots, k.size(3))
            new_keys = torch.zeros(shape, dtype=k.dtype, device=k.device)
            new_values = torch.zeros(shape, dtype=v.dtype, device=v.device)
            if have:
                new_keys[:, :, :have] = keys
                new_values[:, :, :have] = values
            self.keys[layer], self.values[layer] = keys, values = new_keys, new_values
        return keys, values


class _RowView:
    """One row of a `BatchKVCache` fed like a `KVCache` of batch 1 (a prefill into that row)."""

    def __init__(self, cache: BatchKVCache, row: int):
        self.cache, self.row = cache, row
        self.pos = cache.lengths[row]
        self._mask: torch.Tensor | None = None

    def begin(self, T: int, device: torch.device) -> None:
        S = self.pos + T
        if T < 1 or S > self.cache.size:
            raise ValueError(f"row {self.row} holds {self.pos} tokens: {T} more pass max_seq_len ({self.cache.size})")
        if T == 1 and not self.cache.block:
            self._mask = None
            return
        key_pos = torch.arange(S, device=device)[None, :]
        query_pos = torch.arange(self.pos, S, device=device)[:, None]
        mask = key_pos <= query_pos
        if self.cache.block:
            mask &= key_pos // self.cache.block == query_pos // self.cache.block
        self._mask = mask  # (T, S)

    def rope(self, model: torch.nn.Module, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        return model._rope(self.pos, self.pos + T)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        S, r = self.pos + k.size(2), self.row
        keys, values = self.cache._storage(layer, S, k, v)
        keys[r, :, self.pos: S] = k[0]
        values[r, :, self.pos: S] = v[0]
        return keys[r: r + 1, :, :S], values[r: r + 1, :, :S], self._mask

    def advance(self, T: int) -> None:
        self.pos += T
        self.cache.lengths[self.row] = self.pos


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
    `room()`); other models (transformers) re-run all they have been fed, its last
    `context_length` tokens (by default their config's max_position_embeddings)."""

    def __init__(self, model: torch.nn.Module, counts: CountMixture | None = None,
                 context_length: int | None = None):
        self.model, self.counts = model, counts
        cfg = getattr(model, "cfg", None)
        self.cache = KVCache(cfg) if isinstance(cfg, ModelConfig) else None
        reads_window = getattr(model, "pointer", None) is not None or counts is not None
        self.ring = WindowRing(cfg.max_seq_len) if self.cache is not None and reads_window else None
        self.seen: torch.Tensor | None = None  # (B, t) what a model without a cache has been fed
        self.context_length = context_length or _hf_context_length(model)

    def room(self) -> int:
        return self.cache.room() if self.cache is not None else 1 << 62

    def feed(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> the next token's logits (B, V); log-probabilities where a pointer or
        counts are mixed in (their softmax is the same distribution)."""
        if self.cache is None:
            self.seen = idx if self.seen is None else torch.cat([self.seen, idx], dim=1)
            if self.context_length:
                self.seen = self.seen[:, -self.context_length:]
            return self.model(self.seen, last_only=True)[:, -1]
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


def _hf_context_length(model: torch.nn.Module) -> int | None:
    """A wrapped transformers model's window (`llmctl.loading.TransformersLM`), else None."""
    config = getattr(getattr(model, "hf", None), "config", None)
    if config is None:
        return None
    from llmctl.loading import _context_length

    return _context_length(config)
