"""Data specs -> documents.

A spec names one source: a registered Hub name (`wikitext-2-raw-v1`), any Hub dataset
(`hf:ORG/NAME` or `hf:ORG/NAME/CONFIG`), or local files (`text:GLOB`). A trailing `:N`
caps the source at N documents. Each source yields documents (strings) per split;
blank lines and whitespace-only rows never become documents.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmctl.data.hub import hub_offline, require_hub
from llmctl.errors import ConfigError, LlmctlError


@dataclass(frozen=True)
class HubDataset:
    path: str
    config: str | None
    streaming: bool  # stream big corpora instead of materializing the whole Arrow copy
    text_field: str = "text"


# The registered corpora: a short name a user types -> where it lives on the Hub.
REGISTERED: dict[str, HubDataset] = {
    "wikitext-2-raw-v1": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", streaming=False),
    "wikitext-103-raw-v1": HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1", streaming=False),
    "roneneldan/TinyStories": HubDataset("roneneldan/TinyStories", None, streaming=True),
    "openwebtext": HubDataset("Skylion007/openwebtext", None, streaming=True),
    "wikipedia": HubDataset("wikimedia/wikipedia", "20231101.en", streaming=True),
}

LOCAL_KINDS = ("text",)


@dataclass(frozen=True)
class SourceSpec:
    raw: str  # as the user wrote it
    kind: str  # "hub" | "text"
    target: str  # registered name, hf path, or glob
    cap: int | None  # at most this many documents

    @property
    def label(self) -> str:
        return self.raw


def parse_spec(raw: str) -> SourceSpec:
    spec = raw.strip()
    if not spec:
        raise ConfigError("empty data spec in data.datasets; use a registered name "
                          f"({', '.join(REGISTERED)}), hf:ORG/NAME, or text:GLOB")
    cap = None
    head, sep, tail = spec.rpartition(":")
    if sep and re.fullmatch(r"-?\d+", tail):
        cap = int(tail)
        if cap < 1:
            raise ConfigError(f"data spec '{raw}': the cap :{tail} must be a positive number of documents")
        spec = head
    kind, sep, rest = spec.partition(":")
    if sep and kind in LOCAL_KINDS:
        if not rest:
            raise ConfigError(f"data spec '{raw}' names no files; write {kind}:PATH_OR_GLOB")
        return SourceSpec(raw, kind, rest, cap)
    if sep and kind == "hf":
        if not rest:
            raise ConfigError(f"data spec '{raw}' names no dataset; write hf:ORG/NAME or hf:ORG/NAME/CONFIG")
        return SourceSpec(raw, "hub", rest, cap)
    if spec in REGISTERED:
        return SourceSpec(raw, "hub", spec, cap)
    raise ConfigError(f"unknown data source '{raw}'; use a registered name "
                      f"({', '.join(REGISTERED)}), hf:ORG/NAME[/CONFIG], or text:GLOB "
                      f"(append :N to cap at N documents)")


def check_sources(specs: list[str]) -> list[SourceSpec]:
    """Parse every spec and check local files exist, before any slow work starts."""
    parsed = [parse_spec(s) for s in specs]
    for spec in parsed:
        if spec.kind != "hub":
            local_files(spec)
    return parsed


def hub_dataset(spec: SourceSpec) -> HubDataset:
    if spec.target in REGISTERED:
        return REGISTERED[spec.target]
    parts = spec.target.split("/")
    if len(parts) == 3:
        return HubDataset(f"{parts[0]}/{parts[1]}", parts[2], streaming=True)
    return HubDataset(spec.target, None, streaming=True)


def local_files(spec: SourceSpec) -> list[Path]:
    pattern = os.path.expanduser(spec.target)
    matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    files = [Path(m) for m in matches if Path(m).is_file()]
    if not files:
        what = "matches no files" if glob.has_magic(pattern) else "is not a file"
        raise ConfigError(f"data spec '{spec.raw}': {spec.target} {what}; check the path "
                          f"(relative paths start from {os.getcwd()})")
    for f in files:
        if not os.access(f, os.R_OK):
            raise LlmctlError(f"data spec '{spec.raw}': cannot read {f} (permission denied)")
    return files


def fingerprint_inputs(spec: SourceSpec) -> list[str]:
    """What the cached tokens depend on, besides the spec itself: local file identities."""
    if spec.kind == "hub":
        return []
    return [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in local_files(spec)]


# --------------------------------------------------------------------------- documents

def _paragraphs(path: Path) -> Iterator[str]:
    """A text file's documents: blocks separated by blank (or whitespace-only) lines."""
    block: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    block.append(line.rstrip("\n"))
                elif block:
                    yield "\n".join(block)
                    block = []
    except UnicodeDecodeError as e:
        raise LlmctlError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                          f"convert it, e.g. iconv -t utf-8") from None
    if block:
        yield "\n".join(block)


def _hub_documents(spec: SourceSpec, split: str) -> Iterator[str] | None:
    """Documents of one Hub split, or None when the dataset has no such split."""
    ds_info = hub_dataset(spec)
    require_hub(f"dataset '{spec.raw}'", "use local files (--set 'data.datasets=[\"text:PATH\"]')")
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(ds_info.path, ds_info.config, split=split, streaming=ds_info.streaming)
    except ValueError as e:
        if "split" in str(e).lower() and split != "train":
            return None
        raise LlmctlError(f"cannot load '{spec.raw}' split {split}: {str(e).splitlines()[0]}") from None
    except (ConnectionError, OSError) as e:
        hint = ("populate the cache while online first" if hub_offline() else "check the name and your connection")
        raise LlmctlError(f"cannot load '{spec.raw}' from the Hub ({type(e).__name__}); {hint}, "
                          f"or use local files with text:PATH") from None
    except Exception as e:  # datasets raises its own types (DatasetNotFoundError, ...)
        raise LlmctlError(f"cannot load '{spec.raw}' from the Hub: {str(e).splitlines()[0]}") from None

    def rows() -> Iterator[str]:
        for row in ds:
            if ds_info.text_field not in row:
                raise LlmctlError(f"'{spec.raw}' rows have no '{ds_info.text_field}' field "
                                  f"(fields: {', '.join(row)})")
            text = row[ds_info.text_field]
            if isinstance(text, str) and text.strip():
                yield text
    return rows()


def has_validation_split(spec: SourceSpec) -> bool:
    return spec.kind == "hub" and spec.target in ("wikitext-2-raw-v1", "wikitext-103-raw-v1",
                                                   "roneneldan/TinyStories")


def iter_documents(spec: SourceSpec, split: str = "train") -> Iterator[str]:
    """Documents of `split` ("train" or "validation"), capped at spec.cap."""
    if spec.kind == "text":
        if split != "train":
            return iter(())
        docs: Iterator[str] = (p for f in local_files(spec) for p in _paragraphs(f))
    else:
        found = _hub_documents(spec, split)
        docs = found if found is not None else iter(())
    return _capped(docs, spec.cap)


def _capped(docs: Iterator[str], cap: int | None) -> Iterator[str]:
    for i, doc in enumerate(docs):
        if cap is not None and i >= cap:
            return
        yield doc
