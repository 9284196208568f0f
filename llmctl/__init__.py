"""llmctl: train small language models from scratch on your own hardware.

Nothing heavy is imported here, so `llmctl --help` stays instant: the Python API below is
loaded on first use (PEP 562 module `__getattr__`).

    import llmctl
    text = llmctl.generate_text("experiments/runs/demo", "Once upon a time", temperature=0)
    model = llmctl.load_model("experiments/runs/demo")   # load once, sample many times
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "generate_text": "llmctl.generate",  # (checkpoint_or_model, prompt, **sampling) -> str
    "complete": "llmctl.generate",  # the same, returning text, token counts, timing, finish reason
    "load_model": "llmctl.loading",  # checkpoint file, run dir, transformers folder or Hub id
    "batch_generate": "llmctl.batching",  # (checkpoint_or_model, prompts, **sampling) -> [Completion], decoded together
    "BatchGenerator": "llmctl.batching",  # continuous batching behind `llmctl serve`: submit() -> Stream
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llmctl' has no attribute {name!r}")
