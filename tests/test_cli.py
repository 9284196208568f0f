"""The CLI as a user meets it: real subprocesses, real files, real data."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PYTHON


def llmctl(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "llmctl", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_and_version_are_instant_and_do_not_import_torch(tmp_path):
    probe = "import sys, llmctl.cli; assert 'torch' not in sys.modules, 'torch imported at start-up'"
    subprocess.run([PYTHON, "-c", probe], check=True, cwd=tmp_path)
    result = llmctl("--help", cwd=tmp_path)
    assert result.returncode == 0 and "pretrain" in result.stdout
    version = llmctl("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("llmctl ")
    assert llmctl("pretrain", "--help", cwd=tmp_path).returncode == 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shakespeare, gpt2_dir):
    """One `llmctl pretrain --preset tiny` run, exactly as the issue's check runs it."""
    work = tmp_path_factory.mktemp("work")
    env = dict(os.environ, LLMCTL_CACHE=str(work / "cache"))
    result = llmctl(
        "pretrain", "--preset", "tiny", "--run-name", "X",
        "--set", f'data.datasets=["text:{shakespeare}"]', "--set", f"data.tokenizer={gpt2_dir}",
        "--set", "pretrain.max_steps=60", "--set", "pretrain.eval_every=30", "--set", "pretrain.save_every=30",
        cwd=work, env=env)
    return work, result


def test_pretrain_tiny_end_to_end(tiny_run):
    work, result = tiny_run
    assert result.returncode == 0, result.stderr
    run = work / "experiments" / "runs" / "X"
    for name in ("config.toml", "training.log", "metrics.jsonl", "X-pretrain_step30.pt", "X-pretrain_final.pt"):
        assert (run / name).is_file(), name
    assert result.stdout.strip().endswith("X-pretrain_final.pt")

    ckpt = torch.load(run / "X-pretrain_final.pt", weights_only=True)
    assert ckpt["step"] == 60 and ckpt["stage"] == "pretrain"
    assert ckpt["config"]["run"]["name"] == "X" and ckpt["tokenizer"]["eos_id"] == 50256
    assert "tok_emb.weight" in ckpt["model"] and not any(k.startswith("_orig_mod") for k in ckpt["model"])

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    trains = [r for r in records if r["type"] == "train"]
    assert [e["step"] for e in evals] == [30, 60]
    assert evals[-1]["val_perplexity"] < evals[0]["val_perplexity"]
    assert all(0 < e["val_bits_per_byte"] < 8 for e in evals)
    assert trains[-1]["loss"] < trains[0]["loss"] - 2.0  # from ~ln(50257) = 10.8 down
    assert all({"step", "loss", "lr", "tokens_per_sec"} <= set(r) for r in trains)

    log = (run / "training.log").read_text()
    assert "step 60/60" in log and "eval step 30" in log and "val_ppl" in log
    assert "step 60/60" in result.stderr  # plain lines on a non-terminal


def test_existing_run_is_not_overwritten(tiny_run, shakespeare, gpt2_dir):
    work, _ = tiny_run
    final = work / "experiments" / "runs" / "X" / "X-pretrain_final.pt"
    before = final.stat().st_mtime_ns
    result = llmctl("pretrain", "--preset", "tiny", "--run-name", "X",
                    "--set", f'data.datasets=["text:{shakespeare}"]', "--set", f"data.tokenizer={gpt2_dir}",
                    cwd=work, env=dict(os.environ, LLMCTL_CACHE=str(work / "cache")))
    assert result.returncode == 1 and "--overwrite" in result.stderr
    assert final.stat().st_mtime_ns == before


def test_dry_run_prints_resolved_config_and_derived_numbers(tmp_path, gpt2_dir, shakespeare):
    import tomllib

    # Local data and tokenizer: a piece the Hub would have to give makes the dry run exit 2 offline
    result = llmctl("pretrain", "--preset", "tiny", "--dry-run", "--set", f"data.tokenizer={gpt2_dir}",
                    "--set", f'data.datasets=["text:{shakespeare}"]', "--set", "pretrain.max_steps=120", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = tomllib.loads(result.stdout)  # derived numbers are TOML comments
    assert resolved["model"]["vocab_size"] == 50257 and resolved["pretrain"]["max_steps"] == 120
    for label in ("parameters", "tokens per step", "accumulation steps", "total tokens", "checkpoints at steps"):
        assert label in result.stdout
    assert "# total tokens          122,880" in result.stdout  # 120 steps x 16 x 64
    assert not (tmp_path / "experiments").exists()


@pytest.mark.parametrize("args, code, fragment", [
    (["--set", "pretrain.lr=0"], 2, "pretrain.lr must be > 0"),
    (["--set", "pretrain.batch_size=10", "--set", "pretrain.micro_batch_size=4"], 2, "divisible"),
    (["--set", "model.d_modle=3"], 2, "did you mean 'model.d_model'"),
    (["--set", "data.datasets=[\"text:/no/such/file.txt\"]"], 2, "/no/such/file.txt is not a file"),
    (["--set", "data.tokenizer=/no/such/tokenizer"], 2, "data.tokenizer"),
    (["--preset", "/no/such/preset.toml"], 2, "preset file not found"),
])
def test_bad_input_fails_cleanly_in_a_subprocess(args, code, fragment, tmp_path, gpt2_dir, shakespeare):
    base = ["pretrain", "--preset", "tiny", "--run-name", "bad", "--set", f"data.tokenizer={gpt2_dir}",
            "--set", f'data.datasets=["text:{shakespeare}"]']
    result = llmctl(*base, *args, cwd=tmp_path, env=dict(os.environ, LLMCTL_CACHE=str(tmp_path / "cache")))
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "experiments").exists()


def test_debug_env_shows_traceback(tmp_path):
    result = llmctl("pretrain", "--preset", "tiny", "--set", "pretrain.lr=0", cwd=tmp_path,
                    env=dict(os.environ, LLMCTL_DEBUG="1"))
    assert result.returncode == 2 and "Traceback" in result.stderr
