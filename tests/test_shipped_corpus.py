"""The corpus that ships with llmctl, and the default preset that trains on it with no network."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from llmctl.data import shakespeare
from llmctl.data.sft import load_sft_data, parse_sft_spec
from llmctl.data.sources import iter_documents, parse_spec
from llmctl.errors import ConfigError


def test_every_play_splits_into_its_scenes():
    for path in shakespeare.play_files():
        scenes = shakespeare._scenes(shakespeare.read_play(path))
        assert len(scenes) >= 9, path.name  # The Tempest, the shortest count, has 9 scenes
    docs = list(iter_documents(parse_spec("shakespeare")))
    assert len(docs) > 700
    assert docs[1].startswith("ALL'S WELL THAT ENDS WELL\n\n")  # a later scene keeps its play's title
    assert sum(len(d) for d in docs) > 0.95 * shakespeare.text_bytes()


def test_dialogue_pairs_a_speech_with_the_next_speakers_reply():
    data = load_sft_data(["shakespeare-dialogue:500"], "auto", 0.05)
    assert len(data.train) + len(data.validation) == 500
    # The first pair of All's Well: Countess to Bertram, his reply (no speaker lines inside).
    assert data.train[0][0][1] == "In delivering my son from me, I bury a second husband."
    assert data.train[0][1][1].startswith("And I in going, madam, weep o'er my father's death anew;")
    for conversation in data.train:
        (role_a, said), (role_b, reply) = conversation
        assert (role_a, role_b) == ("user", "assistant")
        assert said and reply and "[" not in said + reply  # stage directions removed
        assert len(said) + len(reply) <= shakespeare.MAX_PAIR_CHARS


@pytest.mark.parametrize("spec, where, message", [
    ("shakespeare-dialogue", "data", "is SFT data"),
    ("shakespeare", "sft", "is a pretraining corpus"),
    ("shakespeare#text", "data", "has no fields"),
])
def test_the_two_names_are_refused_in_the_wrong_place(spec, where, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec) if where == "data" else parse_sft_spec(spec)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_default_pretrain_needs_no_network(tmp_path):
    """`llmctl pretrain` with no preset: no Hub, an empty Hugging Face cache, a short step cap."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    result = subprocess.run(
        [sys.executable, "-m", "llmctl", "pretrain", "--run-name", "first",
         "--set", "pretrain.max_steps=2", "--set", "pretrain.batch_size=4", "--set", "pretrain.micro_batch_size=4",
         "--set", "eval.max_tokens=2048", "--set", f"data.cache_dir={tmp_path / 'cache'}",
         "--set", f"run.output_dir={tmp_path / 'runs'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("first-pretrain_final.pt")
    assert "next:" in result.stderr and "llmctl sft --from" in result.stderr
    assert "data: shakespeare with tokenizer train:4096" in result.stderr
