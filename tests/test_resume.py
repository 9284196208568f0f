"""Exact resume: a stopped-and-resumed run equals an uninterrupted one, bit for bit (CPU, fp32).

Runs go through the real CLI in-process (`typer.testing.CliRunner`) on Tiny Shakespeare with a
small BPE, one thread (tiny matmuls only lose to thread hand-offs on a busy machine), and a
1-layer, 32-wide model, so each run takes well under a second.
"""

from __future__ import annotations

import json
import os
import signal
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmctl.checkpoint import load_checkpoint, save_checkpoint
from llmctl.cli import app
from llmctl.config import Config, ModelConfig, TrainConfig
from llmctl.data.batches import RandomWindows
from llmctl.data.tokenizer import load_tokenizer
from llmctl.model import Transformer
from llmctl.retention import CheckpointCallback
from llmctl.trainer import Trainer, TrainingInterrupted
from small_runs import small_run_args




@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # one token store for the whole module


@pytest.fixture
def work(tmp_path, monkeypatch, cache) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMCTL_CACHE", str(cache))
    monkeypatch.delenv("LLMCTL_DEBUG", raising=False)
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def identical(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and values, equal to the last bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def states_equal(a: dict, b: dict) -> None:
    """Weights, optimizer, step, tokens seen, data position and RNG identical to the last bit."""
    for key in ("step", "tokens_seen", "model", "optimizer", "data_position", "rng"):
        identical(a[key], b[key], key)


def metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in records if r["type"] == "train"}
    evals = {r["step"]: r["val_loss"] for r in records if r["type"] == "eval"}
    return train, evals


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shakespeare, small_tok, cache) -> Path:
    """12 steps without a stop: the reference every resumed run must equal."""
    work = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("LLMCTL_CACHE", str(cache))
        result = run(*small_run_args("ref", shakespeare, small_tok))
    assert result.exit_code == 0, result.output
    return work / "experiments" / "runs" / "ref"


def test_stop_then_resume_is_bit_identical_to_a_straight_run(work, straight, shakespeare, small_tok):
    first = run(*small_run_args("split", shakespeare, small_tok, "--set", "pretrain.max_steps=5"))
    assert first.exit_code == 0, first.output
    run_dir = work / "experiments" / "runs" / "split"
    # max_steps, cadence and retention may change on resume; everything else must match
    resumed = run(*small_run_args("split", shakespeare, small_tok, "--resume",
                                  "--set", "pretrain.keep_last=1", "--set", "run.log_every=2"))
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from split-pretrain_final.pt at step 5" in resumed.stderr
    assert "changed on resume: pretrain.max_steps: 5 -> 12" in resumed.stderr

    states_equal(load_checkpoint(straight / "ref-pretrain_final.pt"), load_checkpoint(run_dir / "split-pretrain_final.pt"))
    ref_train, ref_eval = metrics(straight)
    train, evals = metrics(run_dir)
    assert set(train) >= {1, 2, 3, 4, 5, 6, 8, 10, 12}
    assert all(train[s] == ref_train[s] for s in train), "per-step losses differ"
    assert all(evals[s] == ref_eval[s] for s in ref_eval) and set(evals) == {4, 5, 8, 12}
    # keep_last=1 keeps the newest step checkpoint and the best-validation one (step 8 < step 4)
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["split-pretrain_final.pt", "split-pretrain_step8.pt"]


def test_resume_skips_an_unreadable_newest_checkpoint(work, straight, shakespeare, small_tok):
    assert run(*small_run_args("r", shakespeare, small_tok, "--set", "pretrain.max_steps=6")).exit_code == 0
    final = work / "experiments" / "runs" / "r" / "r-pretrain_final.pt"
    final.write_bytes(final.read_bytes()[:1000])  # a damaged disk, say
    result = run(*small_run_args("r", shakespeare, small_tok, "--resume"))
    assert result.exit_code == 0, result.output
    assert "skipped r-pretrain_final.pt" in result.stderr and "resumed from r-pretrain_step4.pt at step 4" in result.stderr
    states_equal(load_checkpoint(straight / "ref-pretrain_final.pt"), load_checkpoint(final))
    # metrics.jsonl forgets what the first attempt logged after step 4 (steps 5-6, the eval at 6),
    # re-runs the eval at step 4 that its checkpoint had not seen, and logs each step once
    lines = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if r["type"] == "train"]
    assert steps == sorted(set(steps)) and steps == list(range(1, 13))
    assert [r["step"] for r in lines if r["type"] == "eval"] == [4, 8, 12]
    assert metrics(final.parent) == metrics(straight)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_refuses_a_different_config_listing_every_difference(work, shakespeare, small_tok):
    assert run(*small_run_args("c", shakespeare, small_tok, "--set", "pretrain.max_steps=4")).exit_code == 0
    before = snapshot(work / "experiments")
    result = run(*small_run_args("c", shakespeare, small_tok, "--resume", "--set", "pretrain.max_steps=8",
                                 "--set", "model.n_layers=2", "--set", "pretrain.batch_size=8", "--set", "run.seed=7"))
    assert result.exit_code == 2
    *phases, line = result.stderr.strip().splitlines()  # what it was doing (plain lines), then one error
    assert all(phase.endswith(" …") for phase in phases), result.stderr
    assert line.startswith("error: cannot resume")
    for fragment in ("model.n_layers 1 -> 2", "pretrain.batch_size 4 -> 8", "run.seed 1337 -> 7"):
        assert fragment in line
    assert "max_steps 4" not in line  # a safe change is not a difference
    assert snapshot(work / "experiments") == before


def test_resume_needs_something_left_to_do(work, shakespeare, small_tok):
    assert run(*small_run_args("f", shakespeare, small_tok, "--set", "pretrain.max_steps=3")).exit_code == 0
    result = run(*small_run_args("f", shakespeare, small_tok, "--resume", "--set", "pretrain.max_steps=3"))
    assert result.exit_code == 2 and "is at step 3 and pretrain.max_steps is 3; raise it" in result.stderr


def test_resume_refuses_changed_training_data(work, shakespeare, small_tok):
    text = work / "book.txt"
    text.write_text(shakespeare.read_text()[:20000])
    args = small_run_args("d", text, small_tok, "--set", "pretrain.max_steps=3")
    assert run(*args).exit_code == 0
    text.write_text("A new first paragraph, longer than before.\n\n" + text.read_text())
    result = run(*args[:-2], "--set", "pretrain.max_steps=6", "--resume")
    assert result.exit_code == 1 and "the training data changed since it was saved" in result.stderr


def swap_first_two_lines(text: str) -> str:
    """The first paragraph's first two lines swapped: other text, the same words and pieces."""
    first, rest = text.split("\n\n", 1)
    lines = first.split("\n")
    return "\n".join([lines[1], lines[0], *lines[2:]]) + "\n\n" + rest


def test_resume_refuses_changed_training_data_of_the_same_token_count(work, shakespeare, small_tok):
    text = work / "book.txt"
    original = shakespeare.read_text()[:20000]
    text.write_text(original)
    args = small_run_args("same", text, small_tok, "--set", "pretrain.max_steps=3")
    assert run(*args).exit_code == 0
    edited = swap_first_two_lines(original)
    tokenizer = load_tokenizer(str(small_tok))
    # a byte-level BPE encodes each pre-token piece alone: swapped lines keep every count
    assert edited != original and [len(tokenizer.encode(d)) for d in edited.split("\n\n")] == \
        [len(tokenizer.encode(d)) for d in original.split("\n\n")]
    text.write_text(edited)
    resume = [*args[:-2], "--set", "pretrain.max_steps=6", "--resume"]
    result = run(*resume)
    line = result.stderr.strip().splitlines()[-1]  # after the data progress lines
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.output
    assert line.startswith("error: cannot resume from experiments/runs/same/same-pretrain_final.pt: the training "
                           "data changed since it was saved (the same token count, different content")
    assert line.endswith("restore the data, or start a new run with another --run-name")

    # A checkpoint saved before fingerprints existed is checked on its token count alone.
    final = work / "experiments" / "runs" / "same" / "same-pretrain_final.pt"
    payload = load_checkpoint(final)
    assert len(payload["data"].pop("fingerprint")) == 64
    save_checkpoint(final, {k: v for k, v in payload.items() if k not in ("kind", "format_version")})
    assert run(*resume).exit_code == 0


def test_a_run_saved_with_a_retired_config_key_still_evaluates_generates_tunes_and_resumes(
        work, shakespeare, small_tok):
    import tomli_w

    from conftest import shared_file

    assert run(*small_run_args("old", shakespeare, small_tok, "--set", "pretrain.max_steps=4")).exit_code == 0
    run_dir = work / "experiments" / "runs" / "old"
    # as every run saved it before data.tokenizer_min_count was removed
    for path in run_dir.glob("*.pt"):
        payload = load_checkpoint(path)
        payload["config"]["data"]["tokenizer_min_count"] = 0
        save_checkpoint(path, {k: v for k, v in payload.items() if k not in ("kind", "format_version")})
    saved = tomllib.loads((run_dir / "config.toml").read_text())
    saved["data"]["tokenizer_min_count"] = 0
    (run_dir / "config.toml").write_text(tomli_w.dumps(saved))

    scored = run("eval", "--checkpoint", str(run_dir), "--data", f"text:{shakespeare}:20", "--json")
    assert scored.exit_code == 0, scored.output
    sampled = run("generate", "--checkpoint", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "4")
    assert sampled.exit_code == 0 and sampled.stdout.strip(), sampled.output
    tuned = run("sft", "--from", str(run_dir), "--preset", "tiny", "--run-name", "old-sft",
                "--set", f'sft.datasets=["jsonl:{shared_file("sft/dolly_open_qa.jsonl")}:40"]',
                "--set", "sft.max_steps=2", "--set", "sft.batch_size=4", "--set", "sft.micro_batch_size=2",
                "--set", "sft.samples=0", "--set", "run.device=cpu", "--set", "run.dtype=float32")
    assert tuned.exit_code == 0, tuned.output
    assert "tokenizer_min_count" not in (work / "experiments" / "runs" / "old-sft" / "config.toml").read_text()
    resumed = run(*small_run_args("old", shakespeare, small_tok, "--resume", "--set", "pretrain.max_steps=6"))
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from old-pretrain_final.pt at step 4" in resumed.stderr


def test_divergence_stops_without_overwriting_the_good_checkpoint(work, shakespeare, small_tok):
    assert run(*small_run_args("n", shakespeare, small_tok, "--set", "pretrain.max_steps=5")).exit_code == 0
    run_dir = work / "experiments" / "runs" / "n"
    before = snapshot(run_dir)
    # lr is one of the keys a resume may change: exactly what one does after a divergence
    result = run(*small_run_args("n", shakespeare, small_tok, "--resume", "--set", "pretrain.lr=1e30"))
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training diverged at step 6") or line.startswith("error: training diverged at step 7")
    assert f"the last good checkpoint is {Path('experiments/runs/n/n-pretrain_final.pt')}" in line
    assert "lower pretrain.lr" in line and "bfloat16 instead of float16" in line and "grad_clip" in line
    assert "--resume --set pretrain.lr=<lower>" in line
    after = snapshot(run_dir)
    for name, data in before.items():  # every checkpoint is byte-identical; nothing new was saved
        if name.endswith(".pt"):
            assert after[name] == data, name
    assert sorted(n for n in after if n.endswith(".pt")) == sorted(n for n in before if n.endswith(".pt"))
    assert "training diverged" in (run_dir / "training.log").read_text()


def test_divergence_before_any_checkpoint(work, shakespeare, small_tok):
    result = run(*small_run_args("z", shakespeare, small_tok, "--set", "pretrain.lr=1e30"))
    assert result.exit_code == 1
    assert "no checkpoint had been saved yet" in result.stderr and "--overwrite" in result.stderr
    assert not list((work / "experiments" / "runs" / "z").glob("*.pt"))


# ----------------------------------------------------------------------------- the Trainer itself

class Recorder:
    def __init__(self, at_step: int | None = None):
        self.at_step, self.losses = at_step, {}

    def on_fit_start(self, t): ...
    def on_eval(self, t, r): ...
    def on_save(self, t, final): ...
    def on_fit_end(self, t, s): ...

    def on_log(self, t, record):
        self.losses[record["step"]] = record["loss"]
        if record["step"] == self.at_step:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to this (main) thread


def make_trainer(tmp_path: Path, tokenizer_dir: Path, callbacks, optimizer: str = "adamw") -> Trainer:
    """A Trainer wired by hand, as a stage other than pretrain (SFT) wires it."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    cfg = Config()
    cfg.run.name = "t"
    cfg.model = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)
    train = TrainConfig(lr=3e-3, batch_size=4, micro_batch_size=2, warmup_steps=2, max_steps=10,
                        eval_every=100, save_every=100, lr_schedule="cosine", optimizer=optimizer)
    tokens = np.random.default_rng(0).integers(0, tokenizer.vocab_size, 5000).astype(np.uint16)
    ckpt = CheckpointCallback(tmp_path, cfg, "sft", tokenizer, {"sources": [], "tokens": {"train": 5000}}, 0)
    return Trainer(Transformer(cfg.model), train, batches=RandomWindows(tokens, 16, 2, seed=5), evaluate=None,
                   device=torch.device("cpu"), dtype=torch.float32, seq_len=16, log_every=1,
                   callbacks=[*callbacks, ckpt])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_trainer_sigint_saves_the_current_step_and_resumes_exactly(tmp_path, small_tok, optimizer):
    """The generic path SFT shares: signal -> checkpoint of that step -> new Trainer -> same result
    (with Muon, both optimizers' states travel in the checkpoint)."""
    ref = Recorder()
    reference = make_trainer(tmp_path / "ref", small_tok, [ref], optimizer)
    reference.fit()

    handler = signal.getsignal(signal.SIGINT)
    stopped = Recorder(at_step=4)
    trainer = make_trainer(tmp_path / "run", small_tok, [stopped], optimizer)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.exit_code == 130 and info.value.step == 4
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored
    saved = load_checkpoint(tmp_path / "run" / "t-sft_step4.pt")
    assert saved["step"] == 4 and saved["stage"] == "sft"

    resumed_log = Recorder()
    resumed = make_trainer(tmp_path / "run", small_tok, [resumed_log], optimizer)
    torch.manual_seed(123)  # any global RNG drift before loading must not matter
    resumed.load_state_dict(saved)
    resumed.fit()
    assert {**stopped.losses, **resumed_log.losses} == ref.losses
    states_equal(reference.state_dict(), resumed.state_dict())


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    import random

    from llmctl.runtime import rng_state, set_rng_state

    state = rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(3))
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[0] == again[0] and draws[1] == again[1] and torch.equal(draws[2], again[2])


def test_a_signal_during_evaluation_stops_at_once_and_the_eval_reruns_on_resume(tmp_path, small_tok):
    trainer = make_trainer(tmp_path, small_tok, [])
    trainer.cfg.eval_every = 3
    finished, calls, current = [], [], [trainer]

    def long_eval():
        calls.append(current[0].step)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # preempted while evaluating
            for _ in range(10**8):  # seconds of work the signal must cut short
                pass
            finished.append(True)
        return {"loss": 1.0, "perplexity": 2.7, "tokens": 1, "seconds": 0.0}

    trainer.evaluate_fn = long_eval
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.exit_code == 143 and info.value.step == 3 and not finished
    saved = load_checkpoint(tmp_path / "t-sft_step3.pt")  # saved before the eval began
    assert saved["history"] == []

    resumed = make_trainer(tmp_path, small_tok, [])
    resumed.cfg.eval_every = 3
    resumed.evaluate_fn = long_eval
    resumed.load_state_dict(saved)
    current[0] = resumed
    resumed.fit()
    assert calls == [3, 3, 6, 9, 10]  # the interrupted eval at step 3 runs first
