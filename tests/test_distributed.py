"""torchrun on CPU (gloo): 2 processes follow 1 process's loss curve step for step, with DDP and
with FSDP2, and their checkpoints load in one process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PYTHON
from small_runs import build_small_tokenizer, small_run_args

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def work(tmp_path_factory, shakespeare) -> Path:
    work = tmp_path_factory.mktemp("dist")
    build_small_tokenizer(work / "tok", shakespeare)
    return work


def run(work: Path, shakespeare: Path, name: str, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    args = small_run_args(name, shakespeare, work / "tok", "--set", "pretrain.batch_size=8",
                          "--set", "pretrain.micro_batch_size=2", *extra)
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [PYTHON]
    env = dict(os.environ, LLMCTL_CACHE=str(work / "cache"), OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, "-m", "llmctl", *args], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)


def curve(work: Path, name: str) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (work / "experiments/runs" / name / "metrics.jsonl").open()]
    return ([r["loss"] for r in records if r["type"] == "train"],
            [r["val_loss"] for r in records if r["type"] == "eval"])


@pytest.fixture(scope="module")
def single(work, shakespeare):
    result = run(work, shakespeare, "single", 1)
    assert result.returncode == 0, result.stderr
    return curve(work, "single")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_and_load_in_one(work, shakespeare, single, strategy):
    result = run(work, shakespeare, strategy, 2, "--set", f"run.distributed={strategy}")
    assert result.returncode == 0, result.stderr[-3000:]
    train, val = curve(work, strategy)
    assert len(train) == len(single[0]) == 12
    torch.testing.assert_close(train, single[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(val, single[1], rtol=1e-5, atol=1e-5)
    run_dir = work / "experiments/runs" / strategy
    # only rank 0 wrote: one log, one metrics file, one set of checkpoints
    assert result.stdout.count("pretrain_final.pt") == 1
    ckpt = torch.load(run_dir / f"{strategy}-pretrain_final.pt", weights_only=True)
    reference = torch.load(work / "experiments/runs/single/single-pretrain_final.pt", weights_only=True)
    for key, tensor in reference["model"].items():
        torch.testing.assert_close(ckpt["model"][key], tensor, rtol=1e-4, atol=1e-5)
    from llmctl.loading import load_model

    loaded = load_model(str(run_dir), torch.device("cpu"), "float32")
    assert loaded.model(torch.zeros(1, 4, dtype=torch.long)).shape[-1] > 0


def test_distributed_run_resumes_in_one_process(work, shakespeare, single):
    """A checkpoint written by 2 FSDP ranks continues in a single process (same global batch)."""
    result = run(work, shakespeare, "fsdp-stop", 2, "--set", "run.distributed=fsdp", "--set", "pretrain.max_steps=6")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = run(work, shakespeare, "fsdp-stop", 1, "--set", "run.distributed=fsdp", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    train, _ = curve(work, "fsdp-stop")
    torch.testing.assert_close(train, single[0], rtol=1e-5, atol=1e-5)


def test_global_batch_must_split_over_processes(work, shakespeare):
    result = run(work, shakespeare, "odd", 2, "--set", "pretrain.batch_size=6", "--set", "pretrain.micro_batch_size=2")
    assert result.returncode != 0
    assert "must be divisible by micro_batch_size (2) x 2 processes" in result.stderr


def test_auto_micro_batch_agrees_across_processes(work, shakespeare):
    """Each rank resolves "auto" and all take the smallest answer: 8 sequences over 2 ranks is
    4 per rank, one micro-batch each (4 x 32 tokens is within the CPU cap)."""
    result = run(work, shakespeare, "auto", 2, "--set", 'pretrain.micro_batch_size="auto"', "--set", "pretrain.max_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = (work / "experiments/runs/auto/config.toml").read_text()
    assert "micro_batch_size = 4" in saved
    assert "micro-batch 4 (auto)" in (work / "experiments/runs/auto/training.log").read_text()
