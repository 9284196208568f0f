"""Data specs -> documents.

A spec names one source:

    shakespeare                                   the corpus shipped with llmctl (no network)
    wikitext-2-raw-v1, wikitext-103-raw-v1,      registered Hub corpora
    roneneldan/TinyStories, openwebtext, wikipedia
    hf:ORG/NAME[/CONFIG][#FIELD]                  any Hub dataset (text field FIELD, default text)
    text:GLOB                                     local UTF-8 text; documents = blank-line blocks
    jsonl:GLOB[#FIELD]                            local JSON Lines, one object per line
    json:GLOB[#FIELD]                             local JSON arrays of objects
    parquet:GLOB[#FIELD]                          local Parquet files, column FIELD

and a trailing `:N` caps the source at N documents (`jsonl:chat/*.jsonl#content:5000`).
The text field is part of the spec rather than a config key so that sources with
different fields can be mixed. Each source yields documents (strings) per split; blank
lines, whitespace-only rows and WikiText's empty separator rows never become documents.
Big Hub corpora are streamed (`streaming=True`), so nothing holds a whole corpus.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmctl.data import shakespeare
from llmctl.data.hub import Missing, dataset_cached, hub_offline, require_hub
from llmctl.data.readers import READERS, check_jsonl, check_parquet, read_text
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

LOCAL_KINDS = ("text", "jsonl", "json", "parquet")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_FORMS = ("shakespeare (shipped), a registered name ({}), hf:ORG/NAME[/CONFIG], text:GLOB, jsonl:GLOB, "
          "json:GLOB or parquet:GLOB")


@dataclass(frozen=True)
class SourceSpec:
    raw: str  # as the user wrote it
    kind: str  # "shipped" | "hub" | "text" | "jsonl" | "json" | "parquet"
    target: str  # registered name, hf path, or glob
    cap: int | None  # at most this many documents
    field: str | None = None  # the text field of jsonl/json/parquet/hf records; None = "text"

    @property
    def text_field(self) -> str:
        return self.field or "text"


def _forms() -> str:
    return _FORMS.format(", ".join(REGISTERED))


def parse_spec(raw: str) -> SourceSpec:
    """`KIND:TARGET[#FIELD][:N]` or a registered name; a mistake is one ConfigError line."""
    spec = raw.strip()
    if not spec:
        raise ConfigError(f"empty data spec in data.datasets; use {_forms()}")
    cap = None
    head, sep, tail = spec.rpartition(":")
    if sep and re.fullmatch(r"[-+]?\d+", tail):
        cap = int(tail)
        if cap < 1:
            raise ConfigError(f"data spec '{raw}': the cap :{tail} must be a positive number of documents")
        spec = head
    field = None
    head, sep, tail = spec.rpartition("#")
    if sep and _FIELD.fullmatch(tail):
        spec, field = head, tail
    kind, sep, rest = spec.partition(":")
    if sep and kind in LOCAL_KINDS:
        if not rest:
            raise ConfigError(f"data spec '{raw}' names no files; write {kind}:PATH_OR_GLOB")
        if field is not None and kind == "text":
            raise ConfigError(f"data spec '{raw}': text: files have no fields; drop '#{field}' "
                              f"(or use jsonl:, json: or parquet: for records)")
        return SourceSpec(raw, kind, rest, cap, field)
    if sep and kind == "hf":
        if not rest or rest.count("/") > 2:
            raise ConfigError(f"data spec '{raw}' names no dataset; write hf:ORG/NAME or hf:ORG/NAME/CONFIG")
        return SourceSpec(raw, "hub", rest, cap, field)
    if spec in shakespeare.NAMES:
        if field is not None:
            raise ConfigError(f"data spec '{raw}': the shipped corpus has no fields; drop '#{field}'")
        if spec == shakespeare.DIALOGUE_NAME:
            raise ConfigError(f"data spec '{raw}' is SFT data (speech and reply pairs); pretrain on "
                              f"'{shakespeare.PRETRAIN_NAME}' and use '{spec}' in sft.datasets")
        return SourceSpec(raw, "shipped", spec, cap)
    if spec in REGISTERED:
        if field is not None:
            raise ConfigError(f"data spec '{raw}': registered corpora have a fixed text field; "
                              f"drop '#{field}' or use hf:{REGISTERED[spec].path}#{field}")
        return SourceSpec(raw, "hub", spec, cap)
    import difflib

    hint = difflib.get_close_matches(spec, [shakespeare.PRETRAIN_NAME, *REGISTERED], n=1)
    dym = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ConfigError(f"unknown data source '{raw}'{dym}; use {_forms()}, with #FIELD to name the "
                      f"text field and :N to cap at N documents")


def check_sources(specs: list[str]) -> list[SourceSpec]:
    """Parse every spec and check local files (exist, readable, text field present) before
    any slow work starts."""
    parsed = [parse_spec(s) for s in specs]
    for spec in parsed:
        if spec.kind == "hub":
            continue
        if spec.kind == "shipped":
            shakespeare.play_files()  # a broken install says so now, not after the tokenizer
            continue
        for f in local_files(spec):
            if spec.kind == "jsonl":
                check_jsonl(f, spec.text_field)
            elif spec.kind == "parquet":
                check_parquet(f, spec.text_field)
    return parsed


def hub_dataset(spec: SourceSpec) -> HubDataset:
    if spec.target in REGISTERED:
        return REGISTERED[spec.target]
    parts = spec.target.split("/")
    if len(parts) == 3:
        return HubDataset(f"{parts[0]}/{parts[1]}", parts[2], streaming=True, text_field=spec.text_field)
    return HubDataset(spec.target, None, streaming=True, text_field=spec.text_field)


def local_files(spec: SourceSpec) -> list[Path]:
    pattern = os.path.expanduser(spec.target)
    matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    files = [Path(m) for m in matches if Path(m).is_file()]
    if not files:
        if not glob.has_magic(pattern) and Path(pattern).is_dir():
            what = f"is a folder; write {spec.kind}:{spec.target.rstrip('/')}/*"
        else:
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
    if spec.kind == "shipped":  # content, not paths: the same corpus in any install shares a cache
        return [f"shipped:{shakespeare.fingerprint()}"]
    return [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in local_files(spec)]


def input_bytes(spec: SourceSpec) -> int | None:
    """Total size of a local source's files (for progress and ETA); None for the Hub."""
    if spec.kind == "shipped":
        return shakespeare.text_bytes()
    return None if spec.kind == "hub" else sum(f.stat().st_size for f in local_files(spec))


# --------------------------------------------------------------------------- documents

def _hub_documents(spec: SourceSpec, split: str) -> Iterator[str] | None:
    """Documents of one Hub split, or None when the dataset has no such split."""
    ds_info = hub_dataset(spec)
    require_hub(Missing(f"dataset '{spec.raw}'", "use local text with --set 'data.datasets=[\"text:PATH\"]'"),
                cached=dataset_cached(ds_info.path, ds_info.config))
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
                                  f"(fields: {', '.join(row)}); name it with hf:NAME#FIELD")
            text = row[ds_info.text_field]
            if isinstance(text, str) and text.strip():
                yield text
    return rows()


def has_validation_split(spec: SourceSpec) -> bool:
    return spec.kind == "hub" and spec.target in ("wikitext-2-raw-v1", "wikitext-103-raw-v1",
                                                   "roneneldan/TinyStories")


def iter_documents(spec: SourceSpec, split: str = "train") -> Iterator[str]:
    """Documents of `split` ("train" or "validation"), capped at spec.cap. Local files have
    only a train split (the store holds out its tail for validation)."""
    if spec.kind == "hub":
        found = _hub_documents(spec, split)
        docs: Iterator[str] = found if found is not None else iter(())
    elif split != "train":
        return iter(())
    elif spec.kind == "shipped":
        docs = shakespeare.scene_documents()
    elif spec.kind == "text":
        docs = (d for f in local_files(spec) for d in read_text(f))
    else:
        read = READERS[spec.kind]
        docs = (d for f in local_files(spec) for d in read(f, spec.text_field))
    return _capped(docs, spec.cap)


def _capped(docs: Iterator[str], cap: int | None) -> Iterator[str]:
    if cap is None:
        yield from docs
        return
    for i, doc in enumerate(docs):
        if i >= cap:
            return
        yield doc
