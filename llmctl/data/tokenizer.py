"""Tokenizers: loaded once through transformers, then used as the fast Rust `tokenizers` object.

`TextTokenizer` is the one type the rest of llmctl sees. It is built from a Hub name or a
local folder (`AutoTokenizer`), or from the JSON stored inside a checkpoint, so a checkpoint
copied anywhere still encodes and decodes exactly as in training. Its fingerprint (a hash of
that JSON) ties token stores and checkpoints to the tokenizer that made them, and
`check_fingerprint` refuses to mix ids from two different tokenizers.

`data.tokenizer = "train:V"` trains a byte-level BPE of V tokens on the configured sources
instead (see `llmctl.data.bpe`); `resolve_tokenizer` is the one entry point for all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.errors import ConfigError, LlmctlError

if TYPE_CHECKING:
    from llmctl.config import DataConfig

_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


@dataclass
class TextTokenizer:
    backend: Any  # tokenizers.Tokenizer
    eos_id: int
    source: str  # the name or folder it came from, for messages

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        return self.backend.to_str()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking; it runs on the Rust thread pool.
        fast = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def to_state(self) -> dict[str, Any]:
        """What a checkpoint stores: plain strings and ints (safe under weights_only)."""
        return {"json": self.to_json(), "eos_id": self.eos_id, "source": self.source,
                "fingerprint": self.fingerprint}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "TextTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(state["json"]), int(state["eos_id"]), str(state.get("source", "checkpoint")))


def is_hub_name(name: str) -> bool:
    """`data.tokenizer` names a Hub repo (gpt2, ORG/NAME), not a folder or `train:V`."""
    if name.startswith("train:"):
        return False
    path = Path(os.path.expanduser(name))
    # A Hub id is NAME or ORG/NAME; anything that exists, or looks like a path, is local.
    return not (path.exists() or name.startswith((".", "/", "~")) or name.strip("/").count("/") > 1)


def tokenizer_folder(name: str) -> Path | None:
    """The local folder a tokenizer name means, checked to hold tokenizer.json; None for a Hub
    name. Cheap (no loading), so a wrong path fails before any slow work or display."""
    if is_hub_name(name):
        return None
    path = Path(os.path.expanduser(name))
    if not path.is_dir():
        raise ConfigError(f"data.tokenizer: {name} is not a folder; give a folder with "
                          f"tokenizer.json or a Hub name such as gpt2")
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"data.tokenizer: {name} has no tokenizer.json; save one with "
                          f"tokenizer.save_pretrained(folder) or give a Hub name such as gpt2")
    return path


TOKENIZER_FIX = ("train one on the data with --set data.tokenizer=train:8192, or use a folder holding "
                 "tokenizer.json with --set data.tokenizer=FOLDER")


def load_tokenizer(name: str, llmctl_cache: Path | None = None) -> TextTokenizer:
    """A Hub tokenizer name (`gpt2`) or a local folder holding tokenizer.json. Without the Hub,
    a Hub name comes from the Hugging Face cache, else from the copy a token store in
    `llmctl_cache` keeps of it."""
    if name.startswith("train:"):
        raise ConfigError(f"data.tokenizer '{name}' is trained from data.datasets; "
                          f"load it with resolve_tokenizer(cfg.data)")
    if is_hub_name(name):
        from llmctl.data.hub import REACHABLE, Missing, hub_status, require_hub

        if hub_status() == REACHABLE:
            return _from_transformers(name, name)
        found = cached_hub_tokenizer(name, llmctl_cache)
        require_hub(Missing(f"tokenizer '{name}'", TOKENIZER_FIX), cached=found is not None)
        return found
    return _from_transformers(str(tokenizer_folder(name)), name)


def cached_hub_tokenizer(name: str, llmctl_cache: Path | None = None) -> TextTokenizer | None:
    """Hub tokenizer `name` without the Hub: from the Hugging Face cache, else from the newest
    token store in `llmctl_cache` made with it (each keeps the tokenizer.json it was made
    with); None when neither has it."""
    from llmctl.data.hub import tokenizer_files_cached

    if tokenizer_files_cached(name):
        try:  # local_files_only: never a request, so no retries against an unreachable Hub
            return _from_transformers(name, name, local_files_only=True)
        except LlmctlError:
            pass  # part of it is cached, not all that transformers needs
    return stored_tokenizer(name, llmctl_cache) if llmctl_cache is not None else None


def stored_tokenizer(name: str, cache: Path) -> TextTokenizer | None:
    """The tokenizer.json a token store in `cache` keeps of tokenizer `name`, newest first."""
    from tokenizers import Tokenizer

    stores = sorted(cache.glob("tokens-*/manifest.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for manifest in stores:
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
            if meta.get("tokenizer") != name:
                continue
            tok = TextTokenizer(Tokenizer.from_str((manifest.parent / "tokenizer.json").read_text(encoding="utf-8")),
                                int(meta["eos_id"]), name)
        except Exception:  # a damaged store (tokenizers raises plain Exception): try the next
            continue
        if tok.fingerprint == meta.get("tokenizer_fingerprint"):
            return tok
    return None


def _from_transformers(ref: str, name: str, local_files_only: bool = False) -> TextTokenizer:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(ref, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise LlmctlError(f"cannot load tokenizer '{name}': {str(e).splitlines()[0]}") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise LlmctlError(f"tokenizer '{name}' has no fast (Rust) version; use one with tokenizer.json")
    if backend.get_vocab_size(with_added_tokens=True) == 0:
        raise LlmctlError(f"tokenizer '{name}' loaded with an empty vocabulary; check its tokenizer.json")
    eos = tok.eos_token_id
    if eos is None:
        vocab = backend.get_vocab(with_added_tokens=True)
        eos = next((vocab[t] for t in _EOS_CANDIDATES if t in vocab), None)
    if eos is None:
        raise LlmctlError(f"tokenizer '{name}' has no end-of-text token to separate documents; "
                          f"add one (e.g. <|endoftext|>) as its eos_token")
    return TextTokenizer(backend, int(eos), name)


def _load_named(cfg: "DataConfig") -> TextTokenizer:
    from llmctl.data.store import cache_root

    return load_tokenizer(cfg.tokenizer, cache_root(cfg))


def resolve_tokenizer(cfg: "DataConfig", on_status: Callable[[str], None] | None = None) -> TextTokenizer:
    """`data.tokenizer` -> TextTokenizer: a Hub name, a local folder, or `train:V` (a byte-level
    BPE trained on `data.datasets`, cached after the first time)."""
    from llmctl.data.bpe import parse_train_spec, train_tokenizer

    vocab = parse_train_spec(cfg.tokenizer)
    return _load_named(cfg) if vocab is None else train_tokenizer(cfg, vocab, on_status)


def check_tokenizer_name(cfg: "DataConfig") -> None:
    """What `resolve_tokenizer` would refuse without loading anything: a malformed train:V, a
    local folder that is missing or holds no tokenizer.json."""
    from llmctl.data.bpe import parse_train_spec

    if parse_train_spec(cfg.tokenizer) is None:
        tokenizer_folder(cfg.tokenizer)


def ready_tokenizer(cfg: "DataConfig") -> TextTokenizer | None:
    """The tokenizer `resolve_tokenizer` would give, if that needs no training (it is loaded,
    or cached from an earlier run); None if it still has to be trained."""
    from llmctl.data.bpe import cached_trained_tokenizer, parse_train_spec

    vocab = parse_train_spec(cfg.tokenizer)
    return _load_named(cfg) if vocab is None else cached_trained_tokenizer(cfg, vocab)


def planned_vocab_size(cfg: "DataConfig") -> int:
    """The tokenizer's vocabulary without training one (for `--dry-run`): the ready
    tokenizer's, else V for train:V (an upper bound: training may stop short of V)."""
    from llmctl.data.bpe import parse_train_spec

    ready = ready_tokenizer(cfg)
    if ready is not None:
        return ready.vocab_size
    vocab = parse_train_spec(cfg.tokenizer)
    return vocab if vocab is not None else _load_named(cfg).vocab_size


def check_fingerprint(expected: str, tokenizer: TextTokenizer, what: str) -> None:
    """Refuse ids made by another tokenizer: `what` (a token store, a checkpoint) was made with
    tokenizer fingerprint `expected`."""
    if expected != tokenizer.fingerprint:
        raise LlmctlError(f"{what} was made with tokenizer fingerprint {expected}, but data.tokenizer "
                          f"({tokenizer.source}) has fingerprint {tokenizer.fingerprint}; use the "
                          f"tokenizer it was made with (a checkpoint carries its own)")
