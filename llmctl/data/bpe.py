"""`data.tokenizer = "train:V"`: a byte-level BPE of V tokens trained on the sources themselves.

For offline work and for small models, where a 50k vocabulary spends most of the
parameters on embeddings. The `tokenizers` BPE trainer (Rust) sees up to `SAMPLE_CHARS`
characters of training documents, an equal share from each source taken from its start
(in stream order, within its cap). Training therefore costs seconds to a few minutes
whatever the corpus size, and what the trainer keeps (counts of distinct words) does not
grow with the corpus. The sample never reaches into validation: sources with their own
validation split contribute only their train split, and for the others, whose tail the
token store holds out, the sample stops short of that tail (`before_holdout`).

Byte-level (GPT-2 style pre-tokenizer and decoder, all 256 bytes in the alphabet) means
no text is ever out of vocabulary. `<|endoftext|>` is id 0 and separates documents.
Training is deterministic for the same inputs; the result is cached in
`<cache>/tokenizer-<key>/` (key: sources and their file identities, V, sample size, validation
fraction) with a
`tokenizer_config.json`, so the folder also works as `data.tokenizer = <folder>`. The token
store keeps a copy (tokenizer.json) and every checkpoint carries its JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from llmctl.config import DataConfig
from llmctl.data.sources import SourceSpec, check_sources, fingerprint_inputs, has_validation_split, iter_documents
from llmctl.data.tokenizer import TextTokenizer, load_tokenizer
from llmctl.errors import ConfigError, LlmctlError

EOS = "<|endoftext|>"
SAMPLE_CHARS = 50_000_000  # ~50 MB of text: plenty for vocabularies up to ~50k
MIN_VOCAB = 256 + 1 + 1  # the byte alphabet, EOS, and at least one merge
MAX_VOCAB = 1 << 20
BPE_FORMAT = 2  # 2: the sample leaves out the held-out tail (1 could include it)
# The share of a source's text (UTF-8 bytes, plus one per end-of-text) left out of the sample
# is this many times data.validation_fraction (see before_holdout), at most HOLDOUT_MARGIN_CAP.
HOLDOUT_MARGIN = 2.0
HOLDOUT_MARGIN_CAP = 0.8


def parse_train_spec(name: str) -> int | None:
    """V from `train:V`, None for any other tokenizer name."""
    if not name.startswith("train:"):
        return None
    raw = name.removeprefix("train:")
    if not re.fullmatch(r"\d+", raw) or not MIN_VOCAB <= int(raw) <= MAX_VOCAB:
        raise ConfigError(f"data.tokenizer '{name}': V must be a whole number from {MIN_VOCAB} "
                          f"(256 bytes, end-of-text, one merge) to {MAX_VOCAB}, e.g. train:8192")
    return int(raw)


def tokenizer_dir(cfg: DataConfig, vocab: int, specs: list[SourceSpec]) -> Path:
    from llmctl.data.store import cache_root

    identity = {"format": BPE_FORMAT, "vocab": vocab, "sample_chars": SAMPLE_CHARS,
                "validation_fraction": cfg.validation_fraction,
                "sources": [[s.raw, fingerprint_inputs(s)] for s in specs]}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root(cfg) / f"tokenizer-{key}"


def _load(folder: Path, vocab: int) -> TextTokenizer:
    # Through the same loader as any tokenizer folder, so `data.tokenizer = <folder>` gives the
    # same fingerprint (transformers normalizes the JSON it loads).
    loaded = load_tokenizer(str(folder))
    return TextTokenizer(loaded.backend, loaded.eos_id, f"train:{vocab}")


def cached_trained_tokenizer(cfg: DataConfig, vocab: int) -> TextTokenizer | None:
    folder = tokenizer_dir(cfg, vocab, check_sources(cfg.datasets))
    return _load(folder, vocab) if (folder / "tokenizer.json").is_file() else None


def sample_documents(specs: list[SourceSpec], budget: int, validation_fraction: float) -> Iterator[str]:
    """Training documents, up to budget / len(specs) characters from the start of each source.

    A source without its own validation split contributes only text before the tail the token
    store will hold out with `validation_fraction` (data.validation_fraction; see
    `before_holdout`)."""
    share = budget // len(specs)
    for spec in specs:
        used = 0
        docs = iter_documents(spec, "train")
        if not has_validation_split(spec):
            docs = before_holdout(docs, validation_fraction)
        for doc in docs:
            yield doc
            used += len(doc)
            if used >= share:
                break


def before_holdout(docs: Iterable[str], fraction: float) -> Iterator[str]:
    """The documents of a source that end within its first (1 - m) of text, m = HOLDOUT_MARGIN
    x fraction (at most HOLDOUT_MARGIN_CAP), text measured in UTF-8 bytes plus one per
    end-of-text; when the first document ends later, only its first (1 - m) of text.

    Why a margin: the store holds out the shortest tail of documents holding `fraction` of the
    *tokens*, or cuts the stream at 1 - fraction of them (`llmctl.data.holdout`), and tokens
    are known only once this tokenizer exists. The documents left out here hold at least m of
    the text, so they include every held-out one as long as they have at least fraction / m
    (1/2) of the source's average tokens per byte; text of one kind has about the average,
    and text the tokenizer never saw has more. The source is read ahead of what is yielded,
    holding the documents not yet known to end in the first (1 - m) of it: about m / (1 - m)
    of what has been yielded."""
    keep = 1.0 - min(HOLDOUT_MARGIN * fraction, HOLDOUT_MARGIN_CAP)
    pending: deque[tuple[str, int]] = deque()  # (document, its end in the source's text)
    size = 0  # text read so far
    yielded = False
    for doc in docs:
        size += _utf8_len(doc) + 1
        pending.append((doc, size))
        while pending and pending[0][1] <= keep * size:  # ends in the first `keep`, whatever follows
            yield pending.popleft()[0]
            yielded = True
    if not yielded and pending:  # one document holds the head of the text: sample its head
        doc = pending[0][0]
        head = doc.encode("utf-8")[: int(keep * size)].decode("utf-8", errors="ignore")
        if head:
            yield head


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def train_tokenizer(cfg: DataConfig, vocab: int,
                    on_status: Callable[[str], None] | None = None) -> TextTokenizer:
    """The cached BPE for these sources and V, training it first when missing."""
    specs = check_sources(cfg.datasets)
    folder = tokenizer_dir(cfg, vocab, specs)
    if (folder / "tokenizer.json").is_file():
        return _load(folder, vocab)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if on_status:
        on_status(f"training a byte-level BPE tokenizer of {vocab:,} tokens on up to "
                  f"{SAMPLE_CHARS // 1_000_000} MB of {', '.join(s.raw for s in specs)}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    seen = {"documents": 0}

    def counted() -> Iterator[str]:
        for doc in sample_documents(specs, SAMPLE_CHARS, cfg.validation_fraction):
            seen["documents"] += 1
            yield doc
    backend.train_from_iterator(counted(), trainer=trainer)
    if seen["documents"] == 0:
        raise LlmctlError(f"data.tokenizer '{cfg.tokenizer}': the sources yielded no text to train on; "
                          f"check that data.datasets are not empty")

    save_tokenizer_folder(backend.to_str(), EOS, folder)
    return _load(folder, vocab)


def save_tokenizer_folder(tokenizer_json: str, eos: str, folder: Path) -> None:
    """Write tokenizer.json and a tokenizer_config.json naming `eos` into `folder` atomically
    (a whole folder appears, or none), so it also works as `data.tokenizer = <folder>`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        (partial / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (partial / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
            "unk_token": eos, "model_max_length": 1 << 30, "add_prefix_space": False}, indent=2))
        try:
            os.replace(partial, folder)
        except OSError:
            if not (folder / "tokenizer.json").is_file():  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
