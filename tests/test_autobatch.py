"""micro_batch_size = "auto": the search, the CPU rule, the CUDA probe, and resume keeping the number."""

from __future__ import annotations

import tomllib

import pytest
import torch

from llmctl.autobatch import (CPU_TOKENS_PER_MICRO_BATCH, divisors_descending, largest_that_fits,
                              resolve_micro_batch)
from llmctl.config import ModelConfig, load_config
from llmctl.model import Transformer
from small_runs import small_run_args
from test_resume import run, work, cache  # noqa: F401  (fixtures: an in-process CLI in a temp folder)

AUTO = ["--set", 'pretrain.micro_batch_size="auto"']


def test_binary_search_finds_the_largest_fitting_divisor_in_few_tries():
    tried: list[int] = []

    def fits(m: int) -> bool:
        tried.append(m)
        return m <= 6
    assert largest_that_fits(divisors_descending(48), fits) == 6
    assert len(tried) <= 4  # 10 divisors: a binary search, not a scan
    assert largest_that_fits([4, 2, 1], lambda m: False) is None


def test_cpu_auto_takes_the_largest_divisor_within_the_token_cap():
    model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))
    cpu = torch.device("cpu")

    def auto(batch: int, seq: int, world: int = 1) -> int:
        return resolve_micro_batch("auto", batch, world, model, seq, cpu, torch.float32, "pretrain")
    assert CPU_TOKENS_PER_MICRO_BATCH == 4096
    assert auto(64, 256) == 16 and auto(24, 256) == 12 and auto(64, 8192) == 1 and auto(6, 32) == 6
    assert auto(64, 256, world=2) == 16 and auto(48, 256, world=4) == 12  # per process
    assert resolve_micro_batch(3, 64, 1, model, 256, cpu, torch.float32, "pretrain") == 3  # a number stays
    assert resolve_micro_batch("auto", 64, 1, model, 256, cpu, torch.float32, "pretrain", resumed_with=2) == 2


def test_auto_is_accepted_by_the_config_and_shown_by_the_dry_run(tmp_path, cli_env, gpt2_dir, shakespeare):
    cfg = load_config("tiny", ['pretrain.micro_batch_size="auto"'])
    assert cfg.pretrain.micro_batch_size == "auto" and cfg.accumulation_steps == "auto"
    assert cfg.eval_batch_size() == 8  # an unresolved "auto" never reaches a DataLoader as a string
    from test_cli import llmctl

    result = llmctl("pretrain", "--preset", "tiny", *AUTO, "--set", f"data.tokenizer={gpt2_dir}",
                    "--set", f'data.datasets=["text:{shakespeare}"]', "--dry-run",
                    cwd=tmp_path, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "auto (the largest micro-batch that fits" in result.stdout


def test_a_run_records_the_micro_batch_it_found_and_resumes_with_it(work, shakespeare, small_tok):
    first = run(*small_run_args("a", shakespeare, small_tok, *AUTO, "--set", "pretrain.max_steps=4"))
    assert first.exit_code == 0, first.output
    assert "micro-batch 4 (auto), accumulation 1" in first.stderr  # 4 x 32 tokens: the whole batch at once
    run_dir = work / "experiments" / "runs" / "a"
    saved = tomllib.loads((run_dir / "config.toml").read_text())
    assert saved["pretrain"]["micro_batch_size"] == 4
    again = run(*small_run_args("a", shakespeare, small_tok, *AUTO, "--resume", "--set", "pretrain.max_steps=6"))
    assert again.exit_code == 0, again.output
    assert "micro_batch_size" not in again.stderr  # "auto" is the number it resolved to, not a change
    other = run(*small_run_args("a", shakespeare, small_tok, "--set", "pretrain.micro_batch_size=2", "--resume",
                                "--set", "pretrain.max_steps=8"))
    assert other.exit_code == 2 and "pretrain.micro_batch_size 4 -> 2" in other.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the out-of-memory probe needs a CUDA GPU")
def test_cuda_probe_finds_a_micro_batch_that_trains():
    device = torch.device("cuda")
    cfg = ModelConfig(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, max_seq_len=1024)
    model = Transformer(cfg).to(device)
    micro = resolve_micro_batch("auto", 512, 1, model, cfg.max_seq_len, device, torch.bfloat16, "pretrain")
    assert 512 % micro == 0 and micro >= 1
    idx = torch.randint(0, 8192, (micro, cfg.max_seq_len), device=device)
    with torch.autocast("cuda", torch.bfloat16):
        model(idx, idx).backward()  # the size it chose really trains
