"""Checkpoints: atomic writes, weights_only loading, resolving run directories, refusals."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from llmctl.checkpoint import (checkpoint_path, load_checkpoint, prune_step_checkpoints, resolve_checkpoint,
                               save_checkpoint)
from llmctl.errors import LlmctlError


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
