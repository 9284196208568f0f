"""Parallel tokenization into shard files.

The documents of one source split are cut into chunks of about `shard_chars()` characters
(a chunk closes at the first document that brings it to the limit), and each chunk becomes
one shard. Chunk boundaries depend only on the text, so a shard's content does not depend
on the number of workers, their timing, or interruptions: a resumed preparation ends with
the same shards as an uninterrupted one.

A worker encodes its chunk `ENCODE_BATCH` documents at a time, with the fast (Rust)
tokenizer or, for GPT-2-style byte-level BPEs, the exact and faster piece cache of
`llmctl.data.fastbpe`, and streams the ids into the shard file, so it holds one batch of ids, never a whole
corpus; the main process only reads documents and hands out chunks (at most two per
worker in flight). Memory is flat in corpus size.

A shard is three files, each written under a temporary name, flushed, fsynced and renamed:

    NAME.bin   token ids, each document followed by EOS (uint16 or uint32)
    NAME.idx   int64 (documents, 2): cumulative token end and UTF-8 byte end of each document
    NAME.json  its counts and the .bin's sha256, renamed last: the only mark of completion

so a preparation killed at any instant leaves shards that are either complete and marked,
or unmarked and redone. Workers are spawned, not forked (the caller may hold torch or
tokenizer threads), one per core, with the tokenizer's own thread pool off: turning ids
into arrays is Python work that threads would serialize, processes do not. A source that
fits in one chunk never starts the pool; it is encoded in the calling process.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.data.fastbpe import FastEncoder
from llmctl.data.fastbpe import plan as plan_fast_encoder
from llmctl.data.tokenizer import TextTokenizer
from llmctl.errors import ConfigError

DEFAULT_SHARD_CHARS = 8 << 20  # ~8 MB of text -> ~2M GPT-2 tokens -> a 4 MB uint16 shard
ENCODE_BATCH = 1024  # documents per call into the Rust tokenizer
ENCODE_BATCH_CHARS = 1 << 20  # ... or fewer, when documents are long


def shard_chars() -> int:
    """Characters of text per shard; `LLMCTL_SHARD_CHARS` overrides (tests use small shards)."""
    raw = os.environ.get("LLMCTL_SHARD_CHARS", "")
    if not raw:
        return DEFAULT_SHARD_CHARS
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"LLMCTL_SHARD_CHARS must be a positive whole number, got '{raw}'")
    return int(raw)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def chunked(docs: Iterator[str], limit: int) -> Iterator[tuple[list[str], bool]]:
    """(documents, full) chunks of about `limit` characters; `full` is False for the last one."""
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= limit:
            yield chunk, True
            chunk, size = [], 0
    if chunk:
        yield chunk, False


# --------------------------------------------------------------------------- one shard

def _batches(docs: list[str]) -> Iterator[list[str]]:
    start, size = 0, 0
    for i, doc in enumerate(docs):
        size += len(doc)
        if i + 1 - start >= ENCODE_BATCH or size >= ENCODE_BATCH_CHARS:
            yield docs[start: i + 1]
            start, size = i + 1, 0
    if start < len(docs):
        yield docs[start:]


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def replace_durably(data_writer: Callable[[Any], None], target: Path) -> None:
    """Write through `data_writer(file)` to a temporary name, fsync, rename onto `target`."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            data_writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_shard(backend: Any, eos_id: int, dtype: str, docs: list[str], folder: Path, name: str,
                fast: FastEncoder | None = None) -> dict[str, Any]:
    """Encode `docs` into folder/NAME.{bin,idx,json}; returns the NAME.json record. `fast`, when
    given, encodes with the same ids as `backend` (see llmctl.data.fastbpe), only faster."""
    hasher = hashlib.sha256()
    ends: list[np.ndarray] = []  # per batch, (n, 2) cumulative token and byte ends
    n_tokens = n_bytes = 0

    def write_bin(f: Any) -> None:
        nonlocal n_tokens, n_bytes
        for batch in _batches(docs):
            if fast is not None:
                ids = fast.encode_batch(batch)
            else:
                ids = [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]
            for doc_ids in ids:
                doc_ids.append(eos_id)  # documents are packed, separated by EOS, never padded
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            arr = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))  # (tokens,)
            sizes = np.fromiter(map(_utf8_len, batch), dtype=np.int64, count=len(batch))
            ends.append(np.stack([n_tokens + np.cumsum(lengths), n_bytes + np.cumsum(sizes)], axis=1))
            n_tokens += int(arr.size)
            n_bytes += int(sizes.sum())
            hasher.update(arr.data)
            f.write(arr.data)

    bin_path = folder / f"{name}.bin"
    replace_durably(write_bin, bin_path)
    index = np.concatenate(ends) if ends else np.zeros((0, 2), dtype=np.int64)
    replace_durably(lambda f: f.write(index.astype(np.int64).data), folder / f"{name}.idx")
    record = {"name": name, "documents": len(docs), "tokens": n_tokens, "bytes": n_bytes,
              "file_bytes": bin_path.stat().st_size, "sha256": hasher.hexdigest()}
    replace_durably(lambda f: f.write(json.dumps(record).encode()), folder / f"{name}.json")
    return record


def completed_shards(folder: Path) -> dict[str, dict[str, Any]]:
    """Shards a previous (interrupted) run finished: marked by NAME.json, with intact files."""
    done = {}
    for marker in folder.glob("*.json"):
        try:
            record = json.loads(marker.read_text())
            name = record["name"]
            ok = ((folder / f"{name}.bin").stat().st_size == record["file_bytes"]
                  and (folder / f"{name}.idx").stat().st_size == 16 * record["documents"])
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok:
            done[name] = record
    return done


def read_index(folder: Path, name: str) -> np.ndarray:
    """(documents, 2) cumulative token and byte ends of a shard's documents."""
    return np.fromfile(folder / f"{name}.idx", dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _exit_with_parent(parent: int) -> None:
    # A parent killed outright (SIGKILL, OOM) cannot stop its workers: they notice within half
    # a second and leave, so none lingers idle or keeps writing beside a resumed run.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(tokenizer_json: str, eos_id: int, dtype: str, fast_plan: dict[str, Any] | None) -> None:
    # Ctrl-C reaches the whole process group; the parent alone decides what to do with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core instead
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    fast = FastEncoder(backend, fast_plan) if fast_plan else None
    _WORKER.update(backend=backend, eos_id=eos_id, dtype=dtype, fast=fast)


def _write_in_worker(docs: list[str], folder: str, name: str) -> dict[str, Any]:
    return write_shard(_WORKER["backend"], _WORKER["eos_id"], _WORKER["dtype"], docs, Path(folder), name,
                       _WORKER["fast"])


_PLANS: dict[str, dict[str, Any] | None] = {}


def fast_plan(tokenizer: TextTokenizer) -> dict[str, Any] | None:
    """The vetted fast-encoder plan for this tokenizer (computed once per process), or None."""
    if tokenizer.fingerprint not in _PLANS:
        _PLANS[tokenizer.fingerprint] = plan_fast_encoder(tokenizer.to_json(), tokenizer.backend)
    return _PLANS[tokenizer.fingerprint]


class ShardWriter:
    """Hands chunks to worker processes (started on the first full chunk) or encodes them in
    place; `on_done(record)` runs in the calling thread for every finished shard."""

    def __init__(self, tokenizer: TextTokenizer, dtype: str, folder: Path, workers: int,
                 on_done: Callable[[dict[str, Any]], None]):
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.folder = folder
        self.workers = max(1, workers)
        self.on_done = on_done
        self.pool: Any = None
        self.finished: queue.Queue = queue.Queue()
        self.in_flight = 0
        self.plan = fast_plan(tokenizer)
        self.fast = FastEncoder(tokenizer.backend, self.plan) if self.plan else None

    def submit(self, name: str, docs: list[str], full: bool) -> None:
        if self.pool is None and (not full or self.workers == 1):
            self.on_done(write_shard(self.tokenizer.backend, self.tokenizer.eos_id, self.dtype, docs,
                                     self.folder, name, self.fast))
            return
        if self.pool is None:
            self._start()
        future = self.pool.submit(_write_in_worker, docs, str(self.folder), name)
        future.add_done_callback(self.finished.put)
        self.in_flight += 1
        while self.in_flight >= 2 * self.workers:
            self._collect_one()

    def _start(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(self.tokenizer.to_json(), self.tokenizer.eos_id, self.dtype, self.plan))

    def _collect_one(self) -> None:
        future = self.finished.get()
        self.in_flight -= 1
        self.on_done(future.result())  # re-raises a worker's exception here

    def finish(self) -> None:
        """Wait for every shard in flight, then stop the workers."""
        while self.in_flight:
            self._collect_one()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def abort(self) -> None:
        """Stop now (interrupt or error): running workers are killed, their shards stay unmarked."""
        if self.pool is None:
            return
        processes = list(getattr(self.pool, "_processes", {}).values())  # no public API before 3.14
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.kill()
        for p in processes:
            p.join(timeout=5)
        self.pool = None
