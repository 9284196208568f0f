"""The Hugging Face Hub: is it there, what its local cache holds, and one error for what is missing.

Without these checks `datasets` and `transformers` retry for minutes and end in a traceback
naming one file. One TCP connect with a short timeout tells us within seconds whether the
Hub can be reached; when it cannot (or HF_HUB_OFFLINE=1), a piece is usable only if the
local Hugging Face cache holds it, which is looked up the way those libraries look it up.
`downloads_error` is the one message for whatever is missing: every piece, each with its fix.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import ConfigError

_TRUE = ("1", "true", "yes", "on")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_HF_MODULES = ("huggingface_hub", "datasets", "transformers")

REACHABLE, OFFLINE, UNREACHABLE = "reachable", "offline", "unreachable"

# Set by `llmctl.cli.main`: the process is llmctl's own, so it may switch the Hugging Face
# libraries to offline mode (an environment variable they read once, when imported).
# Library callers and in-process tests keep their environment untouched.
OWN_PROCESS = False
_unreachable: dict[str, bool] = {}  # endpoint -> probed unreachable (one probe per process)


def offline_variable() -> str | None:
    """The variable that asks for the local Hugging Face cache only, if one is set."""
    return next((v for v in _OFFLINE_VARS if os.environ.get(v, "0").lower() in _TRUE), None)


def hub_offline() -> bool:
    """The user asked for the local Hugging Face cache only."""
    return offline_variable() is not None and not _unreachable.get(_endpoint(), False)


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    host_port = re.sub(r"^https?://", "", _endpoint()).split("/")[0]
    host, _, port = host_port.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def hub_status() -> str:
    """REACHABLE, OFFLINE (HF_HUB_OFFLINE=1 or alike) or UNREACHABLE; probed once per endpoint."""
    endpoint = _endpoint()
    if _unreachable.get(endpoint):
        return UNREACHABLE
    if offline_variable():
        return OFFLINE
    if hub_reachable():
        return REACHABLE
    _unreachable[endpoint] = True
    if OWN_PROCESS and not any(m in sys.modules for m in _HF_MODULES):
        # Online, each cached file is still checked against the Hub: minutes of retries
        # against an unreachable one. Offline mode reads the cache directly.
        os.environ["HF_HUB_OFFLINE"] = "1"
    return UNREACHABLE


# --------------------------------------------------------------------------- the local cache

def hf_home() -> str:
    from huggingface_hub import constants

    return constants.HF_HOME


def shown_path(path: str | Path) -> str:
    """A path as a user reads it: the home folder as ~."""
    text, home = str(path), str(Path.home())
    return "~" + text[len(home):] if text == home or text.startswith(home + os.sep) else text


def tokenizer_files_cached(name: str) -> bool:
    """The Hugging Face cache holds tokenizer files of Hub repo `name` (what transformers then
    needs besides them is decided by loading it with local_files_only)."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(name, f), str) for f in ("tokenizer.json", "tokenizer_config.json"))


def _datasets_cache() -> Path:
    loaded = sys.modules.get("datasets.config")  # once imported, datasets uses its own value
    if loaded is not None:
        return Path(loaded.HF_DATASETS_CACHE)
    # datasets.config's rule, without importing datasets (two seconds)
    home = os.path.expanduser(os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"),
                                                                 "huggingface")))
    return Path(os.getenv("HF_DATASETS_CACHE", os.path.join(home, "datasets")))


def _snakecase(name: str) -> str:
    # datasets.naming.camelcase_to_snakecase: TinyStories is cached as tiny_stories
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def dataset_cached(path: str, config: str | None) -> bool:
    """`datasets.load_dataset(path, config)` can be served from the datasets cache without the
    Hub: a prepared copy in <cache>/<org>___<name>/<config>/<version>/<hash>/, found as the
    `datasets` cache builder finds it (without a config: one whose dataset_info names the
    folder's config)."""
    parts = path.split("/")
    parts[-1] = _snakecase(parts[-1])
    root = _datasets_cache() / "___".join(parts)
    for folder in root.glob(f"{config or '*'}/*/*"):
        if not folder.is_dir():
            continue
        if config:
            return True
        try:
            if json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))["config_name"] == folder.parts[-3]:
                return True
        except (OSError, ValueError, KeyError):
            continue
    return False


# --------------------------------------------------------------------------- the one error

@dataclass(frozen=True)
class Missing:
    """A download the Hub cannot give: what (`tokenizer 'gpt2'`) and the fix, as one line."""

    what: str
    fix: str


def downloads_error(missing: list[Missing], status: str, closing: str = "", who: str = "this run") -> ConfigError:
    """Every missing download in one message: why, one line per piece with its fix, and
    `closing` (what fixes them all) last."""
    n = len(missing)
    pieces = f"{n} download{'s' if n != 1 else ''}"
    they = "they are" if n != 1 else "it is"
    cache = shown_path(hf_home())
    if status == OFFLINE:
        var = offline_variable() or "HF_HUB_OFFLINE"
        why = f"but {var}={os.environ.get(var, '1')} and {they} not in the cache at {cache}"
    else:
        why = f"which cannot be reached ({_endpoint()}), and {they} not in the cache at {cache}"
    lines = [f"{who} needs {pieces} from the Hugging Face Hub, {why}:"]
    lines += [f"  {m.what}: {m.fix}" for m in missing]
    if closing:
        lines.append(f"  {closing}")
    return ConfigError("\n".join(lines))


def require_hub(missing: Missing, cached: bool | None = None, who: str = "this command") -> None:
    """Raise `downloads_error` for this one piece unless the Hub is reachable or `cached`
    says the local cache holds it (None: not known, so the Hub is needed)."""
    status = hub_status()
    if status == REACHABLE or cached:
        return
    raise downloads_error([missing], status, who=who)
