"""`llmctl bench`: the JSON a user scripts against, and the reference loop it compares with."""

from __future__ import annotations

import json

import torch

from llmctl.bench import SyntheticBatches, reference_step
from llmctl.config import load_config
from llmctl.model import Transformer
from llmctl.runtime import seed_everything
from llmctl.trainer import Trainer
from test_cli import llmctl

SMALL = ["--set", "model.vocab_size=256", "--set", "model.d_model=32", "--set", "model.n_layers=1",
         "--set", "pretrain.batch_size=4", "--set", "pretrain.micro_batch_size=2", "--set", "model.max_seq_len=32"]


def test_bench_json_reports_speed_mfu_memory_and_the_reference(tmp_path, cli_env):
    result = llmctl("bench", "--preset", "tiny", *SMALL, "--steps", "2", "--warmup", "1", "--reference",
                    "--rounds", "2", "--json", cwd=tmp_path, env=cli_env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens_per_step"] == 4 * 32 and report["accumulation"] == 2
    assert report["params"] > 0 and report["tokens_per_sec"] > 0 and report["peak_memory_mb"] > 0
    assert 0 < report["mfu"] < 1.5  # against a matmul peak measured on the spot
    assert len(report["rounds_tokens_per_sec"]) == len(report["reference_rounds_tokens_per_sec"]) == 2
    assert report["speedup"] == report["tokens_per_sec"] / report["reference_tokens_per_sec"]
    assert "LlamaForCausalLM" in report["reference"]
    assert not any(tmp_path.iterdir())  # a benchmark writes no run directory


def test_bench_refuses_zero_steps_in_one_line(tmp_path, cli_env):
    result = llmctl("bench", "--preset", "tiny", *SMALL, "--steps", "0", cwd=tmp_path, env=cli_env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--steps" in result.stderr


def test_reference_loop_trains_the_same_model_on_the_same_tokens():
    """The comparison is fair only if both sides compute the same thing: same initial weights,
    same batches, same first loss and, after one AdamW step each, the same second loss."""
    cfg = load_config("tiny", ["model.vocab_size=256", "model.d_model=32", "model.n_layers=1",
                               "pretrain.warmup_steps=0", "pretrain.batch_size=4", "pretrain.micro_batch_size=2"])
    seed_everything(0)
    model = Transformer(cfg.model)
    theirs = reference_step(model, cfg, torch.device("cpu"), torch.float32)
    batches = SyntheticBatches(256, 2, cfg.model.max_seq_len, cfg.run.seed)
    trainer = Trainer(model, cfg.pretrain, batches=batches, evaluate=None, device=torch.device("cpu"),
                      dtype=torch.float32, seq_len=cfg.model.max_seq_len)
    ours_losses = [float(trainer.train_step()[0]) for _ in range(2)]
    theirs_losses = [float(theirs()) for _ in range(2)]
    torch.testing.assert_close(theirs_losses, ours_losses, rtol=1e-4, atol=1e-4)
