"""Files replaced in one step: a reader (or a crash) sees the old file or the new one, never half.

The bytes go to a temporary file in the same folder (so the rename stays on one filesystem),
are flushed and fsynced, then renamed over the target; on any failure the temporary file is
removed. Checkpoints add a second-Ctrl-C guard on top (see checkpoint.save_checkpoint).
Imports nothing heavy, so torch-free commands (`llmctl runs`) can use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], object],
                 guard: Callable[[str], contextlib.AbstractContextManager] | None = None) -> None:
    """`write(f)` fills the temporary file; `guard(tmp_path)` (optional) wraps the whole write,
    e.g. so a second Ctrl-C can delete the temporary file before exiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with guard(tmp) if guard else contextlib.nullcontext():
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def write_text_atomic(path: Path, text: str) -> None:
    """A small text file (config.toml, status.json) replaced in one step."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
