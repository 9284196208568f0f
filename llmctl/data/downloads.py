"""Every download a run needs, checked before any slow work, so that one error names them all.

A run may need from the Hugging Face Hub its tokenizer (`data.tokenizer` = a Hub name) and
its Hub datasets (`data.datasets`, `sft.datasets`). Each piece is available when the Hub
can be reached; without it (unreachable, or HF_HUB_OFFLINE=1) when the Hugging Face cache
holds it, or, for pretraining, when llmctl's own cache does: a finished token store for
these sources and tokenizer needs no dataset, and the tokenizer.json a store keeps stands
in for a Hub tokenizer. What is left is missing, and `DownloadCheck.error` lists it, each
piece with the `--set` that replaces it, and a last line with what fixes them all.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

from llmctl.config import DataConfig
from llmctl.data.hub import REACHABLE, UNREACHABLE, Missing, dataset_cached, downloads_error, hub_status, shown_path
from llmctl.data.tokenizer import TOKENIZER_FIX, TextTokenizer, is_hub_name
from llmctl.errors import ConfigError

MISSING = "missing"


@dataclass(frozen=True)
class Piece:
    what: str  # tokenizer 'gpt2', dataset 'wikitext-2-raw-v1'
    source: str  # where it comes from, as a user reads it; MISSING when nowhere
    fix: str = ""  # for a missing piece: what replaces it


@dataclass
class DownloadCheck:
    status: str | None  # hub_status(), or None when nothing needs the Hub (not probed)
    pieces: list[Piece] = field(default_factory=list)
    tokenizer: TextTokenizer | None = None  # the tokenizer, when the check had to load it

    @property
    def missing(self) -> list[Piece]:
        return [p for p in self.pieces if p.source == MISSING]

    def __add__(self, other: "DownloadCheck") -> "DownloadCheck":
        return DownloadCheck(self.status or other.status, self.pieces + other.pieces, self.tokenizer)

    def error(self, closing: str = "", who: str = "this run") -> ConfigError | None:
        """One error naming every missing piece with its fix; None when nothing is missing."""
        missing = self.missing
        if not missing:
            return None
        them = "them" if len(missing) > 1 else "it"
        return downloads_error([Missing(p.what, p.fix) for p in missing], self.status or UNREACHABLE,
                               closing.replace("{them}", them), who)

    def rows(self) -> list[tuple[str, str]]:
        """(piece, where it comes from) for `--dry-run`."""
        return [(p.what, p.source) for p in self.pieces]  # the error that follows gives each fix

    def heading(self) -> str:
        if not self.pieces:
            return "downloads: none (the tokenizer and the data are local)"
        return {REACHABLE: "downloads (the Hugging Face Hub is reachable)",
                UNREACHABLE: "downloads (the Hugging Face Hub cannot be reached)"}.get(
            self.status or "", "downloads (offline: HF_HUB_OFFLINE is set)")


def require(check: DownloadCheck, closing: str = "", who: str = "this run") -> None:
    error = check.error(closing, who)
    if error is not None:
        raise error


FROM_HUB = "from the Hugging Face Hub (or its cache)"


def _in_hf_cache() -> str:
    from llmctl.data.hub import hf_home

    return f"in the Hugging Face cache ({shown_path(hf_home())})"


def _replace_fix(key: str, specs: list[str], missing: list[str], kind: str) -> str:
    """`--set` for `key` with every missing entry replaced by a local KIND:PATH one."""
    paths = iter(["PATH"] if len(missing) == 1 else [f"PATH{i + 1}" for i in range(len(missing))])
    value = [f"{kind}:{next(paths)}" if s in missing else s for s in specs]
    return f"--set {shlex.quote(f'{key}={json.dumps(value)}')}"


def _dataset_pieces(key: str, raws: list[str], missing: list[str], kind: str, hint: str) -> dict[str, Piece]:
    """The fix of each missing dataset: the first names the one --set that replaces them all."""
    fixes: dict[str, Piece] = {}
    for i, raw in enumerate(missing):
        fix = (f"{hint} with {_replace_fix(key, raws, missing, kind)}" if i == 0
               else "the --set above replaces it too")
        fixes[raw] = Piece(f"dataset '{raw}'", MISSING, fix)
    return fixes


def check_pretrain_downloads(cfg: DataConfig) -> DownloadCheck:
    """What the tokenizer and `data.datasets` need from the Hub, and whether each is at hand."""
    from llmctl.data.sources import check_sources, hub_dataset

    specs = check_sources(cfg.datasets)
    hub_specs = [s for s in specs if s.kind == "hub"]
    tokenizer_on_hub = is_hub_name(cfg.tokenizer)
    if not hub_specs and not tokenizer_on_hub:
        return DownloadCheck(None)  # nothing from the Hub: no probe
    status = hub_status()
    names = [f"dataset '{s.raw}'" for s in hub_specs]
    if status == REACHABLE:
        pieces = [Piece(f"tokenizer '{cfg.tokenizer}'", FROM_HUB)] if tokenizer_on_hub else []
        return DownloadCheck(status, pieces + [Piece(n, FROM_HUB) for n in names])

    from llmctl.data.store import cache_root, open_store, store_path
    from llmctl.data.tokenizer import cached_hub_tokenizer, stored_tokenizer

    check = DownloadCheck(status)
    if tokenizer_on_hub:
        check.tokenizer = cached_hub_tokenizer(cfg.tokenizer)  # the Hugging Face cache only
        source = _in_hf_cache()
        if check.tokenizer is None:
            check.tokenizer = stored_tokenizer(cfg.tokenizer, cache_root(cfg))
            source = f"in llmctl's cache ({shown_path(cache_root(cfg))}), kept by a token store made with it"
        check.pieces.append(Piece(f"tokenizer '{cfg.tokenizer}'", source if check.tokenizer else MISSING,
                                  "" if check.tokenizer else TOKENIZER_FIX))
    uncached = [s for s in hub_specs if not dataset_cached(hub_dataset(s).path, hub_dataset(s).config)]
    store = None
    if uncached:  # a finished token store of these sources needs none of them
        tokenizer = check.tokenizer if tokenizer_on_hub else _local_tokenizer(cfg)
        if tokenizer is not None:
            store = open_store(store_path(cfg, specs, tokenizer))
    missing = [s.raw for s in uncached] if store is None else []
    fixes = _dataset_pieces("data.datasets", list(cfg.datasets), missing, "text", "use local text")
    for spec, name in zip(hub_specs, names):
        if store is not None:
            check.pieces.append(Piece(name, f"in llmctl's token cache ({shown_path(store.path)})"))
        else:
            check.pieces.append(fixes.get(spec.raw, Piece(name, _in_hf_cache())))
    return check


def _local_tokenizer(cfg: DataConfig) -> TextTokenizer | None:
    """A folder's tokenizer, or train:V's when it is trained and cached (else None)."""
    from llmctl.data.tokenizer import ready_tokenizer

    return ready_tokenizer(cfg)


def check_sft_downloads(specs: list[str], fetch_args: list[str] | None = None) -> DownloadCheck:
    """What `sft.datasets` need from the Hub (the tokenizer comes from the checkpoint); a missing
    one's fix names `llmctl data inspect --sft SPEC *fetch_args`, which caches the whole set."""
    from llmctl.data.sft import check_sft_sources, sft_hub_dataset

    parsed = check_sft_sources(specs)
    hub_specs = [s for s in parsed if s.kind == "hub"]
    if not hub_specs:
        return DownloadCheck(None)
    status = hub_status()
    if status == REACHABLE:
        return DownloadCheck(status, [Piece(f"dataset '{s.raw}'", FROM_HUB) for s in hub_specs])
    missing = [s.raw for s in hub_specs if not dataset_cached(*sft_hub_dataset(s))]
    fixes = _dataset_pieces("sft.datasets", list(specs), missing, "jsonl", "use a local file")
    pieces = []
    for s in hub_specs:
        piece = fixes.get(s.raw)
        if piece is None:
            pieces.append(Piece(f"dataset '{s.raw}'", _in_hf_cache()))
            continue
        fetch = shlex.join(["llmctl", "data", "inspect", "--sft", s.raw, *(fetch_args or [])])
        pieces.append(Piece(piece.what, MISSING, f"{piece.fix}, or fetch it once while online with `{fetch}`"))
    return DownloadCheck(status, pieces)


def prepare_command(preset: str | None, overrides: list[str] | None) -> str:
    """The command that fetches (and tokenizes) a pretraining config's downloads while online."""
    sets = [a for o in overrides or [] for a in ("--set", o)]
    return shlex.join(["llmctl", "data", "prepare", *(["--preset", preset] if preset else []), *sets])


def pretrain_closing(prepare: str | None, quickstart: bool = True) -> str:
    """The last line of a pretraining run's error: fetch everything at once, or go offline-only."""
    fetch = f"`{prepare}`" if prepare else "`llmctl data prepare` (same preset and --set values)"
    line = f"or fetch {{them}} once while online with {fetch}"
    return line + ("; or run `llmctl pretrain --preset quickstart`, which needs no network" if quickstart else "")
