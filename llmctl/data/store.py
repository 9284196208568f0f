"""The token store: sources -> sharded, packed token ids with a manifest, cached and resumable.

Layout of a store (one folder per cache key):

    <cache_dir>/tokens-<key>/manifest.json      sources and caps, tokenizer fingerprint, documents,
                                                 tokens and bytes per source, split and shard,
                                                 sha256 per shard, format version
    <cache_dir>/tokens-<key>/tokenizer.json     the tokenizer that made it
    <cache_dir>/tokens-<key>/SSS-STREAM-CCCCCC.{bin,idx}   shards (see llmctl.data.shards)

The key hashes (format version, specs, local file identities, tokenizer fingerprint,
validation fraction), so a changed input gives a new store and a stale one is never
reused. A store is built in `tokens-<key>.partial/` and renamed into place when complete;
an interrupted build leaves that folder behind and the next `prepare` of the same key
resumes it, skipping the shards already marked complete. A bad input (missing field,
undecodable file, empty source) removes it: nothing is cached from a failed build.

Splits are lists of (shard, start, stop) segments: a source with its own validation split
(WikiText, TinyStories) has validation shards; any other source holds out the tail of its
train shards (`llmctl.data.holdout`) without copying a token. `TokenStore.tokens(split)`
returns a `TokenView`, a read-only array over the memory-mapped segments in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.config import DataConfig
from llmctl.data import holdout
from llmctl.data.shards import (ShardWriter, chunked, completed_shards, default_workers, read_index,
                                replace_durably, shard_chars)
from llmctl.data.sources import (SourceSpec, check_sources, fingerprint_inputs, has_validation_split,
                                 input_bytes, iter_documents)
from llmctl.data.tokenizer import TextTokenizer, check_fingerprint
from llmctl.errors import LlmctlError

FORMAT_VERSION = 2
SPLITS = ("train", "validation")
MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- reading

class TokenView:
    """A split's token stream: memory-mapped segments read as one flat 1-D array.

    Supports `len`, integer and step-1 slice indexing (a slice inside one shard is a view,
    one across shards a copy of just that range), `dtype`, and `np.asarray` (which copies
    the whole split: for small splits only). Iterating yields the stream as consecutive
    arrays of at most `ITER_TOKENS` tokens, so a consumer of "an array or an iterable of
    arrays" (evaluation) reads any split in bounded memory.
    """

    ITER_TOKENS = 1 << 20

    def __init__(self, folder: Path, segments: list[tuple[str, int, int]], dtype: str):
        self.folder = folder
        self.segments = [s for s in segments if s[2] > s[1]]
        self.dtype = np.dtype(dtype)
        self.ends = np.cumsum([stop - start for _, start, stop in self.segments], dtype=np.int64)
        self._maps: dict[str, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _part(self, i: int, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) of segment i, in segment coordinates."""
        name, start, _ = self.segments[i]
        if name not in self._maps:  # mapped on first use; the OS pages in only what is read
            self._maps[name] = np.memmap(self.folder / f"{name}.bin", dtype=self.dtype, mode="r")
        return self._maps[name][start + lo: start + hi]

    def __getitem__(self, key: int | slice) -> Any:
        n = len(self)
        if isinstance(key, slice):
            lo, hi, step = key.indices(n)
            if step != 1:
                raise IndexError("TokenView slices take step 1")
            hi = max(lo, hi)
        else:
            lo = int(key) + n if int(key) < 0 else int(key)
            if not 0 <= lo < n:
                raise IndexError(f"token {key} out of range for {n} tokens")
            return self[lo: lo + 1][0]
        if lo == hi:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.ends, lo, side="right"))
        last = int(np.searchsorted(self.ends, hi - 1, side="right"))
        pieces = []
        for i in range(first, last + 1):
            seg_start = int(self.ends[i - 1]) if i else 0
            pieces.append(self._part(i, max(lo, seg_start) - seg_start, min(hi, int(self.ends[i])) - seg_start))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i, (_, start, stop) in enumerate(self.segments):
            for lo in range(0, stop - start, self.ITER_TOKENS):
                yield self._part(i, lo, min(lo + self.ITER_TOKENS, stop - start))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return np.asarray(whole, dtype=dtype) if dtype is not None else np.asarray(whole)


@dataclass
class TokenStore:
    path: Path
    meta: dict[str, Any]

    def tokens(self, split: str) -> TokenView:
        """The split's ids, memory-mapped: the OS pages in only what a batch touches."""
        segments = [(s["shard"], s["start"], s["stop"]) for s in self.meta["splits"][split]]
        return TokenView(self.path, segments, self.meta["dtype"])

    def source_ranges(self, split: str) -> list[tuple[int, int]]:
        """(start, stop) of each source's tokens within the split's stream (sources are in order)."""
        ranges, offset = [], 0
        for source in self.meta["sources"]:
            n = source[split]["tokens"]
            ranges.append((offset, offset + n))
            offset += n
        return ranges

    def train_fingerprint(self) -> str:
        """sha256 over the train split's segments in order, each with its shard's sha256: it
        changes when any training token does (equal token counts or not). A shard that also
        holds a held-out tail hashes that tail too, so an edit there counts as changed data."""
        sha = {shard["name"]: shard["sha256"] for shard in self.meta["shards"]}
        parts = [[s["shard"], sha[s["shard"]], s["start"], s["stop"]] for s in self.meta["splits"]["train"]]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def check_tokenizer(self, tokenizer: TextTokenizer) -> None:
        check_fingerprint(self.meta["tokenizer_fingerprint"], tokenizer, f"the token store {self.path}")


def open_store(path: Path) -> TokenStore | None:
    """The complete store at `path`, or None when there is none (or it is from another format)."""
    try:
        meta = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format_version") != FORMAT_VERSION:
        return None
    return TokenStore(path, meta)


# --------------------------------------------------------------------------- where

def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("LLMCTL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmctl"


def cache_key(cfg: DataConfig, specs: list[SourceSpec], tokenizer: TextTokenizer) -> str:
    identity = {
        "format_version": FORMAT_VERSION,
        "sources": [[s.raw, fingerprint_inputs(s)] for s in specs],
        "tokenizer": tokenizer.fingerprint,
        "validation_fraction": cfg.validation_fraction,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def store_path(cfg: DataConfig, specs: list[SourceSpec], tokenizer: TextTokenizer) -> Path:
    return cache_root(cfg) / f"tokens-{cache_key(cfg, specs, tokenizer)}"


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


# --------------------------------------------------------------------------- progress

@dataclass
class SourceProgress:
    """What `prepare_store` reports to its `on_progress` callback, per source."""

    index: int
    spec: str
    total_bytes: int | None  # the source's file sizes (local), None for the Hub
    cap: int | None
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    shards: int = 0
    resumed_shards: int = 0
    done: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def fraction(self) -> float | None:
        """How far along, when knowable: by bytes of input, or by documents against the cap."""
        if self.done:
            return 1.0
        parts = []
        if self.total_bytes:
            parts.append(self.bytes / self.total_bytes)
        if self.cap:
            parts.append(self.documents / self.cap)
        return min(1.0, max(parts)) if parts else None


# --------------------------------------------------------------------------- building

def prepare_store(cfg: DataConfig, tokenizer: TextTokenizer,
                  on_progress: Callable[[SourceProgress], None] | None = None) -> TokenStore:
    """Return the cached store for these sources and tokenizer, building (or resuming) it if needed."""
    specs = check_sources(cfg.datasets)
    final = store_path(cfg, specs, tokenizer)
    store = open_store(final)
    if store is not None:
        store.check_tokenizer(tokenizer)
        return store
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(final)
        partial.mkdir(exist_ok=True)
    except OSError as e:
        raise LlmctlError(f"cannot create the token cache {final.parent}: {e.strerror}; "
                          f"set data.cache_dir to a writable folder") from None
    with _locked(partial):
        store = open_store(final)  # built by a concurrent prepare while we waited for the lock
        if store is not None:
            shutil.rmtree(partial, ignore_errors=True)
            store.check_tokenizer(tokenizer)
            return store
        try:
            meta = _Build(cfg, specs, tokenizer, partial, on_progress).run()
        except LlmctlError:
            shutil.rmtree(partial, ignore_errors=True)  # bad input: cache nothing
            raise
        replace_durably(lambda f: f.write(tokenizer.to_json().encode()), partial / "tokenizer.json")
        replace_durably(lambda f: f.write(json.dumps(meta, indent=1).encode()), partial / MANIFEST)
        (partial / "identity.txt").unlink(missing_ok=True)
        (partial / ".lock").unlink(missing_ok=True)
        os.replace(partial, final)  # the store appears complete, or not at all
    for shard in meta["shards"]:  # the manifest now holds every shard's record
        (final / f"{shard['name']}.json").unlink(missing_ok=True)
    return TokenStore(final, meta)


@contextlib.contextmanager
def _locked(partial: Path) -> Iterator[None]:
    """One builder per store: a second `prepare` of the same key waits, then reuses the result."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent builds of one key are not guarded
        yield
        return
    with open(partial / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class _Build:
    """One run of the builder over every source; resumes the shards already in `folder`."""

    def __init__(self, cfg: DataConfig, specs: list[SourceSpec], tokenizer: TextTokenizer, folder: Path,
                 on_progress: Callable[[SourceProgress], None] | None):
        self.cfg, self.specs, self.tokenizer, self.folder = cfg, specs, tokenizer, folder
        self.on_progress = on_progress or (lambda p: None)
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.records: dict[str, dict[str, Any]] = {}
        self.progress: list[SourceProgress] = []

    def _check_identity(self) -> None:
        """Shards of a previous run are reused only if they were cut the same way."""
        identity = json.dumps({"shard_chars": shard_chars(), "dtype": self.dtype}, sort_keys=True)
        marker = self.folder / "identity.txt"
        stale = marker.is_file() and marker.read_text() != identity
        for p in self.folder.iterdir():
            # Temporary files of a killed run were never renamed: they are never reused.
            if p.name != ".lock" and (stale or ".tmp-" in p.name):
                p.unlink()
        marker.write_text(identity)

    def _done(self, record: dict[str, Any]) -> None:
        self.records[record["name"]] = record
        p = self.progress[int(record["name"][:3])]
        p.tokens += record["tokens"]
        p.bytes += record["bytes"]
        p.shards += 1
        self.on_progress(p)

    def run(self) -> dict[str, Any]:
        self._check_identity()
        resumable = completed_shards(self.folder)
        limit = shard_chars()
        workers = self.cfg.num_workers or default_workers()
        writer = ShardWriter(self.tokenizer, self.dtype, self.folder, workers, self._done)
        streams: dict[tuple[int, str], list[str]] = {}
        try:
            for si, spec in enumerate(self.specs):
                p = SourceProgress(si, spec.raw, input_bytes(spec) if spec.cap is None else None, spec.cap)
                self.progress.append(p)
                self.on_progress(p)
                for stream in SPLITS if has_validation_split(spec) else ("train",):
                    names = streams.setdefault((si, stream), [])
                    for ci, (docs, full) in enumerate(chunked(iter_documents(spec, stream), limit)):
                        name = f"{si:03d}-{stream}-{ci:06d}"
                        names.append(name)
                        p.documents += len(docs)
                        if name in resumable:
                            p.resumed_shards += 1
                            self._done(resumable[name])
                        else:
                            writer.submit(name, docs, full)
                    if stream == "train" and not names:
                        raise LlmctlError(f"data spec '{spec.raw}' yielded no text; check that its "
                                          f"files (or its text field) are not empty")
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        for p in self.progress:
            p.done = True
            self.on_progress(p)
        return self._manifest(streams)

    def _manifest(self, streams: dict[tuple[int, str], list[str]]) -> dict[str, Any]:
        splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        sources = []
        for si, spec in enumerate(self.specs):
            train = [self.records[n] for n in streams[(si, "train")]]
            if has_validation_split(spec):
                val = [self.records[n] for n in streams[(si, "validation")]]
                parts = {"train": [(r["name"], 0, r["tokens"]) for r in train],
                         "validation": [(r["name"], 0, r["tokens"]) for r in val]}
                counts = {split: {k: sum(r[k] for r in records) for k in ("documents", "tokens", "bytes")}
                          for split, records in (("train", train), ("validation", val))}
            else:
                cut = holdout.hold_out(lambda i: read_index(self.folder, train[i]["name"]), train,
                                       self.cfg.validation_fraction)
                train_parts, val_parts = holdout.segments(train, cut.position)
                parts = {"train": train_parts, "validation": val_parts}
                counts = {"train": cut.train, "validation": cut.validation}
            for split in SPLITS:
                splits[split] += [{"shard": name, "start": start, "stop": stop, "source": si}
                                  for name, start, stop in parts[split]]
            sources.append({"spec": spec.raw, "kind": spec.kind, "target": spec.target, "cap": spec.cap,
                            "field": spec.field, "inputs": fingerprint_inputs(spec),
                            "own_validation": has_validation_split(spec), **counts})
        totals = {split: {k: sum(s[split][k] for s in sources) for k in ("documents", "tokens", "bytes")}
                  for split in SPLITS}
        if totals["validation"]["tokens"] < 2:
            raise LlmctlError("the validation split has fewer than 2 tokens; add text or raise "
                              "data.validation_fraction")
        shard_names = [n for names in streams.values() for n in names]
        return {
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype,
            "vocab_size": self.tokenizer.vocab_size,
            "eos_id": self.tokenizer.eos_id,
            "tokenizer": self.tokenizer.source,
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "validation_fraction": self.cfg.validation_fraction,
            "shard_chars": shard_chars(),
            "sources": sources,
            "tokens": {split: totals[split]["tokens"] for split in SPLITS},
            "documents": {split: totals[split]["documents"] for split in SPLITS},
            "bytes": {split: totals[split]["bytes"] for split in SPLITS},
            "splits": splits,
            "shards": [{k: self.records[n][k] for k in ("name", "documents", "tokens", "bytes", "sha256")}
                       for n in sorted(shard_names)],
        }


def verify_store(store: TokenStore) -> list[str]:
    """Names of shards whose bytes no longer match the manifest's sha256 (empty = intact)."""
    bad = []
    for shard in store.meta["shards"]:
        hasher = hashlib.sha256()
        try:
            with open(store.path / f"{shard['name']}.bin", "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    hasher.update(block)
        except OSError:
            bad.append(shard["name"])
            continue
        if hasher.hexdigest() != shard["sha256"]:
            bad.append(shard["name"])
    return bad
