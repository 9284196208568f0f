"""What `llmctl data prepare` and `llmctl data info` show.

`prepare_data` resolves the tokenizer (training `train:V` if needed), builds or reuses the
token store and reports through `PrepareDisplay`: on a terminal a Rich live bar per source
(documents, tokens, tokens/s, ETA), otherwise one plain line per finished source, so logs
stay readable. `describe` turns a store (or its absence) into the one dict both commands
print, as a table or as JSON: a `sources` list with one entry per source and split
carrying `spec`, `split`, `documents`, `tokens`, `bytes` and `bytes_per_token`.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from llmctl.config import DataConfig
from llmctl.data.shards import completed_shards
from llmctl.data.sources import check_sources
from llmctl.data.store import (SPLITS, SourceProgress, open_store, partial_path, prepare_store, store_path,
                               verify_store)
from llmctl.data.tokenizer import TextTokenizer, ready_tokenizer, resolve_tokenizer


class PrepareDisplay:
    """`on_progress` for prepare_store: live bars on a terminal, plain lines otherwise."""

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.tasks: dict[int, TaskID] = {}
        self.reported: set[int] = set()

    def __enter__(self) -> "PrepareDisplay":
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(),
                TextColumn("{task.fields[documents]:>12,} docs"), TextColumn("{task.fields[tokens]:>14,} tokens"),
                TextColumn("{task.fields[rate]:>10,.0f} tok/s"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def say(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False)

    def __call__(self, p: SourceProgress) -> None:
        elapsed = max(time.monotonic() - p.started, 1e-9)
        rate = p.tokens / elapsed
        if self.progress is not None:
            fraction = p.fraction
            fields = {"documents": p.documents, "tokens": p.tokens, "rate": rate}
            if p.index not in self.tasks:
                self.tasks[p.index] = self.progress.add_task(p.spec, total=1.0 if fraction is not None else None,
                                                             **fields)
            self.progress.update(self.tasks[p.index], completed=fraction or 0.0, **fields)
        elif p.done and p.index not in self.reported:
            self.reported.add(p.index)
            resumed = f", {p.resumed_shards} of {p.shards} shards resumed" if p.resumed_shards else ""
            self.say(f"data: {p.spec}: {p.documents:,} documents, {p.tokens:,} tokens "
                     f"({rate:,.0f} tokens/s{resumed})")


def describe(cfg: DataConfig, tokenizer: TextTokenizer | None = None, verify: bool = False) -> dict[str, Any]:
    """The store for this config as one plain dict (what `data info --json` prints); `verify`
    re-hashes every shard against the manifest's sha256 (`corrupt_shards`)."""
    specs = check_sources(cfg.datasets)
    tokenizer = tokenizer or ready_tokenizer(cfg)
    info: dict[str, Any] = {"prepared": False, "path": None, "tokenizer": cfg.tokenizer,
                            "tokenizer_fingerprint": None, "vocab_size": None, "dtype": None,
                            "format_version": None, "shards": 0, "resumable_shards": 0,
                            "sources": [], "totals": {}}
    store = None
    if tokenizer is not None:
        path = store_path(cfg, specs, tokenizer)
        store = open_store(path)
        partial = partial_path(path)
        info.update(path=str(path), tokenizer_fingerprint=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size,
                    resumable_shards=len(completed_shards(partial)) if partial.is_dir() else 0)
    if store is None:
        info["sources"] = [{"spec": s.raw, "split": split, "documents": None, "tokens": None, "bytes": None,
                            "bytes_per_token": None} for s in specs for split in SPLITS]
        return info
    meta = store.meta
    store.check_tokenizer(tokenizer)
    info.update(prepared=True, dtype=meta["dtype"], format_version=meta["format_version"], shards=len(meta["shards"]),
                resumable_shards=0)
    for source in meta["sources"]:
        for split in SPLITS:
            c = source[split]
            info["sources"].append({"spec": source["spec"], "split": split, **c,
                                    "bytes_per_token": round(c["bytes"] / c["tokens"], 3) if c["tokens"] else None})
    info["totals"] = {split: {k: meta[k][split] for k in ("documents", "tokens", "bytes")} for split in SPLITS}
    if verify:
        info["corrupt_shards"] = verify_store(store)
    return info


def prepare_data(cfg: DataConfig, console: Console) -> dict[str, Any]:
    """Tokenizer, then the token store (built, resumed or reused); returns `describe`'s dict
    plus `reused` and `seconds`."""
    specs = check_sources(cfg.datasets)  # a bad spec fails before the tokenizer loads
    with PrepareDisplay(console) as display:
        tokenizer = resolve_tokenizer(cfg, display.say)
        existing = open_store(store_path(cfg, specs, tokenizer)) is not None
        start = time.perf_counter()
        try:
            store = prepare_store(cfg, tokenizer, display)
        except KeyboardInterrupt:
            display.say("data: interrupted; the finished shards are kept, run the same command again to resume")
            raise
        seconds = time.perf_counter() - start
    tokens = sum(store.meta["tokens"].values())
    if existing:
        display.say(f"data: reusing the cached token store {store.path}")
    else:
        display.say(f"data: {tokens:,} tokens in {seconds:.1f}s ({tokens / max(seconds, 1e-9):,.0f} tokens/s) "
                    f"-> {store.path}")
    return {**describe(cfg, tokenizer), "reused": existing, "seconds": round(seconds, 3)}


def _number(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def render(info: dict[str, Any], console: Console) -> None:
    """The table `data info` and `data prepare` print."""
    state = "prepared" if info["prepared"] else (
        f"not prepared ({info['resumable_shards']} shards of an interrupted run ready to resume)"
        if info["resumable_shards"] else "not prepared (run llmctl data prepare)")
    title = f"token store: {info['path'] or '- (train the tokenizer first: llmctl data prepare)'}"
    table = Table(title=title, caption=f"{state}; tokenizer {info['tokenizer']}"
                  + (f" ({info['tokenizer_fingerprint']}, vocab {info['vocab_size']:,}, {info['dtype'] or '-'})"
                     if info["tokenizer_fingerprint"] else ""), title_justify="left", caption_justify="left")
    for column in ("source", "split", "documents", "tokens", "bytes", "bytes/token"):
        table.add_column(column, justify="left" if column in ("source", "split") else "right")
    for row in info["sources"]:
        table.add_row(row["spec"], row["split"], _number(row["documents"]), _number(row["tokens"]),
                      _number(row["bytes"]), _number(row["bytes_per_token"], 2))
    for split, c in info["totals"].items():
        table.add_row("[b]all[/b]", split, _number(c["documents"]), _number(c["tokens"]), _number(c["bytes"]),
                      _number(round(c["bytes"] / c["tokens"], 3) if c["tokens"] else None, 2))
    console.print(table)
    if "corrupt_shards" in info:
        bad = info["corrupt_shards"]
        console.print(f"checksums: {'all ' + str(info['shards']) + ' shards intact' if not bad else 'CORRUPT: ' + ', '.join(bad)}",
                      markup=False, highlight=False)


def wide_console(stderr: bool = False) -> Console:
    """A console that does not wrap long paths into a narrow table when output is piped."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=160)



def print_whole(table: Table, stderr: bool = False) -> None:
    """Print a table with no cell cut short. Piped, Rich assumes 80 columns and ends long paths
    with "…"; there the console is as wide as the table's widest row (and its title), so
    every value stays on one line for scripts. On a terminal, its width (columns may fold)."""
    from rich.measure import Measurement
    from rich.text import Text

    console = Console(stderr=stderr)
    if not console.is_terminal:
        need = Measurement.get(console, console.options.update_width(1 << 20), table).maximum
        title = table.title.cell_len if isinstance(table.title, Text) else len(str(table.title or ""))
        console = Console(stderr=stderr, width=max(console.width, need, title))
    console.print(table)
