"""Held-out loss, perplexity and bits per byte: one implementation for the trainer's periodic
eval and `llmctl eval`.

Scoring. A token stream (the memory-mapped validation split, or documents tokenized on the
fly) is cut into windows of `seq_len` inputs. Every token after the first is scored exactly
once: with the default stride (= seq_len) the windows are disjoint, each token seeing the
tokens before it in its own window; with a smaller `stride` S the windows slide by S and
only their last S targets are scored, so each of those sees at least seq_len - S tokens of
context (the transformers perplexity guide's method; slower by seq_len / S). The loss is
summed over scored tokens and divided once at the end, so it is the exact mean token loss
whatever the batch size; perplexity = exp(mean loss). Windows are batched and the stream is
read chunk by chunk, so memory is bounded by the batch, not the dataset.

Bits per byte = total loss in nats / ln 2 / UTF-8 bytes of the text evaluated. It does not
depend on the tokenizer, so models with different vocabularies compare on the same text.
The bytes are those of every document evaluated plus one per end-of-text token: documents
are joined by EOS (as in training), the model is scored on predicting those boundaries,
and each counts as one byte, like the newline that ends a line. For the validation split
the documents' text is recovered by decoding the stored tokens.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from llmctl.cross_entropy import IGNORE_INDEX
from llmctl.data.batches import pad_batch
from llmctl.errors import ConfigError, LlmctlError

if TYPE_CHECKING:
    from llmctl.data.tokenizer import TextTokenizer
    from llmctl.loading import LoadedModel
    from llmctl.ngram import CountMixture
    from llmctl.runtime import DistInfo

CHUNK_TOKENS = 1 << 20  # tokens read from a memory-mapped split at a time
ENCODE_BATCH = 256  # documents per call into the Rust tokenizer


# --------------------------------------------------------------------------- windows

def _chunks(tokens: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(tokens, np.ndarray):
        for i in range(0, len(tokens), CHUNK_TOKENS):
            yield np.asarray(tokens[i: i + CHUNK_TOKENS])
    else:
        yield from tokens


def scored_windows(tokens: np.ndarray | Iterable[np.ndarray], seq_len: int, stride: int = 0,
                   max_tokens: int = 0) -> Iterator[tuple[np.ndarray, int]]:
    """(window, n_scored) over a token stream: window holds up to seq_len + 1 tokens (inputs
    and their next-token targets); only its last n_scored targets are new. Windows start at
    0, S, 2S, ...; the last one may be shorter. `max_tokens` > 0 stops after that many targets."""
    stride = stride or seq_len
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride {stride} must be in 1..{seq_len}")
    buf = np.empty(0, dtype=np.int64)
    offset = 0  # absolute index of buf[0]
    start = 0  # absolute index of the next window's first token
    scored = 0  # targets 1..scored are done (token 0 is never a target)
    seen = 0
    limit = max_tokens + 1 if max_tokens else None
    for chunk in _chunks(tokens):
        if limit is not None:
            chunk = chunk[: max(0, limit - seen)]
        seen += len(chunk)
        buf = np.concatenate([buf[start - offset:], chunk.astype(np.int64)])
        offset = start
        while offset + len(buf) >= start + seq_len + 1:  # a full window is available
            end = start + seq_len  # index of its last target
            yield buf[start - offset: end + 1 - offset], end - scored
            scored = end
            start += stride
        if limit is not None and seen >= limit:
            break
    total = offset + len(buf)
    if total - 1 > scored:  # the tail: a shorter window whose remaining targets are new
        yield buf[start - offset:], total - 1 - scored


def _window_groups(windows: Iterator[tuple[np.ndarray, int]], batch_size: int
                   ) -> Iterator[list[tuple[np.ndarray, int]]]:
    """Windows grouped into batches of up to batch_size equal-length windows. Only the last
    window can be shorter, and it comes in a group of its own."""
    pending: list[tuple[np.ndarray, int]] = []
    for win, n_scored in windows:
        if pending and len(win) != len(pending[0][0]):
            yield pending
            pending = []
        pending.append((win, n_scored))
        if len(pending) == batch_size:
            yield pending
            pending = []
    if pending:
        yield pending


def _window_batch(group: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (B, T); targets already scored by an earlier window are -100 (ignored)."""
    w = torch.from_numpy(np.stack([win for win, _ in group]))  # (B, T + 1)
    x, y = w[:, :-1], w[:, 1:].clone()
    for row, (win, n_scored) in enumerate(group):
        y[row, : len(win) - 1 - n_scored] = IGNORE_INDEX
    return x, y


def dummy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, 1) batch whose one target is ignored: a forward pass that scores nothing."""
    return torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), IGNORE_INDEX, dtype=torch.long)


Group = TypeVar("Group")


def rank_share(groups: Iterable[Group], rank: int = 0, world_size: int = 1) -> Iterator[Group | None]:
    """Batch i of the stream goes to rank i % world_size; then None (a dummy batch to run)
    until this rank has as many as every other, ceil(n / world_size).

    Equal counts matter under FSDP: every forward all-gathers each block's shards, a
    collective, so a rank with one forward more than the others would wait forever. Every
    rank reads the same stream, so each knows n without communicating."""
    n, mine = 0, 0
    for i, group in enumerate(groups):
        n = i + 1
        if i % world_size == rank:
            mine += 1
            yield group
    for _ in range(-(-n // world_size) - mine):  # at most one
        yield None


def rank_batches(windows: Iterator[tuple[np.ndarray, int]], batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's (x, y) batches of a window stream (see rank_share): every rank gets the
    same number of batches, a rank short of one a dummy_batch(), and over all ranks every
    scored target is in exactly one batch. Only this rank's batches are stacked."""
    for group in rank_share(_window_groups(windows, batch_size), rank, world_size):
        yield dummy_batch() if group is None else _window_batch(group)


@torch.no_grad()
def evaluate_tokens(model: torch.nn.Module, tokens: np.ndarray | Iterable[np.ndarray], seq_len: int,
                    batch_size: int, device: torch.device,
                    autocast: contextlib.AbstractContextManager | None = None,
                    max_tokens: int = 0, stride: int = 0, dist: "DistInfo | None" = None,
                    counts: "CountMixture | None" = None) -> dict[str, Any]:
    """Mean next-token loss over a token stream (an array, or an iterable of arrays), or over
    its first `max_tokens` targets. `model(x, y, reduction="sum")` must return the summed
    cross-entropy of the targets that are not -100 (llmctl's Transformer does). With
    `counts`, the result's "mixture" holds the same scores for the network mixed with them
    (`llmctl.inference.Predictor.score`: one forward gives both).

    With `dist` (a torchrun job), rank r scores batches r, r + world, ... (every rank runs
    the same number of forwards, see rank_share) and the sums are added over ranks, so every
    rank returns the same numbers as one process would."""
    windows = scored_windows(tokens, seq_len, stride, max_tokens)
    rank, world = (dist.rank, dist.world_size) if dist is not None and dist.enabled else (0, 1)
    return _score_batches(model, counts, rank_batches(windows, batch_size, rank, world), device, autocast, dist)


def _score_batches(model: torch.nn.Module, counts: "CountMixture | None",
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                   autocast: contextlib.AbstractContextManager | None, dist: "DistInfo | None") -> dict[str, Any]:
    """Scores summed over (x, y) batches, (B, T) each, and over ranks, divided once."""
    from llmctl.inference import Predictor

    predictor = Predictor(model, counts)
    was_training = model.training
    model.eval()
    totals = [0.0, 0.0, 0.0]  # network loss, mixture loss, scored targets
    start = time.perf_counter()
    try:
        for x, y in batches:
            scored = int((y != IGNORE_INDEX).sum())  # counted on the CPU: no extra device sync
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast or contextlib.nullcontext():
                network, mixture = predictor.score(x, y)
            if scored:  # a dummy batch only keeps this rank in step with the others
                totals[0] += float(network)
                totals[1] += float(mixture) if mixture is not None else 0.0
                totals[2] += scored
    finally:
        model.train(was_training)
    if dist is not None and dist.enabled:
        from llmctl.runtime import all_ranks_sum

        totals = all_ranks_sum(torch.tensor(totals, dtype=torch.float64), dist).tolist()
    tokens = int(totals[2])
    result: dict[str, Any] = {**_mean(totals[0], tokens), "tokens": tokens, "seconds": time.perf_counter() - start}
    if counts is not None:
        result["mixture"] = _mean(totals[1], tokens)
    return result


def _mean(loss_sum: float, tokens: int) -> dict[str, float]:
    mean = loss_sum / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "loss_sum": loss_sum}


@torch.no_grad()
def evaluate_examples(model: torch.nn.Module, examples: list[Any], batch_size: int, device: torch.device,
                      autocast: contextlib.AbstractContextManager | None = None, pad_id: int = 0,
                      max_tokens: int = 0, dist: "DistInfo | None" = None,
                      counts: "CountMixture | None" = None) -> dict[str, Any]:
    """Response-only loss over SFT examples (`llmctl.data.batches.Example`): the summed loss of
    every target that is not IGNORE_INDEX (reply tokens and their end-of-text; prompt and padding
    targets are -100) divided once by their count, so it is exact whatever the batching.
    Examples are batched by length to waste little on padding; `max_tokens` > 0 stops after
    the example that reaches that many scored targets. Same result keys as evaluate_tokens
    (with `counts`, "mixture" too).

    With `dist`, the batches are dealt to ranks as in evaluate_tokens (same forward count on
    every rank) and the sums added over ranks."""
    chosen, counted = [], 0
    for example in examples:
        if max_tokens and counted >= max_tokens:
            break
        chosen.append(example)
        counted += sum(label != IGNORE_INDEX for label in example.labels)
    chosen.sort(key=lambda e: len(e.input_ids))
    rank, world = (dist.rank, dist.world_size) if dist is not None and dist.enabled else (0, 1)
    groups = (chosen[i: i + batch_size] for i in range(0, len(chosen), batch_size))
    batches = (dummy_batch() if group is None else pad_batch(group, pad_id)  # (B, T_max), padding IGNORE_INDEX
               for group in rank_share(groups, rank, world))
    return _score_batches(model, counts, batches, device, autocast, dist)


def response_bytes(examples: list[Any], tokenizer: "TextTokenizer", max_tokens: int = 0) -> int:
    """UTF-8 bytes of the scored reply tokens of SFT examples (each end-of-text counts as one
    byte, as in `stream_bytes`), for bits per byte of a response-only loss; `max_tokens` picks
    the same examples as evaluate_examples."""
    total, counted = 0, 0
    for example in examples:
        if max_tokens and counted >= max_tokens:
            break
        ids = [t for t in example.labels if t != IGNORE_INDEX]
        counted += len(ids)
        eos = sum(t == tokenizer.eos_id for t in ids)
        total += eos + len(tokenizer.decode([t for t in ids if t != tokenizer.eos_id]).encode("utf-8"))
    return total


# --------------------------------------------------------------------------- text and bytes

@dataclass
class ByteCount:
    bytes: int = 0
    documents: int = 0


def document_tokens(docs: Iterable[str], tokenizer: "TextTokenizer", count: ByteCount) -> Iterator[np.ndarray]:
    """Each document's ids followed by EOS (packed as in training), counting UTF-8 bytes as it goes."""
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        for doc, ids in zip(batch, tokenizer.encode_batch(batch)):
            count.bytes += len(doc.encode("utf-8")) + 1  # the text, and its end-of-text as one byte
            count.documents += 1
            yield np.asarray([*ids, tokenizer.eos_id], dtype=np.int64)
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= ENCODE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def stream_bytes(tokens: np.ndarray, tokenizer: "TextTokenizer") -> int:
    """UTF-8 bytes a packed token stream stands for: each EOS-separated document decoded,
    plus one byte per EOS. Read chunk by chunk; a document cut by a chunk is carried over."""
    total = 0
    carry = np.empty(0, dtype=np.int64)
    for chunk in _chunks(tokens):
        ids = np.concatenate([carry, chunk.astype(np.int64)])
        eos = np.flatnonzero(ids == tokenizer.eos_id)
        bounds = [-1, *eos.tolist()]
        docs = [ids[a + 1: b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
        total += len(eos) + sum(len(t.encode("utf-8")) for t in _decode_many(tokenizer, docs))
        carry = ids[bounds[-1] + 1:]
    if len(carry):
        total += len(_decode_many(tokenizer, [carry.tolist()])[0].encode("utf-8"))
    return total


def _decode_many(tokenizer: "TextTokenizer", docs: list[list[int]]) -> list[str]:
    backend = tokenizer.backend
    if hasattr(backend, "decode_batch"):
        return backend.decode_batch(docs, skip_special_tokens=False)
    return [tokenizer.decode(d) for d in docs]


# --------------------------------------------------------------------------- `llmctl eval`

def bits_per_byte(loss_sum: float, n_bytes: int) -> float:
    return loss_sum / math.log(2) / n_bytes if n_bytes else float("nan")


def run_eval(checkpoint: str, datasets: list[str] | None = None, stride: int = 0, batch_size: int = 0,
             device: str = "auto", dtype: str = "float32") -> dict[str, Any]:
    """`llmctl eval`: check the options, load the model, score it on each dataset."""
    from llmctl.data.sources import parse_spec
    from llmctl.loading import load_model

    if stride < 0:
        raise ConfigError(f"--stride {stride} must be >= 0 (0 = the context length: disjoint windows)")
    if batch_size < 0:
        raise ConfigError(f"--batch-size {batch_size} must be >= 0 (0 = the run's eval batch size)")
    for spec in datasets or []:
        parse_spec(spec)  # a typo fails before the model loads
    return evaluate_model(load_model(checkpoint, device=device, dtype=dtype), datasets, stride, batch_size)


def evaluate_model(loaded: "LoadedModel", datasets: list[str] | None = None, stride: int = 0,
                   batch_size: int = 0) -> dict[str, Any]:
    """Score a loaded model on each data spec (default: the validation split its run trained
    with); one result row per dataset with loss, perplexity, bits per byte, tokens, bytes."""
    from llmctl.runtime import autocast

    seq_len = loaded.context_length
    stride = stride or seq_len
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"--stride {stride} must be between 1 and the context length {seq_len}")
    batch_size = batch_size or loaded.eval_batch_size
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1")

    def score(tokens: np.ndarray | Iterable[np.ndarray]) -> dict[str, Any]:
        return evaluate_tokens(loaded.model, tokens, seq_len, batch_size, loaded.device,
                               autocast(loaded.device, loaded.dtype), stride=stride, counts=loaded.counts)

    rows: dict[str, dict[str, Any]] = {}
    if not datasets:
        name, tokens = "validation", _training_validation(loaded)
        result = score(tokens)
        rows[name] = _row(result, stream_bytes(tokens, loaded.tokenizer))
    else:
        from llmctl.data.sources import iter_documents, parse_spec

        specs = [parse_spec(s) for s in datasets]  # every spec checked before any scoring
        for spec in specs:
            count = ByteCount()
            result = score(document_tokens(_eval_documents(spec, iter_documents), loaded.tokenizer, count))
            if result["tokens"] == 0:
                raise LlmctlError(f"data spec '{spec.raw}' gave fewer than 2 tokens to score; "
                                  f"check that its files are not empty")
            rows[spec.raw] = _row(result, count.bytes)
    return {"checkpoint": loaded.source, "path": str(loaded.path) if loaded.path else None,
            "context": seq_len, "stride": stride, "dtype": str(loaded.dtype).removeprefix("torch."),
            "datasets": rows}


def _row(result: dict[str, Any], n_bytes: int) -> dict[str, Any]:
    """The network's loss, perplexity and bits per byte, and the mixture's under "mixture"
    when the checkpoint mixes counts in."""
    row = {**_scores(result, n_bytes), "tokens": int(result["tokens"]), "bytes": int(n_bytes),
           "seconds": result["seconds"]}
    if "mixture" in result:
        row["mixture"] = _scores(result["mixture"], n_bytes)
    return row


def _scores(result: dict[str, Any], n_bytes: int) -> dict[str, float]:
    return {"loss": result["loss"], "perplexity": result["perplexity"],
            "bits_per_byte": bits_per_byte(result["loss_sum"], n_bytes)}


def _eval_documents(spec: Any, iter_documents: Any) -> Iterator[str]:
    """A source's validation split where it has one, else all its documents (a local file)."""
    docs = iter_documents(spec, "validation")
    first = next(docs, None)
    if first is None:
        yield from iter_documents(spec, "train")
        return
    yield first
    yield from docs


def _training_validation(loaded: "LoadedModel") -> np.ndarray:
    """The validation tokens of the run that trained this checkpoint (from the token cache,
    rebuilt from the run's data specs with its own tokenizer when missing)."""
    if loaded.config is None:
        raise ConfigError(f"{loaded.source} is not an llmctl checkpoint, so it has no training "
                          f"validation split; pass --data SPEC (e.g. --data text:heldout.txt)")
    from llmctl.data.store import prepare_store

    tokens = prepare_store(loaded.config.data, loaded.tokenizer).tokens("validation")
    if len(tokens) < 2:
        raise LlmctlError(f"the validation split of {loaded.source} has fewer than 2 tokens; pass --data SPEC")
    return tokens
