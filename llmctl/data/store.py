"""The packed token store: documents -> token ids joined by EOS -> one flat file per split.

Layout of a store (one folder per cache key):

    <cache_dir>/<key>/train.bin        token ids, uint16 when the vocabulary fits, else uint32
    <cache_dir>/<key>/validation.bin
    <cache_dir>/<key>/meta.json        sources, counts, tokenizer fingerprint, format version
    <cache_dir>/<key>/tokenizer.json   the tokenizer that made it

The key hashes (format version, specs, local file identities, tokenizer fingerprint,
validation fraction), so a changed input gives a new store and a stale one is never
reused. A store is built in a temporary folder and renamed into place when complete.

Validation comes from the dataset's own split; a source without one gives the tail of
its documents (about `validation_fraction` of its tokens), or the tail of its token
stream when it has too few documents (a single text file still gets a validation set).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.config import DataConfig
from llmctl.data.sources import SourceSpec, fingerprint_inputs, has_validation_split, iter_documents, parse_spec
from llmctl.data.tokenizer import TextTokenizer
from llmctl.errors import LlmctlError

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
ENCODE_BATCH = 512  # documents per call into the Rust tokenizer


@dataclass
class TokenStore:
    path: Path
    meta: dict[str, Any]

    def tokens(self, split: str) -> np.memmap:
        """Memory-mapped ids of one split: the OS pages in only what a batch touches."""
        return np.memmap(self.path / f"{split}.bin", dtype=self.meta["dtype"], mode="r")


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("LLMCTL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmctl"


def cache_key(cfg: DataConfig, specs: list[SourceSpec], tokenizer: TextTokenizer) -> str:
    h = hashlib.sha256()
    identity = {
        "format_version": FORMAT_VERSION,
        "sources": [[s.raw, fingerprint_inputs(s)] for s in specs],
        "tokenizer": tokenizer.fingerprint,
        "validation_fraction": cfg.validation_fraction,
    }
    h.update(json.dumps(identity, sort_keys=True).encode())
    return h.hexdigest()[:20]


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def prepare_store(cfg: DataConfig, tokenizer: TextTokenizer,
                  on_progress: Callable[[str, int, int], None] | None = None) -> TokenStore:
    """Return the cached store for these sources and tokenizer, building it if needed."""
    specs = [parse_spec(s) for s in cfg.datasets]
    root = cache_root(cfg)
    final = root / f"tokens-{cache_key(cfg, specs, tokenizer)}"
    if (final / "meta.json").is_file():
        return TokenStore(final, json.loads((final / "meta.json").read_text()))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlmctlError(f"cannot create the token cache {root}: {e.strerror}; "
                          f"set data.cache_dir to a writable folder") from None
    partial = root / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        meta = _build(specs, tokenizer, cfg.validation_fraction, partial, on_progress)
        (partial / "tokenizer.json").write_text(tokenizer.to_json())
        (partial / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(partial, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return TokenStore(final, json.loads((final / "meta.json").read_text()))


def _encode_documents(docs: Iterator[str], tokenizer: TextTokenizer, dtype: str,
                      on_batch: Callable[[int, int], None]) -> Iterator[np.ndarray]:
    """One array per document: its ids followed by EOS (documents are packed, never padded)."""
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        ids = tokenizer.encode_batch(batch)
        on_batch(len(batch), sum(len(x) + 1 for x in ids))
        for doc_ids in ids:
            arr = np.empty(len(doc_ids) + 1, dtype=dtype)
            arr[:-1] = doc_ids
            arr[-1] = tokenizer.eos_id
            yield arr
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= ENCODE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def _build(specs: list[SourceSpec], tokenizer: TextTokenizer, fraction: float, out: Path,
           on_progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    dtype = token_dtype(tokenizer.vocab_size)
    files = {split: open(out / f"{split}.bin", "wb") for split in SPLITS}
    sources_meta = []
    try:
        for spec in specs:
            counts = {split: {"documents": 0, "tokens": 0} for split in SPLITS}

            def report(n_docs: int, n_tokens: int, _label: str = spec.raw) -> None:
                if on_progress:
                    on_progress(_label, n_docs, n_tokens)

            def write(split: str, arrays: list[np.ndarray] | Iterator[np.ndarray]) -> None:
                for arr in arrays:
                    arr.tofile(files[split])
                    counts[split]["documents"] += 1
                    counts[split]["tokens"] += int(arr.size)

            train_docs = _encode_documents(iter_documents(spec, "train"), tokenizer, dtype, report)
            if has_validation_split(spec):
                write("train", train_docs)
                write("validation", _encode_documents(iter_documents(spec, "validation"), tokenizer, dtype, report))
            else:
                train, held_out = _hold_out(list(train_docs), fraction)
                write("train", train)
                write("validation", held_out)
            if counts["train"]["tokens"] == 0:
                raise LlmctlError(f"data spec '{spec.raw}' yielded no text; check that its files are not empty")
            sources_meta.append({"spec": spec.raw, **{s: counts[s] for s in SPLITS}})
    finally:
        for f in files.values():
            f.close()
    totals = {s: sum(m[s]["tokens"] for m in sources_meta) for s in SPLITS}
    if totals["validation"] < 2:
        raise LlmctlError("the validation split has fewer than 2 tokens; add text or raise "
                          "data.validation_fraction")
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": tokenizer.source,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "validation_fraction": fraction,
        "sources": sources_meta,
        "tokens": totals,
    }


def _hold_out(docs: list[np.ndarray], fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split one source's documents into (train, validation) at its tail.

    Whole documents from the end go to validation until they hold `fraction` of the tokens.
    With too few documents for that (validation would take all of them, or none), the
    concatenated token stream is cut instead, so even one document yields both splits.
    """
    total = sum(d.size for d in docs)
    target = fraction * total
    held, n_val = 0, 0
    for d in reversed(docs):
        if held >= target:
            break
        held += d.size
        n_val += 1
    if 0 < n_val < len(docs) and held <= 2 * target + 1:
        return docs[:-n_val], docs[-n_val:]
    stream = np.concatenate(docs) if docs else np.empty(0, dtype=np.uint16)
    cut = int(round(total * (1 - fraction)))
    return [stream[:cut]], [stream[cut:]]
