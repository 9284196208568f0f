"""Exact, faster encoding for GPT-2-style byte-level BPE tokenizers: split with the same
regex, cache each piece's ids.

Most of the `tokenizers` library's time per document goes to its general machinery
(normalized strings with alignment maps, one `Encoding` object per document), not to BPE
merges. For a tokenizer whose only pre-tokenizer is GPT-2's byte-level regex, the ids of
a document are the concatenation of the ids of its regex pieces, each piece encoded on
its own; and word frequencies are Zipfian, so a cache of piece -> ids answers almost
every piece without calling the tokenizer. This runs faster per core than
`encode_batch_fast` (`benchmarks/bench_tokenize.py`, figures in benchmarks/RESULTS.md) and
yields the same ids, under three guards:

1. Structure: no normalizer, a `ByteLevel` pre-tokenizer (no prefix space, GPT-2 regex),
   a `BPE` model without dropout, and added tokens that match as plain strings (no
   lstrip/rstrip/single_word). Anything else (Llama-3 style split rules, SentencePiece,
   WordPiece) keeps the tokenizer's own path.
2. Characters: Python's `regex` module and the tokenizer's Oniguruma may classify
   characters of recent Unicode versions differently (letter / number / space / other).
   Every candidate character is probed through both engines once; a document holding
   any character outside the agreed set is encoded by the tokenizer itself.
3. A probe text must encode identically through both paths, or the fast path is off.

The piece cache is bounded (`CACHE_ENTRIES`, cleared when full) so memory stays flat.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Characters probed for agreement (~0.2 s): the alphabets from Latin to Indic and Southeast
# Asian scripts, general punctuation and symbols, and emoji. Documents in other scripts
# (CJK ideographs, ...) take the tokenizer's own path.
CANDIDATES = [(0x0000, 0x3000), (0x1F000, 0x1FB00)]
CACHE_ENTRIES = 1 << 18  # ~50 MB of pieces and id tuples at most
PROBE_TEXT = ("Hello world! It's 2024; we'll see: 3.14159 and 1,000,000.\n\n\tTabs,   runs of   spaces  \n"
              "  leading and trailing  \r\nÜnïcödé façade, Ελληνικά, русский, हिन्दी, emoji 🎉🚀 "
              "“quotes” — dashes… <|endoftext|>after<|endoftext|> x's I'd they're you've I'm ")


def _probe(c: str) -> str:
    # Its pieces tell whether an engine takes c for a letter ("a{c}" stays whole), a number
    # ("1{c}"), other ("!{c}") or a space (split off everywhere, joins " {c}" runs).
    return f"a{c}1{c}!{c} {c}"


def _eligible(spec: dict[str, Any]) -> bool:
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    return (spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True)
            and model.get("type") == "BPE" and model.get("dropout") is None
            and not any(t.get("lstrip") or t.get("rstrip") or t.get("single_word")
                        for t in spec.get("added_tokens", [])))


def _ranges_class(codes: list[int]) -> str:
    """A regex character class matching every code point NOT in `codes` (sorted)."""
    import regex

    parts, start, prev = [], None, None
    for c in codes:
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            parts.append((start, prev))
            start = prev = c
    if start is not None:
        parts.append((start, prev))
    body = "".join(regex.escape(chr(a)) + ("-" + regex.escape(chr(b)) if b > a else "") for a, b in parts)
    return f"[^{body}]"


def plan(tokenizer_json: str, backend: Any) -> dict[str, Any] | None:
    """What workers need to build the fast encoder, or None when it cannot be exact."""
    try:
        import regex
    except ImportError:
        return None
    spec = json.loads(tokenizer_json)
    if not _eligible(spec):
        return None
    pattern = regex.compile(GPT2_PATTERN)
    pre = backend.pre_tokenizer

    def agree(chars: list[str]) -> bool:
        text = "\n".join(_probe(c) for c in chars)
        return pattern.findall(text) == [text[a:b] for _, (a, b) in pre.pre_tokenize_str(text)]

    def vetted(codes: list[int]) -> list[int]:
        if agree([chr(c) for c in codes]):
            return codes
        if len(codes) == 1:
            return []
        half = len(codes) // 2  # rare: bisect down to the characters the engines disagree on
        return vetted(codes[:half]) + vetted(codes[half:])

    safe: list[int] = []
    for lo, hi in CANDIDATES:
        for start in range(lo, hi, 256):
            safe += vetted([c for c in range(start, min(start + 256, hi)) if not 0xD800 <= c <= 0xDFFF])
    added = sorted((t["content"] for t in spec.get("added_tokens", [])), key=len, reverse=True)
    result = {"pattern": GPT2_PATTERN, "unsafe": _ranges_class(safe), "added": added}
    encoder = FastEncoder(backend, result)
    reference = backend.encode(PROBE_TEXT, add_special_tokens=False).ids
    return result if encoder.encode(PROBE_TEXT) == reference else None


class FastEncoder:
    """`encode(text) -> ids` (or None when the text holds a character not vetted by `plan`)."""

    def __init__(self, backend: Any, planned: dict[str, Any]):
        import regex

        self.backend = backend
        self.findall: Callable[[str], list[str]] = regex.compile(planned["pattern"]).findall
        self.unsafe = regex.compile(planned["unsafe"]).search
        self.added_ids = {t: backend.token_to_id(t) for t in planned["added"]}
        self.split_added = (regex.compile("(" + "|".join(regex.escape(t) for t in planned["added"]) + ")").split
                            if planned["added"] else None)
        self.cache: dict[str, tuple[int, ...]] = {}

    def _pieces(self, text: str, out: list[int]) -> None:
        cache = self.cache
        for piece in self.findall(text):
            ids = cache.get(piece)
            if ids is None:
                if len(cache) >= CACHE_ENTRIES:
                    cache.clear()
                ids = cache[piece] = tuple(self.backend.encode(piece, add_special_tokens=False).ids)
            out += ids

    def encode(self, text: str) -> list[int] | None:
        if self.unsafe(text):
            return None
        out: list[int] = []
        if self.split_added is None:
            self._pieces(text, out)
            return out
        # re.split with one group: [text, added, text, added, ..., text]
        for i, part in enumerate(self.split_added(text)):
            if i % 2:
                out.append(self.added_ids[part])
            elif part:
                self._pieces(part, out)
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Like the tokenizer's encode_batch_fast(...).ids; unvetted texts go to the tokenizer."""
        results = [self.encode(t) for t in texts]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            encoded = self.backend.encode_batch_fast([texts[i] for i in missing], add_special_tokens=False)
            for i, e in zip(missing, encoded):
                results[i] = e.ids
        return results  # type: ignore[return-value]
