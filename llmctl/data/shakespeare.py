"""The corpus that ships with llmctl: Shakespeare's 37 plays, so a first run needs no network.

Two sources come from the same files (`llmctl/corpus/shakespeare/*.txt.gz`, 4.9 MB of text,
1.9 MB on disk; provenance and license in that folder's README.md):

    shakespeare            pretraining documents, one per scene (with its play's title on top)
    shakespeare-dialogue   SFT records: one speech and the reply that follows it, from another
                           speaker in the same scene ({"prompt": ..., "response": ...})

The texts mark a speech as a block (lines between blank lines) whose first line is only the
speaker's name and a full stop ("PROSPERO." or "Ham."); stage directions are in [brackets].
"""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
from collections.abc import Iterator
from pathlib import Path

from llmctl.errors import LlmctlError

CORPUS_DIR = Path(__file__).resolve().parent.parent / "corpus" / "shakespeare"
PRETRAIN_NAME = "shakespeare"
DIALOGUE_NAME = "shakespeare-dialogue"
NAMES = (PRETRAIN_NAME, DIALOGUE_NAME)

# "ACT 1", "ACT II.", "SCENE 2", "Scene IV. A Hall in ..."; not "SCENE: The sea" (a setting).
_HEADING = re.compile(r"^(act|scene)\s+([ivxlc]+|\d+)\b", re.IGNORECASE)
# "PROSPERO." or "Ham." (most plays), or a bare upper-case "THESEUS" (A Midsummer Night's Dream).
_SPEAKER = re.compile(r"^(?:[A-Z][A-Za-z'&-]*(?: [A-Za-z'&-]+){0,3}\.|[A-Z][A-Z'&-]+(?: [A-Z'&-]+){0,3})$")
_DIRECTION = re.compile(r"\[[^\]]*\]")
# A reply pair is kept when both speeches fit the quickstart's 256-token context together
# (about 3 characters a token with the trained 4,096-token vocabulary, plus the template).
MAX_PAIR_CHARS = 560


def play_files() -> list[Path]:
    files = sorted(CORPUS_DIR.glob("*.txt.gz"))
    if not files:
        raise LlmctlError(f"the shipped corpus is missing from {CORPUS_DIR}; reinstall llmctl "
                          f"(pip install --force-reinstall llmctl)")
    return files


def read_play(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def text_bytes() -> int:
    """Uncompressed size of all plays, from each gzip trailer (no decompression)."""
    total = 0
    for path in play_files():
        with open(path, "rb") as f:
            f.seek(-4, 2)
            total += struct.unpack("<I", f.read(4))[0]
    return total


def fingerprint() -> str:
    """Identity of the shipped files, for cache keys: names and compressed contents."""
    h = hashlib.sha256()
    for path in play_files():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _blocks(text: str) -> list[list[str]]:
    """Blank-line separated blocks of stripped-right lines."""
    blocks, block = [], []
    for line in text.splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            blocks.append(block)
            block = []
    if block:
        blocks.append(block)
    return blocks


def _scenes(text: str) -> list[list[list[str]]]:
    """A play's blocks grouped into scenes: a new group starts at an ACT or SCENE heading once
    the current group holds a speech (so "ACT 2" and "SCENE I" open the same scene)."""
    scenes: list[list[list[str]]] = [[]]
    has_speech = False
    for block in _blocks(text):
        if _HEADING.match(block[0]) and has_speech:
            scenes.append([])
            has_speech = False
        scenes[-1].append(block)
        has_speech = has_speech or _speech(block) is not None
    return [s for s in scenes if s]


def _speech(block: list[str]) -> tuple[str, str] | None:
    """(speaker, words) of a speech block, stage directions removed; None for anything else."""
    if len(block) < 2 or not _SPEAKER.match(block[0]):
        return None
    lines = [_DIRECTION.sub("", line).strip() for line in block[1:]]
    words = "\n".join(line for line in lines if line)
    return (block[0].rstrip(".").upper(), words) if words else None


def scene_documents() -> Iterator[str]:
    """Every scene of every play, in file order, as a document headed by the play's title."""
    for path in play_files():
        text = read_play(path)
        title = next((line.strip() for line in text.splitlines() if line.strip()), path.stem)
        for i, scene in enumerate(_scenes(text)):
            body = "\n\n".join("\n".join(block) for block in scene)
            yield body if i == 0 else f"{title}\n\n{body}"


def dialogue_records() -> Iterator[tuple[str, dict[str, str]]]:
    """(where, {"prompt", "response"}) for each speech answered by another speaker in the same
    scene, when the pair is short enough to learn from in one window."""
    for path in play_files():
        for si, scene in enumerate(_scenes(read_play(path))):
            speeches = [s for s in map(_speech, scene) if s is not None]
            for (who, said), (other, reply) in zip(speeches, speeches[1:]):
                if who != other and len(said) + len(reply) <= MAX_PAIR_CHARS:
                    yield (f"{DIALOGUE_NAME} ({path.name.removesuffix('.txt.gz')}, scene {si})",
                           {"prompt": said, "response": reply})
