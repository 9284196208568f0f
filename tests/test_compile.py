"""torch.compile: a compiled run checkpoints the raw module's weights, and a broken compiler
falls back to eager with one warning instead of ending the run."""

from __future__ import annotations

import os
import subprocess
import warnings

import torch

from conftest import PYTHON
from small_runs import build_small_tokenizer, small_run_args

from llmctl.bench import SyntheticBatches
from llmctl.config import ModelConfig, TrainConfig
from llmctl.model import Transformer
from llmctl.trainer import Trainer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16)


def test_compiled_training_saves_a_plain_state_dict():
    torch.manual_seed(0)
    model = Transformer(CFG)
    trainer = Trainer(model, TrainConfig(lr=1e-3, batch_size=4, micro_batch_size=4, warmup_steps=0, max_steps=2),
                      batches=SyntheticBatches(64, 4, 16, 0), evaluate=None, device=torch.device("cpu"),
                      dtype=torch.float32, seq_len=16, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train_step()
        trainer.train_step()
    assert trainer.forward_model is not model, [str(w.message) for w in caught]  # really compiled
    state = trainer.state_dict()["model"]
    assert not any("_orig_mod" in key for key in state)
    fresh = Transformer(CFG)
    fresh.load_state_dict(state, strict=True)
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(fresh(x), model(x))


def test_broken_compiler_falls_back_to_eager_with_one_warning(tmp_path, shakespeare):
    build_small_tokenizer(tmp_path / "tok", shakespeare)
    env = dict(os.environ, LLMCTL_CACHE=str(tmp_path / "cache"), CXX="/nonexistent/g++")
    args = small_run_args("fallback", shakespeare, tmp_path / "tok", "--set", "run.compile=true",
                          "--set", "pretrain.max_steps=4")
    result = subprocess.run([PYTHON, "-m", "llmctl", *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("torch.compile failed") == 1
    assert "eager" in result.stderr
    ckpt = torch.load(tmp_path / "experiments/runs/fallback/fallback-pretrain_final.pt", weights_only=True)
    assert ckpt["step"] == 4
