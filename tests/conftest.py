"""Shared fixtures: paths into ../shared/data (skipped with a reason when absent) and tiny configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Test models are tiny: one thread per process is faster than two that wait on each other,
# and subprocesses (the CLI, torchrun ranks) inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LLMCTL_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared test data missing: {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    return shared_file("tokenizers/gpt2")


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    return shared_file("tinyshakespeare/input.txt")


@pytest.fixture(scope="session")
def wikitext_valid() -> Path:
    return shared_file("wikitext-2-raw/wiki.valid.raw")


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for llmctl subprocesses: a private token cache, no network lookups."""
    env = dict(os.environ)
    env["LLMCTL_CACHE"] = str(tmp_path / "cache")
    env.pop("LLMCTL_DEBUG", None)
    return env


PYTHON = sys.executable


@pytest.fixture(scope="session")
def small_tok(tmp_path_factory, shakespeare) -> Path:
    """A 320-token byte-level BPE trained on Tiny Shakespeare (see small_runs.py), built once."""
    from small_runs import build_small_tokenizer

    return build_small_tokenizer(tmp_path_factory.mktemp("tok"), shakespeare)
