"""Validation hold-out for a source without its own validation split, computed on shards.

The validation split is the tail of the source's documents holding about
`validation_fraction` of its tokens. When whole documents cannot give that (validation
would take every document, none, or more than twice the target), the token stream itself
is cut at `round(total * (1 - fraction))` instead, so even a single document yields both
splits. The cut is found from the shards' document indexes, read from the last shard
backwards, so it costs one shard index of memory whatever the source size; it turns into
(file, start, stop) segments, so holding out copies no tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class Cut:
    position: int  # first validation token in the source's stream
    train: dict[str, int]  # documents, tokens, bytes
    validation: dict[str, int]


def tail_cut(reversed_lengths: Iterator[np.ndarray], total: int, n_docs: int, fraction: float) -> tuple[int, int | None]:
    """(cut position, validation documents or None for a stream cut).

    `reversed_lengths` yields the document token lengths from the last document backwards,
    a chunk (array) at a time.
    """
    target = fraction * total
    held, n_val, found = 0, 0, False
    for lengths in reversed_lengths:
        if target <= 0 or lengths.size == 0:
            break
        cum = held + np.cumsum(lengths)
        i = int(np.searchsorted(cum, target, side="left"))
        if i < lengths.size:
            held, n_val, found = int(cum[i]), n_val + i + 1, True
            break
        held, n_val = int(cum[-1]), n_val + lengths.size
    if found and 0 < n_val < n_docs and held <= 2 * target + 1:
        return total - held, n_val
    return int(round(total * (1 - fraction))), None


def split_counts(index_of: Callable[[int], np.ndarray], shard_tokens: list[int], cut: int) -> tuple[int, int]:
    """(documents starting before `cut`, UTF-8 bytes before `cut`) over shards in order.

    `index_of(i)` is shard i's (documents, 2) cumulative token and byte ends; a document
    straddling the cut counts with the train side, its bytes shared in proportion to tokens.
    """
    docs, nbytes, offset = 0, 0, 0
    for i, n in enumerate(shard_tokens):
        index = index_of(i)
        if offset + n <= cut:
            docs += len(index)
            nbytes += int(index[-1, 1]) if len(index) else 0
            offset += n
            continue
        local = cut - offset
        token_ends, byte_ends = index[:, 0], index[:, 1]
        j = int(np.searchsorted(token_ends, local, side="right"))  # documents ending at or before the cut
        nbytes += int(byte_ends[j - 1]) if j else 0
        if j < len(index) and local > (token_ends[j - 1] if j else 0):  # a document straddles the cut
            start_tok = int(token_ends[j - 1]) if j else 0
            start_byte = int(byte_ends[j - 1]) if j else 0
            share = (local - start_tok) / (int(token_ends[j]) - start_tok)
            nbytes += int(round(share * (int(byte_ends[j]) - start_byte)))
            j += 1
        return docs + j, nbytes
    return docs, nbytes


def hold_out(index_of: Callable[[int], np.ndarray], shards: list[dict], fraction: float) -> Cut:
    """Where to cut one source's train shards (records with documents/tokens/bytes)."""
    total = sum(s["tokens"] for s in shards)
    n_docs = sum(s["documents"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)

    def reversed_lengths() -> Iterator[np.ndarray]:
        for i in reversed(range(len(shards))):
            ends = index_of(i)[:, 0]
            yield np.diff(ends, prepend=0)[::-1]

    position, val_docs = tail_cut(reversed_lengths(), total, n_docs, fraction)
    train_docs, train_bytes = split_counts(index_of, [s["tokens"] for s in shards], position)
    if val_docs is not None:
        train_docs = n_docs - val_docs
    return Cut(position,
               {"documents": train_docs, "tokens": position, "bytes": train_bytes},
               {"documents": n_docs - train_docs, "tokens": total - position, "bytes": total_bytes - train_bytes})


def segments(shards: list[dict], cut: int) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """(train, validation) lists of (shard name, start, stop) token ranges around `cut`."""
    train, validation, offset = [], [], 0
    for s in shards:
        n = s["tokens"]
        local = min(max(cut - offset, 0), n)
        if local > 0:
            train.append((s["name"], 0, local))
        if local < n:
            validation.append((s["name"], local, n))
        offset += n
    return train, validation
