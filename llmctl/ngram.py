"""Counts mixed into the model's predictions: n-grams of the training text, and of the window.

A network trained for minutes on a megabyte of text is short of data more than of compute:
past a few passes its held-out loss stops falling, and what it has not learned it cannot
guess. Two count-based predictors, as old as language modelling, know some of it for free:

- **The training text's n-grams** (`model.ngram_order`, weight `model.ngram_weight`):
  interpolated absolute discounting (Ney, Essen & Kneser, 1994; Chen & Goodman, 1998),
  p(w | c) = max(N(c, w) - d, 0) / N(c) + d * U(c) / N(c) * p(w | shorter c), from the longest
  context the text has seen down to a unigram. The unigram mixes Kneser-Ney continuation
  counts (how many different tokens precede w) with a Zipf prior over token ids, 1 / (id + 1000):
  BPE ids follow merge order, roughly frequency, so a token the training text never used still
  gets the probability its rank suggests instead of the ~nothing a network gives it.
- **The window's own n-grams** (`model.cache_weight`): what followed the earlier occurrences of
  the current two tokens in the window, or else of the current token (a cache model, Kuhn &
  De Mori, 1990; the "induction" rule). Articles repeat their rare names and phrases.

    p(w) = (1 - a - b_t) p_model(w) + a p_ngram(w) + b_t p_cache(w)

with b_t = b where the window holds an earlier occurrence of the current token, 0 elsewhere.
Each part is a distribution over the vocabulary, so the mixture is one too: losses,
perplexity and bits per byte keep their meaning, and nothing is learned from the text scored.

The mixture applies at inference only (`llmctl.inference`), never to the training loss: the
counts hold the very text being trained on, and a network trained next to them would learn to
lean on counts that are exact only on its training text. The weights are fixed numbers chosen
on held-out text (benchmarks/RESULTS.md). Checkpoints carry the tables under "counts"; their
sizes come from the text, and loading takes whatever sizes the checkpoint has.

Shapes: B batch, Q query positions, S window slots, V vocab, K = order - 1 context tokens.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from llmctl.window import QUERY_CHUNK, WindowView

if TYPE_CHECKING:
    from llmctl.config import ModelConfig

DISCOUNT = 0.8  # absolute discount d; 0.75-0.9 scored alike on held-out text
NOVEL_SHARE = 0.5  # the unigram's share given to the Zipf prior over ids (0.4-0.6 alike)
ZIPF_OFFSET = 1000  # prior(id) ~ 1 / (id + offset): flat over the first ~1000 ids (bytes, common words)
MAX_COUNTED_TOKENS = 100_000_000  # np.unique over more would need tens of GB; the first 100M suffice


def _lookup(sorted_keys: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each query in sorted_keys (clamped) and whether it is there."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(query), torch.zeros_like(query, dtype=torch.bool)
    index = torch.searchsorted(sorted_keys, query).clamp(max=sorted_keys.numel() - 1)
    return index, sorted_keys[index] == query


def counts_for(cfg: "ModelConfig") -> "CountMixture | None":
    """The (empty) counts a model config asks for, or None."""
    if not (cfg.ngram_order or cfg.cache_weight):
        return None
    return CountMixture(cfg.vocab_size, cfg.ngram_order, cfg.ngram_weight, cfg.cache_weight)


def load_counts(cfg: "ModelConfig", model_state: dict[str, torch.Tensor],
                saved: dict[str, torch.Tensor] | None) -> "CountMixture | None":
    """The counts a checkpoint carries (`saved`, its "counts" entry), or None when its config
    asks for none. Checkpoints from before the counts left the model keep them in the model's
    state as "counts.*": those keys are taken out of `model_state` here."""
    legacy = {k.removeprefix("counts."): model_state.pop(k) for k in list(model_state) if k.startswith("counts.")}
    counts = counts_for(cfg)
    if counts is not None:
        counts.load_state_dict(saved if saved is not None else legacy)
    return counts


class CountMixture(nn.Module):
    def __init__(self, vocab_size: int, order: int, ngram_weight: float, cache_weight: float):
        super().__init__()
        if order and vocab_size ** order >= 2 ** 63:
            raise ValueError(f"an order-{order} n-gram over {vocab_size} ids does not fit a 64-bit key")
        self.vocab_size, self.order = vocab_size, order
        self.ngram_weight = ngram_weight if order else 0.0
        self.cache_weight = cache_weight
        # Unigram counts: continuation counts for order >= 2, plain counts for order 1.
        self.register_buffer("unigram", torch.zeros(vocab_size if order else 0, dtype=torch.long))
        for k in range(1, max(order, 1)):  # one table per context length k
            self.register_buffer(f"keys{k}", torch.zeros(0, dtype=torch.long))  # sorted (context, w) keys
            self.register_buffer(f"counts{k}", torch.zeros(0, dtype=torch.long))  # N(c, w)
            self.register_buffer(f"contexts{k}", torch.zeros(0, dtype=torch.long))  # sorted context keys
            self.register_buffer(f"totals{k}", torch.zeros(0, dtype=torch.long))  # N(c)
            self.register_buffer(f"types{k}", torch.zeros(0, dtype=torch.long))  # U(c)

    # ------------------------------------------------------------------ counting

    def fit(self, tokens: np.ndarray) -> int:
        """Count the n-grams of a token stream (its first MAX_COUNTED_TOKENS); returns how many were read."""
        if not self.order:
            return 0
        V = self.vocab_size
        t = np.asarray(tokens[:MAX_COUNTED_TOKENS], dtype=np.int64)
        device = self.unigram.device
        if self.order == 1:
            unigram = np.bincount(t, minlength=V)[:V]
        for k in range(1, self.order):
            n = len(t) - k
            key = np.zeros(max(n, 0), dtype=np.int64)
            for m in range(k + 1):  # oldest context token first, the next token last
                key = key * V + t[m: m + n]
            keys, counts = np.unique(key, return_counts=True)
            contexts, first, types = np.unique(keys // V, return_index=True, return_counts=True)
            totals = np.add.reduceat(counts, first) if len(keys) else np.zeros(0, dtype=np.int64)
            if k == 1:  # continuation counts: how many different tokens precede w
                unigram = np.bincount(keys % V, minlength=V)[:V]
            for name, array in (("keys", keys), ("counts", counts), ("contexts", contexts),
                                ("totals", totals), ("types", types)):
                setattr(self, f"{name}{k}", torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device))
        self.unigram = torch.from_numpy(unigram.astype(np.int64)).to(device)
        return len(t)

    def without_cache(self) -> "CountMixture":
        """The same tables with the window cache's part off (its weight back to the network)."""
        view = copy.copy(self)  # shares the tables
        view.cache_weight = 0.0
        return view

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 (torch's hook)
        # Table sizes come from the text counted: take the checkpoint's before copying into them.
        for name, buffer in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if buffer is not None and saved is not None and saved.shape != buffer.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buffer.dtype, device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ the n-gram model

    def _unigram_probs(self) -> torch.Tensor:
        """(V,) fp64: counted unigram mixed with the Zipf prior over ids."""
        ids = torch.arange(self.vocab_size, dtype=torch.float64, device=self.unigram.device)
        prior = 1.0 / (ids + ZIPF_OFFSET)
        prior = prior / prior.sum()
        counts = self.unigram.double()
        if counts.sum() == 0:
            return prior
        return (1 - NOVEL_SHARE) * counts / counts.sum() + NOVEL_SHARE * prior

    def _context(self, history: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key of the last k tokens (..., ) from history (..., K) = (x_t, x_{t-1}, ...), and
        whether all k exist."""
        recent = history[..., :k]
        valid = (recent >= 0).all(-1)
        key = torch.zeros_like(recent[..., 0])
        for m in range(k - 1, -1, -1):  # oldest first, as `fit` encodes them
            key = key * self.vocab_size + recent[..., m].clamp(min=0)
        return key, valid

    def _level(self, k: int) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"{name}{k}") for name in ("keys", "counts", "contexts", "totals", "types"))

    def ngram_target_probs(self, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """p_ngram(target) (B, Q) fp64 from history (B, Q, K) and targets (B, Q)."""
        target = targets.clamp(min=0)
        p = self._unigram_probs()[target]
        for k in range(1, self.order):
            keys, counts, contexts, totals, types = self._level(k)
            context, valid = self._context(history, k)
            c, seen = _lookup(contexts, context)
            seen &= valid
            i, found = _lookup(keys, context * self.vocab_size + target)
            n = torch.where(found & seen, counts[i], 0).double()
            total = totals[c].double().clamp(min=1)
            backed_off = ((n - DISCOUNT).clamp(min=0) + DISCOUNT * types[c].double() * p) / total
            p = torch.where(seen, backed_off, p)
        return p

    def ngram_probs(self, history: torch.Tensor) -> torch.Tensor:
        """The whole distribution p_ngram (B, Q, V) fp64 from history (B, Q, K)."""
        B, Q = history.shape[:2]
        V = self.vocab_size
        flat = history.reshape(B * Q, -1)  # (N, K)
        N = flat.size(0)
        p = self._unigram_probs().expand(N, V).clone()
        for k in range(1, self.order):
            keys, counts, contexts, totals, types = self._level(k)
            context, valid = self._context(flat, k)  # (N,)
            c, seen = _lookup(contexts, context)
            seen &= valid
            total = totals[c].double().clamp(min=1)
            # The context's successors are the contiguous run of keys context*V .. context*V + V - 1.
            lo = torch.searchsorted(keys, context * V)
            hi = torch.searchsorted(keys, (context + 1) * V)
            lengths = torch.where(seen, hi - lo, 0)
            rows = torch.repeat_interleave(torch.arange(N, device=p.device), lengths)
            starts = torch.repeat_interleave(lo - (torch.cumsum(lengths, 0) - lengths), lengths)
            entries = starts + torch.arange(rows.numel(), device=p.device)
            backed_off = p * (DISCOUNT * types[c].double() / total)[:, None]
            mass = (counts[entries].double() - DISCOUNT).clamp(min=0) / total[rows]
            backed_off.index_put_((rows, keys[entries] % V), mass, accumulate=True)
            p = torch.where(seen[:, None], backed_off, p)
        return p.view(B, Q, V)

    # ------------------------------------------------------------------ the window cache

    def _cache_weights(self, view: WindowView) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's weights over the window's keys (B, Q, S), normalised where the current
        token occurred before (then matching the last two tokens where any key does), and the
        token each key offers (B, S): key j offers x_{j+1}."""
        t = view.query_pos[:, None]  # (Q, 1)
        j = view.key_pos[None, :]  # (1, S)
        now = view.token_at(t, t)  # (B, Q, 1): x_t
        before = view.token_at(t - 1, t)  # (B, Q, 1): x_{t-1}
        offered, known = view.offered()  # (B, S), (S,)
        key_token = view.token_at(j, t)  # (B, Q, S): -1 outside the query's window
        key_before = view.token_at(j - 1, t)  # (B, Q, S)
        same = (view.earlier() & known) & (key_token == now) & (now >= 0)  # (B, Q, S)
        same2 = same & (key_before == before) & (before >= 0)
        chosen = torch.where(same2.any(-1, keepdim=True), same2, same).double()
        return chosen / chosen.sum(-1, keepdim=True).clamp(min=1), offered

    # ------------------------------------------------------------------ mixing

    def mix_targets(self, model_log_probs: torch.Tensor, view: WindowView, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) under the mixture (B, Q) fp32, from the model's own log p(target) (B, Q).
        Queries go QUERY_CHUNK at a time: the cache's (B, Q, S) tensors of a long window would
        otherwise take GBs."""
        return torch.cat([self._mix_target_chunk(model_log_probs[:, start: start + QUERY_CHUNK], view.queries(start),
                                                 targets[:, start: start + QUERY_CHUNK])
                          for start in range(0, targets.size(1), QUERY_CHUNK)], dim=1)

    def _mix_target_chunk(self, model_log_probs: torch.Tensor, view: WindowView, targets: torch.Tensor
                          ) -> torch.Tensor:
        a = self.ngram_weight
        p = model_log_probs.double().exp()  # (B, Q)
        mixed = (1 - a) * p + a * self.ngram_target_probs(self.history(view), targets) if a else p
        if self.cache_weight:
            weights, offered = self._cache_weights(view)
            b = self.cache_weight * (weights.sum(-1) > 0).double()  # (B, Q): 0 where the cache is silent
            copied = (weights * (offered[:, None, :] == targets[:, :, None])).sum(-1)
            mixed = mixed - b * p + b * copied
        return mixed.log().float()

    def mix_log_probs(self, model_log_probs: torch.Tensor, view: WindowView) -> torch.Tensor:
        """The mixture's log-probabilities (B, Q, V) fp32 from the model's (B, Q, V), QUERY_CHUNK
        queries at a time (each chunk's fp64 work takes QUERY_CHUNK x V x 8 bytes a tensor)."""
        return torch.cat([self._mix_chunk(model_log_probs[:, start: start + QUERY_CHUNK], view.queries(start))
                          for start in range(0, model_log_probs.size(1), QUERY_CHUNK)], dim=1)

    def _mix_chunk(self, model_log_probs: torch.Tensor, view: WindowView) -> torch.Tensor:
        a = self.ngram_weight
        p = torch.log_softmax(model_log_probs.double(), dim=-1).exp()  # (B, Q, V)
        mixed = (1 - a) * p + a * self.ngram_probs(self.history(view)) if a else p
        if self.cache_weight:
            weights, offered = self._cache_weights(view)
            b = self.cache_weight * (weights.sum(-1, keepdim=True) > 0).double()  # (B, Q, 1)
            index = offered[:, None, :].expand_as(weights)  # (B, Q, S); unknown keys weigh 0
            copied = torch.zeros_like(p).scatter_add_(2, index, weights)
            mixed = mixed - b * p + b * copied
        return mixed.log().float()

    def history(self, view: WindowView) -> torch.Tensor:
        """(B, Q, K): x_t, x_{t-1}, ... for each query, -1 where outside its window."""
        back = torch.arange(max(self.order - 1, 1), device=view.query_pos.device)  # (K,)
        t = view.query_pos[:, None]  # (Q, 1)
        return view.token_at(t - back[None, :], t)

    def extra_repr(self) -> str:
        return (f"order={self.order}, ngram_weight={self.ngram_weight}, cache_weight={self.cache_weight}, "
                f"contexts={[getattr(self, f'contexts{k}').numel() for k in range(1, self.order)]}")

