"""A copy pointer: the model may predict the next token by pointing at an earlier one in its context.

Text repeats itself: an article names its subject, its people and its places again and again,
and many of those words are rare. A small model trained on little text gives a rare or unseen
token almost no probability, however often the context has just used it, and a plain
transformer learns to copy from its context (induction heads) only after far more steps than a
laptop CPU makes in minutes. The pointer gives it that ability from the first step: a
pointer-sentinel mixture (Merity et al., 2016, "Pointer Sentinel Mixture Models"; Grave et al.,
2017, "Improving Neural Language Models with a Continuous Cache").

At position t, with final hidden states h (after the last norm), one attention head scores every
earlier position j < t of the window: s_tj = q(h_t) . k(h_j) / sqrt(D), "was the context before
x_{j+1} like mine?". A sentinel logit g(h_t) joins the same softmax. The next-token distribution is

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

POINTER_DIM = 64  # width of the pointer's queries and keys
# "Impossible" as a finite log-weight: a row with nothing to point at would make logsumexp
# return -inf and its backward NaN (exp(-inf - -inf)); -1e30 gives weight 0 and a zero gradient.
NEVER = -1e30


def offered_tokens(idx: torch.Tensor) -> torch.Tensor:
    """(B, T): the token key j offers, x_{j+1} (the input at j + 1); -1 for the last position,
    whose next token is not known yet."""
    return torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1)


def earlier_positions(T: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool: query t may point at key j when j < t."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril(-1)


class CopyPointer(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.query = nn.Linear(d_model, POINTER_DIM, bias=False)
        self.key = nn.Linear(d_model, POINTER_DIM, bias=False)
        # Sentinel logit w . h_t + b; the bias starts high so the untrained model trusts its
        # vocabulary (a_sentinel ~ 0.95 against a handful of earlier positions) and learns to point.
        self.sentinel = nn.Linear(d_model, 1, bias=True)
        nn.init.zeros_(self.sentinel.weight)
        nn.init.constant_(self.sentinel.bias, 3.0)

    def scores(self, h_query: torch.Tensor, h_keys: torch.Tensor, visible: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-weights in fp32: pointer (B, T, S), ~NEVER where `visible` (T, S) or (B, T, S) is
        False, and the sentinel (B, T), normalised together over the S + 1 entries."""
        q = self.query(h_query).float()  # (B, T, D)
        k = self.key(h_keys).float()  # (B, S, D)
        point = (q @ k.transpose(1, 2)) * (1.0 / math.sqrt(POINTER_DIM))  # (B, T, S)
        point = point.masked_fill(~visible, NEVER)
        sentinel = self.sentinel(h_query).float().squeeze(-1)  # (B, T)
        norm = torch.logaddexp(torch.logsumexp(point, dim=-1), sentinel)  # (B, T)
        return point - norm[..., None], sentinel - norm

    def target_log_probs(self, h: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor,
                         vocab_log_probs: torch.Tensor) -> torch.Tensor:
        """log p(target) under the mixture, (B, T) fp32. h (B, T, C) final hidden states, idx
        (B, T) inputs, targets (B, T), vocab_log_probs (B, T): the vocabulary's log p(target)."""
        point, sentinel = self.scores(h, h, earlier_positions(idx.size(1), idx.device))
        hits = offered_tokens(idx)[:, None, :] == targets[:, :, None]  # (B, T, T): key j offers target t
        copied = torch.logsumexp(point.masked_fill(~hits, NEVER), dim=-1)  # (B, T)
        return torch.logaddexp(sentinel + vocab_log_probs, copied)

    def mix(self, h_query: torch.Tensor, h_keys: torch.Tensor, offered: torch.Tensor, visible: torch.Tensor,
            logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the whole mixture, (B, T, V) fp32: usable as logits (their softmax
        is the mixture). h_query (B, T, C), h_keys (B, S, C), offered (B, S) the token each key
        offers (ignored where not visible), visible (T, S) or (B, T, S), logits (B, T, V)."""
        point, sentinel = self.scores(h_query, h_keys, visible)
        probs = point.exp()  # (B, T, S), 0 where not visible
        copy = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        index = offered.clamp(min=0)[:, None, :].expand_as(probs)  # (B, T, S)
        copy.scatter_add_(2, index, probs)
        vocab = torch.log_softmax(logits.float(), dim=-1) + sentinel[..., None]
        return torch.logaddexp(vocab, copy.log())
