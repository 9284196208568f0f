"""`llmctl runs` on real runs in every state, the status record behind it, and the trackers.

Five runs of a 1-layer, 32-wide model on Tiny Shakespeare with a small BPE: finished (also
reporting to TensorBoard), failed (a learning rate of 1e30 makes the loss NaN), interrupted
by SIGINT (seen as running while it trains), and killed with SIGKILL in a subprocess, which
cannot record anything. Then copies without status.json, as runs written before it existed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import PYTHON
from llmctl.cli import app
from llmctl.runs import STATUS_FILE, list_runs, read_metrics, summarize_run
from small_runs import build_small_tokenizer, small_run_args

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None



def args(name: str, root: Path, tok: Path, text: Path, *sets: str) -> list[str]:
    extra = [a for s in (f"run.output_dir={root}", *sets) for a in ("--set", s)]
    return small_run_args(name, text, tok, *extra)


def cli(*arguments: str):
    return CliRunner().invoke(app, list(arguments))


def interrupt_when_training(run_dir: Path, seen: dict) -> threading.Thread:
    """Wait until the run has logged a step, look at it with `summarize_run`, then press Ctrl-C."""
    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if read_metrics(run_dir)[0]:
                seen["while_training"] = summarize_run(run_dir)
                os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread, like a real Ctrl-C
                return
            time.sleep(0.02)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare) -> dict:
    work = tmp_path_factory.mktemp("runs")
    tok = build_small_tokenizer(work / "tok", shakespeare)
    root = work / "runs"
    env = dict(os.environ, LLMCTL_CACHE=str(work / "cache"), OMP_NUM_THREADS="1")
    env.pop("LLMCTL_DEBUG", None)
    os.environ["LLMCTL_CACHE"] = str(work / "cache")  # the in-process runs share the token cache
    # Started first, so its interpreter start overlaps the in-process runs.
    killed = subprocess.Popen([PYTHON, "-m", "llmctl", *args("killed", root, tok, shakespeare,
                                                              "pretrain.max_steps=100000")],
                              cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        trackers = ['run.report_to=["tensorboard"]'] if HAS_TENSORBOARD else []
        done = cli(*args("done", root, tok, shakespeare, *trackers))
        assert done.exit_code == 0, done.output
        failed = cli(*args("failed", root, tok, shakespeare, "pretrain.lr=1e30"))
        assert failed.exit_code == 1, failed.output
        seen: dict = {}
        watcher = interrupt_when_training(root / "stopped", seen)
        stopped = cli(*args("stopped", root, tok, shakespeare, "pretrain.max_steps=100000"))
        watcher.join()
        assert stopped.exit_code == 130, stopped.output
        for line in killed.stderr:  # the subprocess has trained a step: kill it outright
            if line.startswith("step "):
                break
        killed.kill()
        killed.wait(timeout=60)
    finally:
        os.environ.pop("LLMCTL_CACHE", None)
        if killed.poll() is None:
            killed.kill()
    return {"root": root, "work": work, "while_training": seen["while_training"]}


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


def test_runs_shows_each_state_with_its_numbers(runs):
    rows = by_name(list_runs(runs["root"]))
    assert set(rows) == {"done", "failed", "stopped", "killed"}
    done = rows["done"]
    train, evals = read_metrics(runs["root"] / "done")
    assert done["state"] == "finished" and done["stage"] == "pretrain"
    assert done["step"] == done["max_steps"] == 12 and done["tokens"] == 12 * 4 * 32
    assert done["val_perplexity"] == evals[-1]["val_perplexity"]
    assert done["best_val_perplexity"] == min(e["val_perplexity"] for e in evals)
    assert done["wall_seconds"] >= train[-1]["elapsed_seconds"] > 0
    assert done["checkpoint"].endswith("done-pretrain_final.pt")

    failed = rows["failed"]
    assert failed["state"] == "failed" and "non-finite" in failed["reason"] and failed["step"] < 12
    stopped = rows["stopped"]
    assert stopped["state"] == "interrupted" and "stopped by SIGINT" in stopped["reason"]
    assert stopped["checkpoint"].endswith(f"stopped-pretrain_step{stopped['step']}.pt")
    killed = rows["killed"]
    assert killed["state"] == "interrupted" and "killed" in killed["reason"]
    assert json.loads((runs["root"] / "killed" / STATUS_FILE).read_text())["state"] == "running"


def test_a_training_run_reads_as_running(runs):
    row = runs["while_training"]
    assert row["state"] == "running" and row["step"] >= 1 and row["max_steps"] == 100000


def test_runs_written_before_status_records_are_read_from_their_files(runs, tmp_path):
    for name in ("done", "failed", "stopped"):
        shutil.copytree(runs["root"] / name, tmp_path / name)
        (tmp_path / name / STATUS_FILE).unlink()
    rows = by_name(list_runs(tmp_path))
    assert {n: r["state"] for n, r in rows.items()} == {"done": "finished", "failed": "failed",
                                                        "stopped": "interrupted"}


def test_cli_table_and_json(runs):
    table = cli("runs", str(runs["root"]))
    assert table.exit_code == 0, table.output
    for text in ("done", "finished", "failed", "interrupted", "12/12", "done-pretrain_final.pt"):
        assert text in table.stdout
    as_json = cli("runs", str(runs["root"]), "--json")
    assert json.loads(as_json.stdout)["runs"] == list_runs(runs["root"])
    one = cli("runs", str(runs["root"] / "done"), "--json")  # a run directory itself
    assert [r["name"] for r in json.loads(one.stdout)["runs"]] == ["done"]
    missing = cli("runs", str(runs["work"] / "nowhere"))
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard not installed (pip install 'llmctl[tensorboard]')")
def test_tensorboard_gets_the_records_of_metrics_jsonl(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["root"] / "done" / "tensorboard"))
    events.Reload()
    train, evals = read_metrics(runs["root"] / "done")
    for tag, records, key in (("train/loss", train, "loss"), ("train/lr", train, "lr"),
                              ("eval/val_loss", evals, "val_loss")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["step"] for r in records]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_a_missing_tracker_package_is_named_before_anything_is_written(tmp_path, shakespeare, gpt2_dir):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; the missing-package path cannot be shown")
    result = cli(*args("w", tmp_path / "runs", gpt2_dir, shakespeare, 'run.report_to=["wandb"]'))
    assert result.exit_code == 1
    assert 'pip install "llmctl[wandb]"' in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    unknown = cli(*args("w", tmp_path / "runs", gpt2_dir, shakespeare, 'run.report_to=["mlflow"]'))
    assert unknown.exit_code == 2 and "run.report_to" in unknown.stderr
