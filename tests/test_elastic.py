"""A lost rank costs a restart, not the run: under `torchrun --max-restarts=1` a worker killed
with SIGKILL mid-run is restarted with its group, `--resume auto` picks up the newest
checkpoint, and the finished run's weights equal those of a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON
from small_runs import build_small_tokenizer, small_run_args

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state is the parent
                found.append(int(entry))
    return found


def worker_of_rank(agent: int, rank: int) -> int | None:
    for pid in children(agent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc (Linux)")
def test_a_worker_killed_mid_run_is_restarted_and_the_run_ends_as_if_never_interrupted(tmp_path, shakespeare):
    build_small_tokenizer(tmp_path / "tok", shakespeare)
    env = dict(os.environ, LLMCTL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("LLMCTL_DEBUG", None)

    def command(name: str, *launcher: str) -> list[str]:
        return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *launcher,
                "-m", "llmctl", *small_run_args(name, shakespeare, tmp_path / "tok", "--set", "model.dropout=0.1",
                                                "--set", "pretrain.batch_size=8", "--set", "pretrain.max_steps=400",
                                                "--set", "pretrain.save_every=10", "--set", "pretrain.eval_every=200",
                                                "--set", "run.log_every=50", "--resume", "auto")]

    steady = subprocess.run(command("steady"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert steady.returncode == 0, steady.stderr[-3000:]

    run_dir = tmp_path / "experiments/runs/elastic"
    agent = subprocess.Popen(command("elastic", "--max-restarts=1", "--monitor-interval=0.1"), cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(run_dir.glob("elastic-pretrain_step*.pt")):  # a checkpoint to come back to
            assert agent.poll() is None and time.monotonic() < deadline, "the run ended before a checkpoint"
            time.sleep(0.02)
        victim = worker_of_rank(agent.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        out, err = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, err[-3000:]
    log = (run_dir / "training.log").read_text()
    assert "resumed from elastic-pretrain_step" in log  # it came back from a checkpoint, not from scratch

    finished = torch.load(run_dir / "elastic-pretrain_final.pt", weights_only=True)
    reference = torch.load(tmp_path / "experiments/runs/steady/steady-pretrain_final.pt", weights_only=True)
    assert finished["step"] == reference["step"] == 400
    for key, tensor in reference["model"].items():
        assert torch.equal(finished["model"][key], tensor), key
