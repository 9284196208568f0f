"""The README's Quickstart, run line by line as a user would: parsed from README.md, so the two
cannot drift. No network (HF_HUB_OFFLINE=1, an empty Hugging Face cache, a closed endpoint);
training lines get small step counts appended, nothing else is changed."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Appended to the training lines: a few steps of the real quickstart model and data.
SHORT = {
    "pretrain": ["--set", "pretrain.max_steps=40", "--set", "pretrain.batch_size=8", "--set", "pretrain.micro_batch_size=8",
                 "--set", "pretrain.warmup_steps=5", "--set", "pretrain.eval_every=40", "--set", "pretrain.save_every=40",
                 "--set", "eval.max_tokens=4096"],
    "sft": ["--set", "sft.max_steps=20", "--set", "sft.batch_size=8", "--set", "sft.micro_batch_size=8",
            "--set", "sft.warmup_steps=5", "--set", "sft.eval_every=20", "--set", "sft.save_every=20"],
}
SKIPPED = ("pip", "--install-completion")  # installing is the test environment's job; completion edits rc files


def quickstart_lines() -> list[str]:
    """The command lines of the first ```bash block under "## Quickstart"."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's Quickstart has no ```bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _llmctl() -> list[str]:
    """The installed `llmctl` command beside this Python, as a user runs it (else the module)."""
    script = Path(sys.executable).parent / "llmctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmctl"]


def test_readme_quickstart_runs_verbatim_offline(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "LLMCTL_CACHE": str(tmp_path / "cache")}
    env.pop("LLMCTL_DEBUG", None)
    work = tmp_path / "work"
    work.mkdir()
    lines = quickstart_lines()
    ran: dict[str, subprocess.CompletedProcess] = {}
    for line in lines:
        argv = shlex.split(line, comments=True)
        if argv[0] in SKIPPED or any(a in SKIPPED for a in argv):
            continue
        if argv[0] == "llmctl":
            argv = _llmctl() + argv[1:] + SHORT.get(argv[1], [])
            key = argv[len(_llmctl())]
        elif argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
            key = "python"
        else:
            raise AssertionError(f"the Quickstart runs {argv[0]!r}, which this test does not know: {line}")
        result = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{line}\nexit {result.returncode}\n{result.stderr[-3000:]}"
        ran[key] = result

    # Every step the Quickstart promises ran, and left what it says it does.
    assert {"pretrain", "runs", "plot", "eval", "sft", "generate", "export", "python"} <= ran.keys()
    assert (work / "demo.png").stat().st_size > 0
    assert "demo" in ran["runs"].stdout
    assert "perplexity" in (ran["eval"].stdout + ran["eval"].stderr).lower()
    assert (work / "exported" / "demo-sft" / "config.json").is_file()
    # The tuned model answers the Quickstart's prompt with text, in llmctl and in transformers.
    assert ran["generate"].stdout.strip(), f"generate printed nothing\n{ran['generate'].stderr[-2000:]}"
    assert ran["python"].stdout.strip(), f"the transformers one-liner printed nothing\n{ran['python'].stderr[-2000:]}"
