"""Time budgets (`pretrain.max_time`) and the warmup-stable-decay schedule.

The schedule is checked as the pure function it is. Budgets are checked on real tiny runs:
through the CLI (final eval and final checkpoint when the time is spent, long before
max_steps) and on a Trainer wired by hand (a resumed run spends only what is left). The
budgets are a second or two, and the assertions leave wide margins for a busy machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmctl.checkpoint import load_checkpoint
from llmctl.cli import app
from llmctl.config import Config, ModelConfig, TrainConfig, parse_duration
from llmctl.data.batches import RandomWindows
from llmctl.data.tokenizer import load_tokenizer
from llmctl.model import Transformer
from llmctl.optim import lr_at
from llmctl.retention import CheckpointCallback
from llmctl.trainer import Trainer
from small_runs import small_run_args




# --------------------------------------------------------------------------- schedule


def test_durations_read_as_seconds():
    assert [parse_duration(t) for t in ("90s", "10m", "2h", "1h30m", "1.5m", "")] == [90, 600, 7200, 5400, 90, 0]
    for bad in ("10", "ten", "-1m", "0s", "10d", "m"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_wsd_warms_up_holds_then_decays_linearly_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=100, lr_schedule="wsd", decay_fraction=0.2,
                      min_lr_ratio=0.0)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup over steps
    assert all(lr == 1e-3 for lr in lrs[10:81])  # stable until the last 20% of the run
    assert lrs[90] == pytest.approx(0.5e-3) and lrs[99] == pytest.approx(5e-5)  # linear towards 0 at max_steps
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    # With a time budget the trainer passes progress instead: the decay follows the clock.
    assert lr_at(50, cfg, progress=0.5) == 1e-3
    assert lr_at(50, cfg, progress=0.9) == pytest.approx(0.5e-3)
    assert lr_at(50, cfg, progress=1.0) == 0.0
    floor = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=100, lr_schedule="wsd", min_lr_ratio=0.1)
    assert lr_at(100, floor) == pytest.approx(1e-4)
    # cosine keeps its step-based curve unless a progress is given
    cos = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=100, lr_schedule="cosine", min_lr_ratio=0.0)
    assert lr_at(50, cos) == pytest.approx(0.5e-3) and lr_at(50, cos, progress=1.0) == pytest.approx(0.0)


# --------------------------------------------------------------------------- budgets


def test_max_time_ends_a_run_early_with_a_final_eval_and_checkpoint(tmp_path, monkeypatch, shakespeare, small_tok):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path / "cache"))
    args = small_run_args("budget", shakespeare, small_tok, "--set", "pretrain.max_steps=1000000",
                          "--set", 'pretrain.max_time="1s"', "--set", "pretrain.lr_schedule=wsd",
                          "--set", "pretrain.eval_every=1000000", "--set", "pretrain.save_every=1000000")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "experiments" / "runs" / "budget"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    last = train[-1]["step"]
    assert 1 <= last < 1_000_000
    assert [e["step"] for e in evals] == [last]  # the final evaluation, at the step the budget ended
    final = load_checkpoint(run_dir / "budget-pretrain_final.pt")
    assert final["step"] == last and final["train_seconds"] >= 1.0
    assert train[-1]["lr"] < train[0]["lr"] or last <= 3  # annealed by the end (wsd follows the clock)
    # progress is told in time, not in steps out of a max_steps nobody will reach
    assert train[-1]["progress"] == 1.0 and train[-1]["max_time_seconds"] == 1.0
    log = (run_dir / "training.log").read_text()
    assert f"step {last:,}, 0:00:01 of 0:00:01 | loss" in log and "/1000000" not in log
    # resuming a run whose budget is spent says so, instead of re-saving the same step
    again = CliRunner().invoke(app, args + ["--resume"])
    assert again.exit_code == 2
    assert "used its whole time budget" in again.stderr and "pretrain.max_time=\"2s\"" in again.stderr
    more = CliRunner().invoke(app, args + ["--resume", "--set", 'pretrain.max_time="2s"'])
    assert more.exit_code == 0, more.output
    assert load_checkpoint(run_dir / "budget-pretrain_final.pt")["step"] > last


def make_trainer(tmp_path: Path, tokenizer_dir: Path, max_time: str) -> tuple[Trainer, list[dict]]:
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    cfg = Config()
    cfg.run.name = "t"
    cfg.model = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)
    train = TrainConfig(lr=3e-3, batch_size=4, micro_batch_size=2, warmup_steps=2, max_steps=1_000_000,
                        eval_every=1_000_000, save_every=1_000_000, lr_schedule="wsd", max_time=max_time)
    tokens = np.random.default_rng(0).integers(0, tokenizer.vocab_size, 5000).astype(np.uint16)
    ckpt = CheckpointCallback(tmp_path, cfg, "pretrain", tokenizer, {"sources": [], "tokens": {"train": 5000}}, 0)
    evals: list[dict] = []
    trainer = Trainer(Transformer(cfg.model), train, batches=RandomWindows(tokens, 16, 2, seed=5),
                      evaluate=lambda: evals.append({}) or {"loss": 1.0, "perplexity": 2.7, "tokens": 1, "seconds": 0},
                      device=torch.device("cpu"), dtype=torch.float32, seq_len=16, log_every=1000, callbacks=[ckpt])
    return trainer, evals


def test_resume_counts_the_time_already_spent(tmp_path, small_tok):
    first, _ = make_trainer(tmp_path, small_tok, "1s")
    summary = first.fit()
    assert summary["stopped_by"] == "max_time" and first.train_seconds >= 1.0
    state = first.state_dict()

    same, evals = make_trainer(tmp_path, small_tok, "1s")  # the budget is spent: nothing more to train
    same.load_state_dict(state)
    same.fit()
    assert same.step == first.step and evals == []  # that step's eval already happened

    more, _ = make_trainer(tmp_path, small_tok, "1.5s")  # half a second more, not a fresh 1.5 s
    more.load_state_dict(state)
    summary = more.fit()
    assert more.step > first.step and more.train_seconds >= 1.5
    assert summary["seconds"] < 1.2, summary  # a budget restarted from 0 would take >= 1.5 s
