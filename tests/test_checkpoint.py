"""Checkpoints: atomic writes, weights_only loading, resolving run directories, refusals."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from llmctl.checkpoint import checkpoint_path, load_checkpoint, resolve_checkpoint, save_checkpoint
from llmctl.errors import LlmctlError
from llmctl.retention import prune_step_checkpoints


def test_save_then_load_with_weights_only(tmp_path):
    path = checkpoint_path(tmp_path, "r", "pretrain", 10)
    assert path.name == "r-pretrain_step10.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "step": 10, "config": {"a": [1, 2]}})
    assert [p.name for p in tmp_path.iterdir()] == ["r-pretrain_step10.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 10 and raw["kind"] == "llmctl-checkpoint"
    assert load_checkpoint(path)["config"] == {"a": [1, 2]}


def test_resolve_run_directory_prefers_final_then_latest(tmp_path):
    for step in (5, 20, 10):
        save_checkpoint(checkpoint_path(tmp_path, "r", "pretrain", step), {"step": step})
    assert resolve_checkpoint(tmp_path).name == "r-pretrain_step20.pt"
    save_checkpoint(checkpoint_path(tmp_path, "r", "pretrain", None), {"step": 30})
    assert resolve_checkpoint(tmp_path).name == "r-pretrain_final.pt"
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(LlmctlError, match="holds no llmctl checkpoint"):
        resolve_checkpoint(empty)
    with pytest.raises(LlmctlError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "missing.pt")


def test_prune_keeps_newest_steps_and_final(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(checkpoint_path(tmp_path, "r", "pretrain", step), {})
    save_checkpoint(checkpoint_path(tmp_path, "r", "pretrain", None), {})
    prune_step_checkpoints(tmp_path, "pretrain", keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "r-pretrain_final.pt", "r-pretrain_step3.pt", "r-pretrain_step4.pt"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_truncated_and_foreign_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "llmctl-checkpoint", "format_version": 1, "x": Exploit()}, evil)
    with pytest.raises(LlmctlError, match="never unpickles code"):
        load_checkpoint(evil)
    assert not (tmp_path / "PWNED").exists()

    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": {"w": torch.randn(1000)}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LlmctlError, match="not a readable checkpoint"):
        load_checkpoint(truncated)

    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(LlmctlError, match="not a readable checkpoint|refused"):
        load_checkpoint(text)

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(LlmctlError, match="not an llmctl checkpoint"):
        load_checkpoint(foreign)

    future = tmp_path / "future.pt"
    torch.save({"kind": "llmctl-checkpoint", "format_version": 99}, future)
    with pytest.raises(LlmctlError, match="format 99"):
        load_checkpoint(future)


# ----------------------------------------------------------------------------- crash safety

# A long-lived parent imports torch once and forks a fresh writer per trial: each writer saves
# step checkpoints in a loop (and prunes, as training does) until the test kills it with
# SIGKILL at a random moment. Forking keeps a trial at milliseconds instead of a torch import.
WRITER = r"""
import os, sys
from pathlib import Path
import torch
from llmctl.checkpoint import checkpoint_path, save_checkpoint, step_checkpoints
from llmctl.retention import prune_step_checkpoints

run_dir = Path(sys.argv[1])
weights = {"w": torch.arange(1 << 20, dtype=torch.float32)}  # 4 MB: a write takes a while
print("ready", flush=True)
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        found = step_checkpoints(run_dir, "pretrain")
        step = found[-1][0] + 1 if found else 1
        while True:
            save_checkpoint(checkpoint_path(run_dir, "k", "pretrain", step), {"model": weights, "step": step})
            prune_step_checkpoints(run_dir, "pretrain", keep_last=2)
            step += 1
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_sigkill_at_random_moments_never_leaves_an_unloadable_newest_checkpoint(tmp_path):
    import random
    import signal
    import subprocess
    import time

    from conftest import PYTHON
    from llmctl.checkpoint import remove_partial_files, step_checkpoints

    rng = random.Random(20261126)
    writer = subprocess.Popen([PYTHON, "-c", WRITER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        newest, killed_mid_write = 0, 0
        for trial in range(40):
            writer.stdin.write("go\n")
            writer.stdin.flush()
            pid = int(writer.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.08))
            os.kill(pid, signal.SIGKILL)
            assert writer.stdout.readline().strip() == "reaped"

            killed_mid_write += any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
            found = step_checkpoints(tmp_path, "pretrain")
            assert found or newest == 0, f"trial {trial}: every checkpoint vanished"
            for step, path in found:  # every complete name holds a complete checkpoint
                assert load_checkpoint(path)["step"] == step, f"trial {trial}: {path.name}"
            if found:
                assert found[-1][0] >= newest, f"trial {trial}: the newest checkpoint went back in time"
                newest = found[-1][0]
            remove_partial_files(tmp_path)  # what the next run does at start
            assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)
    assert newest >= 5, "the writer barely ran; the trials proved nothing"
    assert killed_mid_write >= 3, f"only {killed_mid_write} of 40 kills landed inside a write"


# ----------------------------------------------------------------------------- retention, resume rules

def test_keep_last_never_deletes_the_best_validation_or_final_checkpoint(tmp_path):
    from llmctl.retention import best_checkpoint_step

    for step in (10, 20, 30, 40):
        save_checkpoint(checkpoint_path(tmp_path, "r", "pretrain", step), {})
    save_checkpoint(checkpoint_path(tmp_path, "r", "pretrain", None), {})
    history = [{"step": 10, "val_loss": 3.0}, {"step": 20, "val_loss": 2.5}, {"step": 25, "val_loss": 1.0},
               {"step": 30, "val_loss": 2.7}, {"step": 40, "val_loss": float("nan")}]
    best = best_checkpoint_step(history, {10, 20, 30, 40})
    assert best == 20  # step 25 scored better but has no checkpoint; NaN never wins
    prune_step_checkpoints(tmp_path, "pretrain", keep_last=1, protect={best})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "r-pretrain_final.pt", "r-pretrain_step20.pt", "r-pretrain_step40.pt"]


def test_more_refusals_are_one_line_and_run_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    legacy = tmp_path / "legacy.pt"  # the pre-zip torch format carries pickles too
    torch.save({"x": Exploit()}, legacy, _use_new_zipfile_serialization=False)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Exploit()))
    for path in (legacy, raw):
        with pytest.raises(LlmctlError) as info:
            load_checkpoint(path)
        assert "refused" in str(info.value) or "not a readable checkpoint" in str(info.value)
        assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)
    assert not (tmp_path / "PWNED").exists()
    evil = tmp_path / "evil.pt"
    torch.save({"x": Exploit()}, evil)
    with pytest.raises(LlmctlError, match=r"it would import posix\.system"):
        load_checkpoint(evil)

    import numpy as np

    arrays = tmp_path / "numpy.pt"
    torch.save({"a": np.zeros(3)}, arrays)
    with pytest.raises(LlmctlError, match="refused"):
        load_checkpoint(arrays)
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(LlmctlError, match="is empty"):
        load_checkpoint(empty)
    with pytest.raises(LlmctlError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_resume_config_changes_allow_only_safe_keys():
    from llmctl.resume import resume_config_changes
    from llmctl.config import Config
    from llmctl.errors import ConfigError

    saved = Config().to_dict()
    current = Config()
    current.pretrain.max_steps, current.pretrain.lr, current.run.device = 9000, 1e-4, "cpu"
    current.eval.max_tokens = 100
    notes = resume_config_changes(saved, current.to_dict(), "pretrain")
    assert "pretrain.max_steps: 5000 -> 9000" in notes and "pretrain.lr: 0.0003 -> 0.0001" in notes
    assert len(notes) == 4

    current.model.d_model, current.data.datasets = 512, ["text:other.txt"]
    with pytest.raises(ConfigError) as info:
        resume_config_changes(saved, current.to_dict(), "pretrain")
    message = str(info.value)
    assert "model.d_model 384 -> 512" in message and "data.datasets" in message and "max_steps" not in message.split(";")[0]

    # another stage's section and keys a newer llmctl added do not block a resume
    saved_other = {**Config().to_dict(), "sft": {"lr": 1.0}}
    assert resume_config_changes(saved_other, {**Config().to_dict(), "sft": {"lr": 2.0}, "new": {"k": 1}},
                                 "pretrain") == []


def test_run_directory_refusals_name_both_options(tmp_path):
    from llmctl.resume import check_run_dir, newest_checkpoint
    from llmctl.errors import ConfigError

    with pytest.raises(LlmctlError, match="nothing to resume: .* does not exist"):
        check_run_dir(tmp_path / "missing", resume=True, overwrite=False)
    with pytest.raises(ConfigError, match="--resume and --overwrite contradict"):
        check_run_dir(tmp_path, resume=True, overwrite=True)
    check_run_dir(tmp_path, resume=False, overwrite=False)  # empty: fine
    save_checkpoint(checkpoint_path(tmp_path, "r", "pretrain", 5), {"step": 5})
    with pytest.raises(LlmctlError, match="pass --resume to continue that run, --overwrite to delete it"):
        check_run_dir(tmp_path, resume=False, overwrite=False)
    # a weights-only step checkpoint cannot be resumed from: one line naming what is missing
    with pytest.raises(LlmctlError, match="lacks model, optimizer"):
        newest_checkpoint(tmp_path, "pretrain")


def test_newest_checkpoint_orders_by_step_and_counts_the_final_at_its_step(tmp_path):
    from llmctl.resume import newest_checkpoint

    full = {"model": {}, "optimizer": {}, "tokens_seen": 0, "data_position": {}, "rng": {}, "config": {},
            "stage": "pretrain"}
    save_checkpoint(checkpoint_path(tmp_path, "r", "pretrain", None), {**full, "step": 50})
    save_checkpoint(checkpoint_path(tmp_path, "r", "pretrain", 40), {**full, "step": 40})
    assert newest_checkpoint(tmp_path, "pretrain")[0].name == "r-pretrain_final.pt"
    save_checkpoint(checkpoint_path(tmp_path, "r", "pretrain", 70), {**full, "step": 70})  # resumed, then stopped
    path, payload, notes = newest_checkpoint(tmp_path, "pretrain")
    assert path.name == "r-pretrain_step70.pt" and payload["step"] == 70 and notes == []
