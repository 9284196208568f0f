"""A window of token ids as the output's mixtures read it: a training window, or a generation's ring.

The copy pointer and the window cache both read which tokens sit at which positions of the
window: a training window is slot = position; generation keeps the last L inputs (and, for
the pointer, their final hidden states) in a ring of L slots, as the KV cache does with keys
and values, so a query at position t sees positions t - L < j < t either way.

Shapes: B batch, Q query positions, S window slots, C d_model.
"""

from __future__ import annotations

import torch

QUERY_CHUNK = 1024  # queries scored at once against the window


class WindowView:
    """Where a window's tokens are: ids (B, S) in slots whose absolute positions are key_pos (S,)
    (-1 = empty), read by queries at absolute positions query_pos (Q,) that see their last
    `window` positions. A training window is slot = position; a generation's KV cache is a ring."""

    def __init__(self, ids: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor, window: int):
        self.ids, self.key_pos, self.query_pos, self.window = ids, key_pos, query_pos, window

    @classmethod
    def of_sequence(cls, idx: torch.Tensor, queries: int, window: int) -> "WindowView":
        """The last `queries` positions of idx (B, T), slot = position."""
        T = idx.size(1)
        positions = torch.arange(T, device=idx.device)
        return cls(idx, positions, positions[T - queries:], window)

    def queries(self, start: int, count: int = QUERY_CHUNK) -> "WindowView":
        """The same window read by queries start .. start + count - 1 of this view's."""
        return WindowView(self.ids, self.key_pos, self.query_pos[start: start + count], self.window)

    def offered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The token each key j offers, x_{j+1} (B, S), and whether it is known (S,): the slot
        after j's holds position j + 1 (in a ring it may hold an older or no token)."""
        following = (self.key_pos + 1).remainder(self.key_pos.numel())
        known = (self.key_pos >= 0) & (self.key_pos[following] == self.key_pos + 1)
        return self.ids[:, following], known

    def earlier(self) -> torch.Tensor:
        """(Q, S): key j is before query t and inside its window, t - window < j < t."""
        t, j = self.query_pos[:, None], self.key_pos[None, :]
        return (j >= 0) & (j < t) & (j > t - self.window)

    def token_at(self, pos: torch.Tensor, reader_pos: torch.Tensor) -> torch.Tensor:
        """Ids at absolute positions pos (broadcast with reader_pos), -1 where the slot does not
        hold that position or it is outside the reader's window. Shapes: pos (..., X) -> (B, ..., X)."""
        S = self.key_pos.numel()
        slot = pos.remainder(S)
        present = (pos >= 0) & (self.key_pos[slot] == pos) & (pos > reader_pos - self.window)
        return torch.where(present, self.ids[:, slot], -1)


class WindowRing:
    """A generation's last `size` input ids (B, S) and, when a copy pointer reads them, their
    final hidden states (B, S, C), each in slot position % size."""

    def __init__(self, size: int):
        self.size = size
        self.pos = 0  # tokens seen so far = absolute position of the next token
        self.slot_pos: torch.Tensor | None = None  # (S,) each slot's absolute position, -1 = empty
        self.ids: torch.Tensor | None = None  # (B, S)
        self.hidden: torch.Tensor | None = None  # (B, S, C)

    def push(self, idx: torch.Tensor) -> torch.Tensor:
        """Store the inputs idx (B, T) that follow those seen (T <= size); returns their
        absolute positions (T,)."""
        B, T = idx.shape
        if self.ids is None:
            self.ids = torch.zeros(B, self.size, dtype=torch.long, device=idx.device)
            self.slot_pos = torch.full((self.size,), -1, dtype=torch.long, device=idx.device)
        positions = torch.arange(self.pos, self.pos + T, device=idx.device)  # (T,)
        self.ids[:, positions % self.size] = idx
        self.slot_pos[positions % self.size] = positions
        self.pos += T
        return positions

    def push_hidden(self, h: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the final hidden states h (B, T, C) of the inputs at `positions` (T,)."""
        if self.hidden is None:
            self.hidden = torch.zeros(h.size(0), self.size, h.size(2), dtype=h.dtype, device=h.device)
        self.hidden[:, positions % self.size] = h.to(self.hidden.dtype)

    def view(self, query_pos: torch.Tensor) -> WindowView:
        """The ring as seen by queries at absolute positions query_pos (Q,)."""
        return WindowView(self.ids, self.slot_pos, query_pos, self.size)
