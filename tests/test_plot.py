"""Loss plots: loss.png at the end of a run, `llmctl plot` overlaying runs, and the one line a
missing matplotlib gives. Two real runs (1 layer, 32 wide, small BPE) through the CLI in-process.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.runs import read_metrics
from small_runs import build_small_tokenizer, small_run_args

pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'llmctl[plot]')")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"



def cli(*arguments: str):
    return CliRunner().invoke(app, list(arguments))


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, shakespeare) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("plot")
    tok = build_small_tokenizer(work / "tok", shakespeare)
    dirs = []
    for name, lr in (("a", "3e-3"), ("b", "1e-3")):
        sets = [f"run.output_dir={work / 'runs'}", f"data.cache_dir={work / 'cache'}", f"pretrain.lr={lr}"]
        result = cli(*small_run_args(name, shakespeare, tok, *[a for s in sets for a in ("--set", s)]))
        assert result.exit_code == 0, result.output
        dirs.append(work / "runs" / name)
    return dirs[0], dirs[1]


def test_a_finished_run_leaves_loss_png(two_runs):
    for run_dir in two_runs:
        assert png_size(run_dir / "loss.png") == (1200, 450)
        assert "loss curves:" in (run_dir / "training.log").read_text()


def test_the_figure_holds_each_runs_training_and_validation_curves(two_runs):
    from llmctl.plot import load_curves, loss_figure

    fig = loss_figure([load_curves(d) for d in two_runs])
    by_step, by_tokens = fig.axes
    labels = [line.get_label() for line in by_step.get_lines()]
    assert labels == ["a train", "a validation", "b train", "b validation"]
    for i, run_dir in enumerate(two_runs):
        train, evals = read_metrics(run_dir)
        train_line, val_line = by_step.get_lines()[2 * i: 2 * i + 2]
        assert list(train_line.get_xdata()) == [r["step"] for r in train]
        assert list(train_line.get_ydata()) == [r["loss"] for r in train]
        assert list(val_line.get_xdata()) == [r["step"] for r in evals] == [4, 8, 12]
        assert list(val_line.get_ydata()) == [r["val_loss"] for r in evals]
        token_train, token_val = by_tokens.get_lines()[2 * i: 2 * i + 2]
        assert list(token_train.get_xdata()) == [r["tokens"] for r in train]
        assert list(token_val.get_xdata()) == [r["tokens"] for r in evals]
    assert train_line.get_color() != by_step.get_lines()[0].get_color()  # one colour per run


def test_plot_command_overlays_runs_into_one_png(two_runs, tmp_path):
    out = tmp_path / "sub" / "ab.png"
    result = cli("plot", *map(str, two_runs), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and png_size(out) == (1200, 450)
    assert not [p for p in out.parent.iterdir() if p.name != "ab.png"]  # no temporary file left
    bad = cli("plot", str(two_runs[0]), "-o", str(tmp_path / "x.jpg"))
    assert bad.exit_code == 2 and ".png" in bad.stderr
    missing = cli("plot", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "run not found" in missing.stderr


def test_without_matplotlib_plot_names_the_extra_and_a_run_skips_the_png_quietly(two_runs, tmp_path, monkeypatch,
                                                                                  shakespeare):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails as if absent
    result = cli("plot", str(two_runs[0]), "-o", str(tmp_path / "p.png"))
    assert result.exit_code == 1 and not (tmp_path / "p.png").exists()
    assert result.stderr.strip() == 'error: plotting needs matplotlib, which is not installed: pip install "llmctl[plot]"'
    tok = build_small_tokenizer(tmp_path / "tok", shakespeare)
    sets = [f"run.output_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "pretrain.max_steps=2"]
    run = cli(*small_run_args("c", shakespeare, tok, *[a for s in sets for a in ("--set", s)]))
    assert run.exit_code == 0, run.output
    assert not (tmp_path / "runs" / "c" / "loss.png").exists() and "not installed" not in run.stderr
    assert 'loss.png not drawn: matplotlib is not installed (pip install "llmctl[plot]")' in \
        (tmp_path / "runs" / "c" / "training.log").read_text()
