"""Checkpoints: one self-contained file, written atomically, loaded without unpickling code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts — model and
optimizer state, the resolved config, step and tokens seen, RNG and data position, the
evaluation history, the tokenizer's JSON and a format version — so
`torch.load(path, weights_only=True)` opens it and nothing in it can run code. Writes go to
a temporary file in the same folder, are flushed and fsynced, then renamed over the target:
a crash (even `kill -9`) at any instant leaves either the old file or the new one, never half
of one; a stray `.NAME.*.tmp` from a killed writer is removed when the next run starts.

Which checkpoint a resume continues from is `llmctl.resume`'s business; which ones a run
writes and keeps, `llmctl.retention`'s.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from llmctl.atomic import atomic_write
from llmctl.errors import ConfigError, LlmctlError
from llmctl.runtime import partial_file

FORMAT_VERSION = 1
KIND = "llmctl-checkpoint"


def checkpoint_path(run_dir: Path, run_name: str, stage: str, step: int | None) -> Path:
    """`<run>-<stage>_step{N}.pt`, or `<run>-<stage>_final.pt` when step is None."""
    suffix = "final" if step is None else f"step{step}"
    return run_dir / f"{run_name}-{stage}_{suffix}.pt"


# --------------------------------------------------------------------------- write and read

def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: temp file in the same folder, flush + fsync, rename, fsync the folder."""
    payload = {"kind": KIND, "format_version": FORMAT_VERSION, **payload}
    # partial_file: a second Ctrl-C deletes the temporary file rather than leave half a file
    atomic_write(path, lambda f: torch.save(payload, f), guard=partial_file)
    _fsync_dir(path.parent)  # make the rename itself durable


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check an llmctl checkpoint with weights_only=True; every failure is one LlmctlError line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a checkpoint file; pass a .pt file (or the run "
                          f"directory where a command accepts one)")
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise LlmctlError(f"{path} is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or a (legacy) pickle
        raise LlmctlError(f"{path} is not a readable checkpoint: not a PyTorch file (text, or another "
                          f"format?); pass an llmctl .pt file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on foreign files
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        what = f"it would import {found[1]}" if found else "it holds pickled objects that are not plain data"
        raise LlmctlError(f"{path} was refused: {what}; llmctl loads only tensors and plain values "
                          f"(weights_only) and never unpickles code") from None
    except MemoryError:
        raise LlmctlError(f"{path} does not fit in memory") from None
    except Exception as e:  # a damaged zip or pickle stream fails in many ways (EOF, KeyError, ...)
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise LlmctlError(f"{path} is not a readable checkpoint (truncated or corrupted?): {first}") from None
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise LlmctlError(f"{path} is a PyTorch file but not an llmctl checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise LlmctlError(f"{path} has checkpoint format {version}; this llmctl reads format "
                          f"{FORMAT_VERSION} — use the llmctl version that wrote it")
    return payload


# --------------------------------------------------------------------------- run directories

_STEP = re.compile(r"-(?P<stage>[a-z]+)_step(?P<step>\d+)\.pt$")
_PARTIAL = re.compile(r"^\..+\.pt\..+\.tmp$")


def step_checkpoints(run_dir: Path, stage: str | None = None) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in a run directory, oldest first."""
    found = []
    for p in run_dir.glob("*_step*.pt"):
        m = _STEP.search(p.name)
        if m and (stage is None or m["stage"] == stage):
            found.append((int(m["step"]), p))
    return sorted(found)


def all_checkpoints(run_dir: Path) -> list[Path]:
    """Every llmctl checkpoint file of any stage in a run directory."""
    if not run_dir.is_dir():
        return []
    return sorted({p for _, p in step_checkpoints(run_dir)} | set(run_dir.glob("*_final.pt")))


def resolve_checkpoint(path_or_dir: str | Path) -> Path:
    """A checkpoint file, or a run directory (its final checkpoint, else its latest step)."""
    p = Path(path_or_dir).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        finals = sorted(p.glob("*_final.pt"), key=lambda f: f.stat().st_mtime)
        if finals:
            return finals[-1]
        steps = step_checkpoints(p)
        if steps:
            return steps[-1][1]
        from llmctl.runs import training_in_progress

        training = training_in_progress(p)
        if training:
            raise ConfigError(f"{p} holds no checkpoint yet: {training}")
        raise ConfigError(f"{p} holds no llmctl checkpoint (*_final.pt or *_step<N>.pt); pass a .pt file, or "
                          f"a run directory that has saved one")
    raise ConfigError(f"checkpoint not found: {p}; pass a .pt file or a run directory")


def remove_partial_files(run_dir: Path) -> None:
    """Delete `.NAME.pt.*.tmp` files that a killed writer left behind; they are never checkpoints."""
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if _PARTIAL.match(p.name) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
