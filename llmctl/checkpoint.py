"""Checkpoints: one self-contained file, written atomically, loaded without unpickling code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts — model and
optimizer state, the resolved config, step and tokens seen, RNG and data position, the
tokenizer's JSON and a format version — so `torch.load(path, weights_only=True)` opens it
and nothing in it can run code. Writes go to a temporary file in the same folder, are
flushed and fsynced, then renamed over the target: a crash at any instant leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from llmctl.config import Config
from llmctl.data.tokenizer import TextTokenizer
from llmctl.errors import LlmctlError
from llmctl.trainer import Callback, Trainer

FORMAT_VERSION = 1
KIND = "llmctl-checkpoint"


def checkpoint_path(run_dir: Path, run_name: str, stage: str, step: int | None) -> Path:
    """`<run>-<stage>_step{N}.pt`, or `<run>-<stage>_final.pt` when step is None."""
    suffix = "final" if step is None else f"step{step}"
    return run_dir / f"{run_name}-{stage}_{suffix}.pt"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    payload = {"kind": KIND, "format_version": FORMAT_VERSION, **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check an llmctl checkpoint; every failure is one LlmctlError line."""
    path = Path(path)
    if not path.is_file():
        raise LlmctlError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise LlmctlError(f"{path} was refused: it holds objects that are not plain tensors and values "
                          f"({first[:160]}); llmctl never unpickles code — only load files you trust "
                          f"with other tools") from None
    except Exception as e:  # a damaged zip or pickle stream fails in many ways (EOF, KeyError, ...)
        raise LlmctlError(f"{path} is not a readable checkpoint (truncated or corrupted?): "
                          f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}") from None
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise LlmctlError(f"{path} is a PyTorch file but not an llmctl checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise LlmctlError(f"{path} has checkpoint format {version}; this llmctl reads format "
                          f"{FORMAT_VERSION} — use the llmctl version that wrote it")
    return payload


_STEP = re.compile(r"-(?P<stage>[a-z]+)_step(?P<step>\d+)\.pt$")


def step_checkpoints(run_dir: Path, stage: str | None = None) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in a run directory, oldest first."""
    found = []
    for p in run_dir.glob("*_step*.pt"):
        m = _STEP.search(p.name)
        if m and (stage is None or m["stage"] == stage):
            found.append((int(m["step"]), p))
    return sorted(found)


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
        raise LlmctlError(f"{p} holds no llmctl checkpoint (*_final.pt or *_step<N>.pt)")
    raise LlmctlError(f"checkpoint not found: {p}; pass a .pt file or a run directory")


def prune_step_checkpoints(run_dir: Path, stage: str, keep_last: int) -> None:
    """Keep the `keep_last` newest step checkpoints of a stage; final ones are never touched."""
    if keep_last <= 0:
        return
    for _, old in step_checkpoints(run_dir, stage)[:-keep_last]:
        with contextlib.suppress(OSError):
            old.unlink()


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


class CheckpointCallback(Callback):
    """Writes `<run>-<stage>_step{N}.pt` and `<run>-<stage>_final.pt`, each self-contained."""

    def __init__(self, run_dir: Path, cfg: Config, stage: str, tokenizer: TextTokenizer,
                 data_meta: dict[str, Any], keep_last: int):
        self.run_dir = run_dir
        self.cfg = cfg
        self.stage = stage
        self.tokenizer = tokenizer
        self.data_meta = data_meta
        self.keep_last = keep_last
        self.last_path: Path | None = None

    def on_save(self, trainer: Trainer, final: bool) -> None:
        path = checkpoint_path(self.run_dir, self.cfg.run.name, self.stage, None if final else trainer.step)
        save_checkpoint(path, {
            "stage": self.stage,
            "config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer.to_state(),
            "data": {"sources": self.data_meta["sources"], "tokens": self.data_meta["tokens"]},
            **trainer.state_dict(),
        })
        self.last_path = path
        if not final:
            prune_step_checkpoints(self.run_dir, self.stage, self.keep_last)
