"""A copy pointer: the model may predict the next token by pointing at an earlier one in its context.

Text repeats itself: an article names its subject, its people and its places again and again,
and many of those words are rare. A small model trained on little text gives a rare or unseen
token almost no probability, however often the context has just used it, and a plain
transformer learns to copy from its context (induction heads) only after far more steps than a
laptop CPU makes in minutes. The pointer gives it that ability from the first step: a
pointer-sentinel mixture (Merity et al., 2016, "Pointer Sentinel Mixture Models"; Grave et al.,
2017, "Improving Neural Language Models with a Continuous Cache").

At position t, with final hidden states h (after the last norm) and input embeddings e, one
attention head scores every earlier position j < t of the window:
s_tj = q(h_t, e_t) . k(h_j, e_j) / sqrt(D), "was the context before x_{j+1} like mine?" (the
token terms make "was x_j my token?" part of it from the start). A sentinel logit g(h_t) joins
the same softmax. The next-token distribution is

    p(w | x_<=t) = a_sentinel * p_vocab(w) + sum over j < t with x_{j+1} = w of a_j

a proper distribution (the weights sum to one, and so does p_vocab), so losses, perplexity and
bits per byte keep their meaning. It only reads the window the transformer reads: nothing is
learned from the text being scored. The cost is one (T, T) score matrix per sequence.

Shapes: B batch, T positions, S positions visible (T in training), D = `POINTER_DIM`, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

POINTER_DIM = 64  # width of the pointer's queries and keys
# "Impossible" as a finite log-weight: a row with nothing to point at would make logsumexp
# return -inf and its backward NaN (exp(-inf - -inf)); -1e30 gives weight 0 and a zero gradient.
NEVER = -1e30


class CopyPointer(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.query = nn.Linear(d_model, POINTER_DIM, bias=False)
        self.key = nn.Linear(d_model, POINTER_DIM, bias=False)
        # One projection of the (RMS-normalised) input embedding added to both queries and
        # keys: its square (U e_t) . (U e_j) is largest when x_t = x_j, so from the first step
        # the pointer prefers the positions right after earlier occurrences of the current
        # token (what an induction head learns), even for a token training never showed.
        self.token = nn.Linear(d_model, POINTER_DIM, bias=False)
        self.d_model = d_model
        # Sentinel logit w . h_t + b; the bias starts high so the untrained model trusts its
        # vocabulary (a_sentinel ~ 0.95 against a handful of earlier positions) and learns to point.
        self.sentinel = nn.Linear(d_model, 1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token.weight, std=1.0 / math.sqrt(self.d_model))  # |U e| ~ sqrt(D)
        nn.init.zeros_(self.sentinel.weight)
        nn.init.constant_(self.sentinel.bias, 3.0)

    def _identity(self, emb: torch.Tensor) -> torch.Tensor:
        return self.token(F.rms_norm(emb, (emb.size(-1),)))

    def queries(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, T, D) fp32 from final hidden states h and input embeddings emb, both (B, T, C)."""
        return (self.query(h) + self._identity(emb)).float()

    def keys(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, S, D) fp32: key j describes position j, whose next token x_{j+1} it offers."""
        return (self.key(h) + self._identity(emb)).float()

    def scores(self, h_query: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-weights in fp32: pointer (B, T, S), ~NEVER where `visible` (T, S) or (B, T, S) is
        False, and the sentinel (B, T), normalised together over the S + 1 entries."""
        point = (queries @ keys.transpose(1, 2)) * (1.0 / math.sqrt(POINTER_DIM))  # (B, T, S)
        point = point.masked_fill(~visible, NEVER)
        sentinel = self.sentinel(h_query).float().squeeze(-1)  # (B, T)
        norm = torch.logaddexp(torch.logsumexp(point, dim=-1), sentinel)  # (B, T)
        return point - norm[..., None], sentinel - norm

    def target_log_probs(self, h: torch.Tensor, emb: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor,
                         vocab_log_probs: torch.Tensor) -> torch.Tensor:
        """log p(target) under the mixture, (B, T) fp32. h (B, T, C) final hidden states, emb
        (B, T, C) input embeddings, idx (B, T) inputs, targets (B, T), vocab_log_probs (B, T):
        the vocabulary's log p(target)."""
        T = idx.size(1)
        # Key j offers token x_{j+1}, the input at j + 1 (j <= T - 2; for j = T - 1 it is not known yet).
        offered = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1)  # (B, T)
        earlier = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril(-1)  # j < t
        point, sentinel = self.scores(h, self.queries(h, emb), self.keys(h, emb), earlier)
        hits = offered[:, None, :] == targets[:, :, None]  # (B, T, T): key j offers target t
        copied = torch.logsumexp(point.masked_fill(~hits, NEVER), dim=-1)  # (B, T)
        return torch.logaddexp(sentinel + vocab_log_probs, copied)

    def mix(self, h_query: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, offered: torch.Tensor,
            visible: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the whole mixture, (B, T, V) fp32: usable as logits (their softmax
        is the mixture). h_query (B, T, C), queries (B, T, D), keys (B, S, D), offered (B, S) the
        token each key offers (ignored where not visible), visible (T, S) or (B, T, S), logits (B, T, V)."""
        point, sentinel = self.scores(h_query, queries, keys, visible)
        probs = point.exp()  # (B, T, S), 0 where not visible
        copy = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        index = offered.clamp(min=0)[:, None, :].expand_as(probs)  # (B, T, S)
        copy.scatter_add_(2, index, probs)
        vocab = torch.log_softmax(logits.float(), dim=-1) + sentinel[..., None]
        return torch.logaddexp(vocab, copy.log())
