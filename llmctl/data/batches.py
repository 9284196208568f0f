"""Batches from a packed token stream.

Training draws random windows of `seq_len + 1` tokens (inputs and their next-token
targets) from the memory-mapped stream with an explicit `torch.Generator`, so the data
order is a pure function of the seed and resumes exactly from the generator's state.
The stream may be a `TokenView` over many shards: a window that crosses a shard boundary
is read from both. With `data.weights`, each window first picks a source with those
probabilities, then a start uniformly inside that source's range, so a small corpus can be
seen as often as a large one (sources are otherwise sampled in proportion to their size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch


class RandomWindows:
    """Endless (x, y) batches of shape (B, T) drawn uniformly from a token stream, or, with
    `weights`, from `ranges` [(start, stop), ...] of it picked with those probabilities."""

    def __init__(self, tokens: Any, seq_len: int, batch_size: int, seed: int,
                 ranges: Sequence[tuple[int, int]] | None = None, weights: Sequence[float] | None = None):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} training tokens are fewer than one window of {seq_len + 1}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.weighted = bool(weights)
        if self.weighted:
            if ranges is None or len(ranges) != len(weights):
                raise ValueError("weights need one (start, stop) range each")
            for (lo, hi), w in zip(ranges, weights):
                if w > 0 and hi - lo < seq_len + 1:
                    raise ValueError(f"a source with weight {w} has {hi - lo} training tokens, fewer than "
                                     f"one window of {seq_len + 1}")
            self.weights = torch.tensor(list(weights), dtype=torch.float64)
            self.lows = torch.tensor([lo for lo, _ in ranges], dtype=torch.int64)
            self.spans = torch.tensor([max(hi - lo - seq_len, 1) for lo, hi in ranges], dtype=torch.int64)

    def _starts(self) -> torch.Tensor:
        if not self.weighted:
            return torch.randint(0, len(self.tokens) - self.seq_len, (self.batch_size,), generator=self.generator)
        source = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)  # (B,)
        u = torch.rand(self.batch_size, generator=self.generator, dtype=torch.float64)  # (B,)
        offset = (u * self.spans[source]).long().clamp_max(self.spans[source] - 1)
        return self.lows[source] + offset

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._starts()
        windows = np.stack([self.tokens[s: s + self.seq_len + 1] for s in starts.tolist()])
        windows = torch.from_numpy(windows.astype(np.int64))  # (B, T + 1)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def training_windows(store: Any, weights: Sequence[float], seq_len: int, batch_size: int,
                     seed: int) -> RandomWindows:
    """The trainer's batch source over a token store's train split (`data.weights` applied)."""
    from llmctl.errors import LlmctlError

    tokens = store.tokens("train")
    try:
        if weights:
            return RandomWindows(tokens, seq_len, batch_size, seed, store.source_ranges("train"), weights)
        return RandomWindows(tokens, seq_len, batch_size, seed)
    except ValueError as e:
        raise LlmctlError(f"{e}; add data or lower model.max_seq_len") from None


class BatchSource(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class RankShard:
    """This rank's share of every optimizer step's global batch.

    Every rank draws the same sequence of micro-batches from an identically seeded source and
    keeps every world_size-th one, so the union over ranks of one step's micro-batches is
    exactly what a single process draws for that step with full accumulation: the global
    batch, and so the loss curve, does not depend on the world size. The skipped draws cost
    index arithmetic and a small copy; compute dominates."""

    def __init__(self, inner: BatchSource, rank: int, world_size: int):
        self.inner, self.rank, self.world_size = inner, rank, world_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        mine = None
        for r in range(self.world_size):
            batch = self.inner.next_batch()
            if r == self.rank:
                mine = batch
        return mine

    def state_dict(self) -> dict:
        return self.inner.state_dict()  # identical on every rank

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
