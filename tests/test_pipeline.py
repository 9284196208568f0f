"""`llmctl pipeline` on the tiny preset: every stage runs, a second invocation skips them all, an
interrupted stage is resumed, and a changed config is refused instead of silently reused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import shared_file
from llmctl.cli import app



@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


def pipeline_args(*extra: str) -> list[str]:
    """The tiny preset, offline: Shakespeare with a trained 300-token BPE, Dolly records, a
    1-layer 32-wide model and a handful of steps per stage."""
    sets = {"data.datasets": json.dumps([f"text:{shared_file('tinyshakespeare/input.txt')}:300"]),
            "data.tokenizer": "train:300",
            "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 4, "model.n_kv_heads": 2,
            "model.max_seq_len": 32,
            "pretrain.max_steps": 6, "pretrain.batch_size": 4, "pretrain.micro_batch_size": 2,
            "pretrain.warmup_steps": 2, "pretrain.eval_every": 3, "pretrain.save_every": 3,
            "sft.datasets": json.dumps([f"jsonl:{shared_file('sft/dolly_open_qa.jsonl')}:200"]),
            "sft.max_steps": 4, "sft.batch_size": 4, "sft.micro_batch_size": 2, "sft.warmup_steps": 1,
            "sft.eval_every": 2, "sft.save_every": 2, "sft.samples": 1, "sft.sample_tokens": 6,
            "eval.max_tokens": 256, "run.device": "cpu", "run.dtype": "float32", "run.log_every": 2}
    args = ["pipeline", "--preset", "tiny", "--run-name", "p"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


def invoke(work: Path, *args: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("LLMCTL_CACHE", str(work / "cache"))
        mp.delenv("LLMCTL_DEBUG", raising=False)
        result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def statuses(result) -> dict[str, str]:
    assert result.exit_code == 0, result.stderr
    return {stage: row["status"] for stage, row in json.loads(result.stdout)["stages"].items()}


def checkpoint_times(work: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (work / "experiments" / "runs").rglob("*.pt")}


@pytest.fixture(scope="module")
def first(work):
    return invoke(work, *pipeline_args("--json"))


def test_first_run_runs_every_stage(first, work):
    assert statuses(first) == {stage: "ran" for stage in ("data", "pretrain", "sft", "eval", "samples")}
    summary = json.loads(first.stdout)
    runs = work / "experiments" / "runs"
    pre, sft = summary["stages"]["pretrain"], summary["stages"]["sft"]
    assert pre["checkpoint"] == str(Path("experiments/runs/p/p-pretrain_final.pt"))
    assert sft["checkpoint"] == str(Path("experiments/runs/p-sft/p-sft-sft_final.pt"))
    assert (pre["steps"], sft["steps"]) == (6, 4)
    assert pre["tokens"] == 6 * 4 * 32 and sft["tokens"] > 0
    for row in (pre, sft):
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("loss", "perplexity", "bits_per_byte"))
        assert isinstance(row["sample"]["text"], str) and row["sample"]["prompt"]
    assert summary["stages"]["data"]["tokens"] > 0
    # The eval and samples rows hold what those stages produced, as pipeline.json does.
    record = json.loads((runs / "p" / "pipeline.json").read_text())
    for model in ("pretrain", "sft"):
        assert summary["stages"]["eval"][model] == record["eval"][model]
        assert summary["stages"]["eval"][model]["perplexity"] == summary["stages"][model]["perplexity"]
        assert summary["stages"]["samples"][model] == record["samples"][model] == summary["stages"][model]["sample"]
    # The SFT stage started from the pretrain stage's final checkpoint, with its tokenizer.
    tuned = torch.load(runs / "p-sft" / "p-sft-sft_final.pt", weights_only=True)
    base = torch.load(runs / "p" / "p-pretrain_final.pt", weights_only=True)
    assert tuned["config"]["sft"]["from"] == str(Path("experiments/runs/p/p-pretrain_final.pt"))
    assert tuned["tokenizer"]["fingerprint"] == base["tokenizer"]["fingerprint"] and "template" in tuned
    assert "pipeline p: stage samples" in first.stderr


def test_second_run_skips_every_finished_stage(first, work):
    before = checkpoint_times(work)
    record = (work / "experiments/runs/p/pipeline.json").read_text()
    again = invoke(work, *pipeline_args("--json"))
    assert statuses(again) == {"data": "skipped (cached)", "pretrain": "skipped (complete)",
                               "sft": "skipped (complete)", "eval": "skipped (done for these checkpoints)",
                               "samples": "skipped (done for these checkpoints)"}
    assert checkpoint_times(work) == before
    assert (work / "experiments/runs/p/pipeline.json").read_text() == record
    assert json.loads(again.stdout)["stages"]["sft"]["loss"] == json.loads(first.stdout)["stages"]["sft"]["loss"]
    table = invoke(work, *pipeline_args())
    assert table.exit_code == 0 and "pipeline p" in table.stdout and "skipped" in table.stdout
    # The table's eval rows show both models' scores, its samples rows both samples' starts.
    stages = json.loads(again.stdout)["stages"]
    lines = [line for line in table.stdout.splitlines() if line.startswith("│")]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines]
    at = next(i for i, row in enumerate(cells) if row[0] == "eval")
    for row, model in zip(cells[at: at + 2], ("pretrain", "sft")):
        score = stages["eval"][model]
        assert row[4:7] == [f"{score['loss']:.4f}", f"{score['perplexity']:.2f}", f"{score['bits_per_byte']:.4f}"]
        assert row[7].startswith(f"{model}: ")
    at = next(i for i, row in enumerate(cells) if row[0] == "samples")
    output = " ".join(row[7] for row in cells[at:])  # a long sample folds onto the next lines
    for model in ("pretrain", "sft"):
        sample = stages["samples"][model]
        assert f"{model}: {sample['prompt'][:20]!r}"[:-1] in output, table.stdout


def test_an_interrupted_stage_is_resumed_and_later_stages_redone(first, work):
    runs = work / "experiments" / "runs"
    (runs / "p-sft" / "p-sft-sft_final.pt").unlink()  # as if stopped after the step-2 checkpoint
    pretrain_before = (runs / "p" / "p-pretrain_final.pt").stat().st_mtime_ns
    result = invoke(work, *pipeline_args("--json"))
    assert statuses(result) == {"data": "skipped (cached)", "pretrain": "skipped (complete)", "sft": "resumed",
                                "eval": "ran", "samples": "ran"}
    assert "resumed from p-sft-sft_step2.pt at step 2" in result.stderr
    assert (runs / "p" / "p-pretrain_final.pt").stat().st_mtime_ns == pretrain_before


def test_a_changed_config_is_refused_not_reused(first, work):
    result = invoke(work, *pipeline_args("--set", "model.d_model=64"))
    assert result.exit_code == 2
    assert "the finished pretrain stage" in result.stderr and "model.d_model 32 -> 64" in result.stderr
