"""`data.tokenizer_min_count`: GPT-2's vocabulary cut down to the tokens a corpus uses, losslessly,
cached, and carried through pretrain, eval and generate."""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from conftest import PYTHON
from llmctl.config import DataConfig
from llmctl.data.prune import prune_vocabulary
from llmctl.data.tokenizer import load_tokenizer, planned_vocab_size, ready_tokenizer, resolve_tokenizer
from llmctl.errors import ConfigError
from small_runs import small_run_args

UNSEEN = "Zygmunt Bauman's liquid modernity, 1925–2017: naïve façades & ✓ emoji 🙂\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, wikitext_valid) -> Path:
    """~100 kB of WikiText: enough to use a few thousand of GPT-2's tokens."""
    path = tmp_path_factory.mktemp("prune") / "train.txt"
    path.write_text(wikitext_valid.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    return path


def test_min_count_1_keeps_the_training_tokenization_and_encodes_anything(corpus, gpt2_dir):
    from tokenizers import Tokenizer

    gpt2 = load_tokenizer(str(gpt2_dir))
    text = corpus.read_text(encoding="utf-8")
    used = set(gpt2.encode(text))
    pruned = Tokenizer.from_str(prune_vocabulary(gpt2.to_json(), used))
    assert len(used) < pruned.get_vocab_size() < 0.25 * gpt2.vocab_size
    # the corpus splits into exactly the same pieces (renumbered)
    same = [gpt2.backend.id_to_token(i) for i in gpt2.encode(text)]
    assert [pruned.id_to_token(i) for i in pruned.encode(text, add_special_tokens=False).ids] == same
    # text that needs dropped tokens splits into kept ones and decodes back exactly
    ids = pruned.encode(UNSEEN, add_special_tokens=False).ids
    assert pruned.decode(ids) == UNSEEN and len(ids) > len(gpt2.encode(UNSEEN))
    # the end-of-text token survives, last
    assert pruned.token_to_id("<|endoftext|>") == pruned.get_vocab_size() - 1
    # every kept token can still be built: the parts of each surviving merge are in the vocabulary
    spec = json.loads(pruned.to_str())
    vocab = spec["model"]["vocab"]
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in spec["model"]["merges"])
    assert sorted(vocab.values()) == list(range(len(vocab)))


def test_resolve_prunes_once_caches_and_plans(tmp_path, corpus, gpt2_dir):
    cfg = DataConfig(datasets=[f"text:{corpus}"], tokenizer=str(gpt2_dir), tokenizer_min_count=2,
                     cache_dir=str(tmp_path))
    assert ready_tokenizer(cfg) is None  # data info / --dry-run before the first run: not made yet
    assert planned_vocab_size(cfg) == 50257  # the upper bound
    said: list[str] = []
    tok = resolve_tokenizer(cfg, said.append)
    assert said and "kept" in said[-1] and tok.vocab_size < 10_000
    assert tok.source.endswith("(tokens seen >= 2x)") and tok.eos_id == tok.vocab_size - 1
    assert tok.decode(tok.encode(UNSEEN)) == UNSEEN
    # min count 2: every token but the alphabet and merge parts is used at least twice in the sample
    per_token = Counter(i for ids in tok.encode_batch(corpus.read_text(encoding="utf-8").splitlines()) for i in ids)
    spec = json.loads(tok.to_json())
    made = {a + b for a, b in spec["model"]["merges"]}
    parts = {part for merge in spec["model"]["merges"] for part in merge}
    rare = {tok.backend.id_to_token(i) for i in range(tok.vocab_size) if per_token[i] < 2}
    assert rare and all(t not in made or t in parts for t in rare)  # the alphabet, or a piece of a kept token
    again_said: list[str] = []
    assert resolve_tokenizer(cfg, again_said.append).fingerprint == tok.fingerprint and not again_said
    assert planned_vocab_size(cfg) == tok.vocab_size
    assert ready_tokenizer(cfg).fingerprint == tok.fingerprint
    folder = next(tmp_path.glob("tokenizer-*"))
    assert load_tokenizer(str(folder)).fingerprint == tok.fingerprint  # usable as data.tokenizer = folder
    fewer = resolve_tokenizer(DataConfig(datasets=cfg.datasets, tokenizer=str(gpt2_dir), tokenizer_min_count=1,
                                         cache_dir=str(tmp_path)))
    assert fewer.vocab_size > tok.vocab_size


def test_non_bpe_tokenizer_is_refused(tmp_path, corpus):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    unigram = Tokenizer(models.Unigram([("<eos>", 0.0), ("a", -1.0), ("b", -2.0)], 0, byte_fallback=False))
    PreTrainedTokenizerFast(tokenizer_object=unigram, eos_token="<eos>").save_pretrained(str(tmp_path / "uni"))
    cfg = DataConfig(datasets=[f"text:{corpus}"], tokenizer=str(tmp_path / "uni"), tokenizer_min_count=1,
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="BPE tokenizers.*Unigram.*tokenizer_min_count = 0"):
        resolve_tokenizer(cfg)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("tokenizer-*"))


def test_pruned_run_trains_evaluates_and_generates(tmp_path, cli_env, wikitext_valid, gpt2_dir):
    args = small_run_args("pruned", wikitext_valid, gpt2_dir, "--set", "data.tokenizer_min_count=1",
                          "--set", f"run.output_dir={tmp_path / 'runs'}", docs=200)
    done = subprocess.run([PYTHON, "-m", "llmctl", *args], capture_output=True, text=True, env=cli_env)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "pruned"
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert 1000 < cfg["model"]["vocab_size"] < 20_000 and cfg["data"]["tokenizer_min_count"] == 1
    scored = subprocess.run([PYTHON, "-m", "llmctl", "eval", "--checkpoint", str(run), "--data",
                             f"text:{wikitext_valid}:20", "--json"], capture_output=True, text=True, env=cli_env)
    assert scored.returncode == 0, scored.stderr[-2000:]
    row = next(iter(json.loads(scored.stdout)["datasets"].values()))
    assert 0 < row["bits_per_byte"] < 20
    sampled = subprocess.run([PYTHON, "-m", "llmctl", "generate", "--checkpoint", str(run), "--prompt",
                              "Zygmunt", "--max-new-tokens", "8", "--seed", "1"],
                             capture_output=True, text=True, env=cli_env)
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr[-2000:]
    assert "8 tokens" in sampled.stderr
