"""Every command's --help exits 0 and shows an example of itself; shell completion works.

The commands are read from the app, so a command added later is checked too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.config import available_presets

REPO = Path(__file__).resolve().parent.parent


def command_paths(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """("",) for the app itself, then every command and group below it."""
    paths = [prefix]
    for name, command in sorted(getattr(group, "commands", {}).items()):
        paths += command_paths(command, prefix + (name,))
    return paths


COMMANDS = command_paths(typer.main.get_command(app))


def test_the_app_has_the_commands_of_the_issue():
    names = {" ".join(p) for p in COMMANDS}
    assert {"pretrain", "eval", "generate", "export", "runs", "plot", "data", "data prepare"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "llmctl")
def test_help_exits_0_and_shows_an_example(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # Rich wraps and indents; compare words
    assert "Example" in text, f"llmctl {' '.join(path)} --help shows no example"
    if path:  # a subcommand's example runs that subcommand
        assert f"llmctl {' '.join(path)} " in text, f"llmctl {' '.join(path)} --help: example of another command"


def llmctl_executable() -> str:
    found = shutil.which("llmctl", path=str(Path(sys.executable).parent)) or shutil.which("llmctl")
    if found is None:
        pytest.skip("the llmctl script is not installed (pip install -e .)")
    return found


def test_shell_completion_script_and_completions(tmp_path):
    exe = llmctl_executable()
    # Name the shell rather than let Typer detect it from the process tree, which fails when the
    # tests run detached from a shell (Typer then prints "Shell  not supported").
    env = dict(os.environ, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    script = subprocess.run([exe, "--show-completion", "bash"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=60, env=env)
    assert script.returncode == 0 and "_LLMCTL_COMPLETE=complete_bash" in script.stdout

    def complete(words: str) -> list[str]:
        env = dict(os.environ, _LLMCTL_COMPLETE="complete_bash", COMP_WORDS=words,
                   COMP_CWORD=str(len(words.split()) - (0 if words.endswith(" ") else 1)))
        out = subprocess.run([exe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        return out.stdout.split()

    assert "export" in complete("llmctl ex")
    assert complete("llmctl export --format ") == ["hf", "safetensors", "gguf"]


def rendered_help(path: tuple[str, ...]) -> str:
    """--help as a user sees it, wide enough that Rich wraps nothing, whitespace collapsed."""
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())


def command_at(path: tuple[str, ...]):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "llmctl")
def test_bracketed_help_text_is_shown_verbatim(path):
    """Typer renders help as Rich markup, where `[plot]` is a style tag and vanishes unless escaped."""
    command = command_at(path)
    texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
    wanted = [" ".join(m.split()) for text in texts for m in re.findall(r"\[[^\]]*\]", text.replace("\\[", "["))]
    shown = rendered_help(path)
    assert [w for w in wanted if w not in shown] == []


def test_plot_help_names_the_extra_to_install():
    assert 'pip install "llmctl[plot]"' in rendered_help(("plot",))


def test_preset_help_lists_every_preset_file():
    names = available_presets()
    assert "cpu-10m" in names
    for path in [("pretrain",), ("pipeline",), ("sft",), ("data", "prepare")]:
        assert f"Preset name ({', '.join(names)}) or path to a TOML file" in rendered_help(path)


def test_a_preset_file_added_to_the_folder_shows_in_help(tmp_path):
    """A copy of the package with one more preset file: its help names it, with no code change."""
    shutil.copytree(REPO / "llmctl", tmp_path / "llmctl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "presets", tmp_path / "presets")
    shutil.copy(REPO / "presets" / "tiny.toml", tmp_path / "presets" / "zz-new.toml")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), COLUMNS="400", NO_COLOR="1")
    result = subprocess.run([sys.executable, "-m", "llmctl", "pretrain", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"Preset name ({', '.join([*available_presets(), 'zz-new'])})" in " ".join(result.stdout.split())


FLAGS = {("pretrain",): ["--dry-run", "--overwrite"], ("eval",): ["--json"], ("generate",): ["--no-cache", "--raw"],
         ("export",): ["--force", "--json"], ("data", "info"): ["--verify", "--json"], (): ["--version"]}


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "llmctl")
def test_flags_show_no_value_placeholder(path):
    shown = rendered_help(path)
    assert "<bool>" not in shown
    for flag in FLAGS.get(path, []) + ["--help"]:
        assert re.search(rf"{flag} (-\w )?[A-Z]", shown), f"{flag} is followed by something other than its help"
    if path == ("pretrain",):  # options that take a value still show what it is
        assert "--run-name -n <str>" in shown and "--resume [auto]" in shown
