"""Evaluation: every token scored once, the numbers equal a direct computation with the model
(disjoint and sliding windows), bits per byte by hand, transformers models through the same
code, and `llmctl eval --json` on a tiny trained run recomputed outside llmctl."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import PYTHON
from llmctl.config import ModelConfig
from llmctl.errors import ConfigError
from llmctl.cross_entropy import IGNORE_INDEX
from llmctl.evaluate import (bits_per_byte, evaluate_model, evaluate_tokens, rank_batches, rank_share, scored_windows,
                             stream_bytes)
from llmctl.model import Transformer

CPU = torch.device("cpu")



def tiny_model(vocab: int = 101, seq_len: int = 16, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=seq_len,
                      init_std=0.2)
    return Transformer(cfg).eval()


@torch.no_grad()
def direct_loss_sum(model, ids: list[int], L: int, S: int | None = None) -> tuple[float, int]:
    """The transformers perplexity guide's loop, one window at a time: windows of L inputs
    start every S tokens and score only the targets no earlier window scored."""
    S = S or L
    total, n, done = 0.0, 0, 0  # targets 1..done are scored
    for s in range(0, len(ids) - 1, S):
        window = torch.tensor(ids[s: s + L + 1])
        end = s + len(window) - 1  # index of its last target
        per_token = F.cross_entropy(model(window[None, :-1])[0].float(), window[1:], reduction="none")
        total += per_token[-(end - done):].double().sum().item()
        n += end - done
        done = end
        if end == len(ids) - 1:
            break
    return total, n


# --------------------------------------------------------------------------- windows

@pytest.mark.parametrize("n,L,S,chunk", [(100, 16, 16, None), (100, 16, 5, None), (97, 16, 1, None),
                                         (17, 16, 16, None), (10, 16, 4, None), (250, 16, 7, 13), (2, 16, 3, None)])
def test_every_token_after_the_first_is_scored_exactly_once(n, L, S, chunk):
    tokens = np.arange(n)
    source = tokens if chunk is None else [tokens[i: i + chunk] for i in range(0, n, chunk)]
    counts: Counter[int] = Counter()
    for window, n_scored in scored_windows(source, L, S):
        assert 2 <= len(window) <= L + 1 and 1 <= n_scored <= len(window) - 1
        scored = window[len(window) - n_scored:]  # the targets this window scores
        counts.update(scored.tolist())
        # Each scored target sees at least L - S tokens before it (or all there are).
        first = int(scored[0])
        assert first - int(window[0]) >= min(first, L - S) or int(window[0]) == 0
    assert counts == Counter(range(1, n))


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_ranks_get_equal_batch_counts_and_together_score_every_target_once(world):
    """Under FSDP every forward is a collective, so every rank must run the same number; the
    split must still cover each scored target exactly once. Tokens are 0..n-1, so a target's
    value is its position in the stream."""
    for n in [2, 3, 17, 18, 33, 34, 50, 65, 66, 97, 130, 200]:
        for L, S in [(16, 16), (16, 5), (8, 8)]:
            for batch_size in [1, 2, 3, 4, 5]:
                for max_tokens in [0, 40]:
                    counts: Counter[int] = Counter()
                    per_rank = []
                    for rank in range(world):
                        batches = list(rank_batches(scored_windows(np.arange(n), L, S, max_tokens), batch_size,
                                                    rank, world))
                        per_rank.append(len(batches))
                        for x, y in batches:
                            assert x.shape == y.shape and x.shape[0] <= batch_size
                            counts.update(y[y != IGNORE_INDEX].tolist())
                    case = (n, L, S, batch_size, max_tokens)
                    alone = len(list(rank_batches(scored_windows(np.arange(n), L, S, max_tokens), batch_size)))
                    assert per_rank == [-(-alone // world)] * world, case
                    last = min(n - 1, max_tokens) if max_tokens else n - 1
                    assert counts == Counter(range(1, last + 1)), case


def test_rank_share_deals_batches_round_robin_and_pads_with_none():
    assert [list(rank_share(range(5), r, 2)) for r in range(2)] == [[0, 2, 4], [1, 3, None]]
    assert [list(rank_share(range(2), r, 4)) for r in range(4)] == [[0], [1], [None], [None]]
    assert [list(rank_share([], r, 3)) for r in range(3)] == [[], [], []]
    assert list(rank_share(range(3))) == [0, 1, 2]


def test_max_tokens_caps_the_targets():
    scored = sum(k for _, k in scored_windows(np.arange(1000), 16, 16, max_tokens=100))
    assert scored == 100


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_perplexity_equals_a_direct_computation(batch_size):
    model = tiny_model()
    ids = torch.randint(0, 101, (203,), generator=torch.Generator().manual_seed(1)).tolist()
    total, n = direct_loss_sum(model, ids, 16)
    got = evaluate_tokens(model, np.array(ids, dtype=np.uint16), 16, batch_size, CPU)
    assert got["tokens"] == n == 202
    assert got["loss"] == pytest.approx(total / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert got["loss_sum"] == pytest.approx(total, rel=1e-5)


def test_sliding_window_loss_equals_disjoint_windows_when_stride_is_the_context():
    model = tiny_model(seed=2)
    ids = np.random.default_rng(0).integers(0, 101, 150)
    disjoint, n = direct_loss_sum(model, ids.tolist(), 16)  # windows evaluated one by one, no overlap
    same = evaluate_tokens(model, ids, 16, 4, CPU, stride=16)
    default = evaluate_tokens(model, ids, 16, 4, CPU)
    assert same["loss"] == pytest.approx(disjoint / n, rel=1e-5) and same["loss"] == default["loss"]


@pytest.mark.parametrize("stride", [2, 5, 11])
def test_sliding_windows_equal_the_perplexity_guide_loop(stride):
    model = tiny_model(seed=3)
    ids = np.random.default_rng(1).integers(0, 101, 90)
    total, n = direct_loss_sum(model, ids.tolist(), 16, stride)
    got = evaluate_tokens(model, ids, 16, 5, CPU, stride=stride)
    assert got["tokens"] == n == 89 and got["loss"] == pytest.approx(total / n, rel=1e-5)
    # More context per token: on a model with real context use this is lower; here only different.
    assert got["loss"] != evaluate_tokens(model, ids, 16, 5, CPU)["loss"]


def test_the_trainers_call_is_unchanged_and_leaves_the_model_in_train_mode():
    model = tiny_model().train()
    ids = np.random.default_rng(2).integers(0, 101, 500).astype(np.uint16)
    capped = evaluate_tokens(model, ids, 16, 4, CPU, None, 64)  # positional, as pretrain.py calls it
    assert model.training and capped["tokens"] == 64
    model.eval()
    total, n = direct_loss_sum(model, ids[:65].tolist(), 16)
    assert capped["loss"] == pytest.approx(total / n, rel=1e-5)


# --------------------------------------------------------------------------- bits per byte

@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    from llmctl.data.tokenizer import load_tokenizer

    return load_tokenizer(str(gpt2_dir))


DOCS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
        "All:\nSpeak, speak. — naïve café, 日本語 🙂",
        "First Citizen:\nYou are all resolved rather to die than to famish?"]


def loaded_tiny(gpt2, seq_len: int = 16):
    from llmctl.loading import LoadedModel

    torch.manual_seed(0)
    model = tiny_model(vocab=gpt2.vocab_size, seq_len=seq_len)
    return LoadedModel(model, gpt2, seq_len, "tiny", None, None, CPU, torch.float32)


def test_bits_per_byte_by_hand(gpt2, tmp_path):
    text_file = tmp_path / "held.txt"
    text_file.write_text("\n\n".join(DOCS) + "\n")  # documents are blocks separated by blank lines
    loaded = loaded_tiny(gpt2)
    ids = [t for doc in DOCS for t in [*gpt2.encode(doc), gpt2.eos_id]]  # packed as in training
    total, n = direct_loss_sum(loaded.model, ids, 16)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in DOCS) + len(DOCS)  # + one byte per end-of-text
    assert n_bytes > sum(len(d) for d in DOCS) + len(DOCS)  # the multi-byte characters count as bytes

    row = evaluate_model(loaded, [f"text:{text_file}"], batch_size=2)["datasets"][f"text:{text_file}"]
    assert row["tokens"] == n == len(ids) - 1 and row["bytes"] == n_bytes
    assert row["loss"] == pytest.approx(total / n, rel=1e-5)
    assert row["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)
    assert bits_per_byte(total, n_bytes) == pytest.approx(row["bits_per_byte"], rel=1e-5)
    # The validation split is stored as tokens; decoding them gives back the same byte count.
    assert stream_bytes(np.array(ids, dtype=np.uint16), gpt2) == n_bytes


def test_eval_rejects_bad_stride_and_missing_data(gpt2, tmp_path):
    loaded = loaded_tiny(gpt2)
    with pytest.raises(ConfigError, match="stride 17"):
        evaluate_model(loaded, [f"text:{tmp_path}/x.txt"], stride=17)
    with pytest.raises(ConfigError, match="no training validation split|--data"):
        evaluate_model(loaded)  # not an llmctl checkpoint: there is no run to take validation from
    with pytest.raises(ConfigError, match="missing.txt"):
        evaluate_model(loaded, [f"text:{tmp_path}/missing.txt"])


def test_a_transformers_model_is_scored_by_the_same_code(gpt2_dir, tmp_path):
    """A transformers folder (a tiny random Llama with the GPT-2 tokenizer) through load_model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmctl.loading import load_model

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      tie_word_embeddings=True))
    folder = tmp_path / "hf-tiny"
    hf.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gpt2_dir / name, folder / name)
    text_file = tmp_path / "held.txt"
    text_file.write_text("\n\n".join(DOCS))

    loaded = load_model(folder, device="cpu")
    assert loaded.kind == "transformers" and loaded.context_length == 16
    row = evaluate_model(loaded, [f"text:{text_file}"])["datasets"][f"text:{text_file}"]
    ids = [t for doc in DOCS for t in [*loaded.tokenizer.encode(doc), loaded.tokenizer.eos_id]]
    hf.eval()
    total, n = direct_loss_sum(lambda x: hf(input_ids=x).logits, ids, 16)
    assert row["tokens"] == n and row["loss"] == pytest.approx(total / n, rel=1e-5)


# --------------------------------------------------------------------------- the CLI, end to end

def llmctl_cli(*args: str, cwd, env) -> subprocess.CompletedProcess:
    env = dict(env, OMP_NUM_THREADS="1")  # steady on a busy 2-core machine; results do not depend on it
    return subprocess.run([PYTHON, "-m", "llmctl", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shakespeare, gpt2_dir):
    """`llmctl pretrain --preset tiny` for 20 small steps on the first 400 paragraphs of Tiny Shakespeare."""
    work = tmp_path_factory.mktemp("eval-run")
    env = dict(os.environ, LLMCTL_CACHE=str(work / "cache"))
    env.pop("LLMCTL_DEBUG", None)
    result = llmctl_cli(
        "pretrain", "--preset", "tiny", "--run-name", "E",
        "--set", f'data.datasets=["text:{shakespeare}:400"]', "--set", f"data.tokenizer={gpt2_dir}",
        "--set", "pretrain.max_steps=20", "--set", "pretrain.batch_size=4", "--set", "pretrain.micro_batch_size=4",
        "--set", "pretrain.eval_every=20",
        "--set", "pretrain.save_every=20", "--set", "eval.max_tokens=256", cwd=work, env=env)
    assert result.returncode == 0, result.stderr
    # The play's last speeches, never trained on: documents separated by blank lines.
    docs = [b.strip("\n") for b in shakespeare.read_text(encoding="utf-8")[-2500:].split("\n\n")[1:] if b.strip()]
    held = work / "held.txt"
    held.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return work, env, work / "experiments" / "runs" / "E", held, docs


@functools.cache
def model_from_tensors(checkpoint) -> Transformer:
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = Transformer(ModelConfig(**payload["config"]["model"])).eval()
    model.load_state_dict(payload["model"])
    return model


def outside_llmctl(checkpoint, ids: list[int], stride: int | None = None) -> tuple[float, int]:
    """Rebuild the model from the checkpoint's tensors and config and score ids directly."""
    model = model_from_tensors(checkpoint)
    return direct_loss_sum(model, ids, model.cfg.max_seq_len, stride)


def test_cli_eval_json_on_held_out_text_matches_a_recomputation(trained_run, gpt2):
    work, env, run, held, all_docs = trained_run
    result = llmctl_cli("eval", "--checkpoint", str(run), "--data", f"text:{held}", "--data", f"text:{held}:2",
                        "--json", cwd=work, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["path"].endswith("E-pretrain_final.pt") and report["context"] == 64
    rows = report["datasets"]
    assert list(rows) == [f"text:{held}", f"text:{held}:2"]
    for spec, n_docs in ((f"text:{held}", None), (f"text:{held}:2", 2)):
        docs = all_docs[:n_docs]
        ids = [t for doc in docs for t in [*gpt2.encode(doc), gpt2.eos_id]]
        total, n = outside_llmctl(run / "E-pretrain_final.pt", ids)
        n_bytes = sum(len(d.encode()) for d in docs) + len(docs)
        row = rows[spec]
        assert set(row) >= {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}
        assert row["tokens"] == n and row["bytes"] == n_bytes
        assert row["loss"] == pytest.approx(total / n, rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-4)
        assert row["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)
    assert rows[f"text:{held}"]["loss"] < math.log(gpt2.vocab_size)  # 20 steps learned something

    # Sliding windows, shown as the Rich table (loss to 4 decimals).
    strided = llmctl_cli("eval", "-c", str(run), "--data", f"text:{held}", "--stride", "16", cwd=work, env=env)
    assert strided.returncode == 0, strided.stderr
    assert "stride 16" in strided.stdout and "bits/byte" in strided.stdout
    ids = [t for doc in all_docs for t in [*gpt2.encode(doc), gpt2.eos_id]]
    total, n = outside_llmctl(run / "E-pretrain_final.pt", ids, stride=16)
    assert f"{total / n:.4f}" in strided.stdout and f"{total / n:.4f}" != f"{rows[f'text:{held}']['loss']:.4f}"


def test_cli_eval_defaults_to_the_runs_validation_split(trained_run):
    work, env, run, _, _ = trained_run
    result = llmctl_cli("eval", "-c", str(run / "E-pretrain_final.pt"), "--json", cwd=work, env=env)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["datasets"]["validation"]
    from llmctl.config import config_from_dict
    from llmctl.data.store import prepare_store
    from llmctl.data.tokenizer import TextTokenizer

    payload = torch.load(run / "E-pretrain_final.pt", map_location="cpu", weights_only=True)
    cfg = config_from_dict(payload["config"])
    os.environ["LLMCTL_CACHE"] = env["LLMCTL_CACHE"]
    try:
        tokens = prepare_store(cfg.data, TextTokenizer.from_state(payload["tokenizer"])).tokens("validation")
    finally:
        os.environ.pop("LLMCTL_CACHE")
    total, n = outside_llmctl(run / "E-pretrain_final.pt", np.asarray(tokens[0: len(tokens)]).tolist())
    assert row["tokens"] == n == len(tokens) - 1 and row["loss"] == pytest.approx(total / n, rel=1e-5)


@pytest.mark.parametrize("what", ["missing", "not-a-checkpoint", "torch-file"])
def test_cli_eval_bad_checkpoint_is_one_line(tmp_path, cli_env, what):
    path = tmp_path / "model.pt"
    if what == "not-a-checkpoint":
        path.write_text("hello, not a checkpoint\n")
    elif what == "torch-file":
        torch.save({"weights": torch.zeros(2)}, path)
    result = llmctl_cli("eval", "--checkpoint", str(path), "--json", cwd=tmp_path, env=cli_env)
    lines = result.stderr.strip().splitlines()
    # A path that names nothing is a bad input (2); a file that is there but unreadable, a run-time failure (1).
    assert result.returncode == (2 if what == "missing" else 1) and result.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.stderr
    assert ("not found" in lines[0]) == (what == "missing")


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory, small_tok):
    """A real checkpoint of an untrained 1-layer model with the small tokenizer, in a folder
    whose name holds brackets (Rich markup would read them as a tag)."""
    from llmctl.checkpoint import save_checkpoint
    from llmctl.config import load_config
    from llmctl.data.tokenizer import load_tokenizer
    from llmctl.pretrain import resolve_vocab

    tok = load_tokenizer(str(small_tok))
    cfg = resolve_vocab(load_config("tiny", ["model.d_model=32", "model.n_layers=1", "model.max_seq_len=32"], "u"),
                        tok.vocab_size)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("untrained") / "run[1]" / "u-pretrain_final.pt"
    path.parent.mkdir()
    save_checkpoint(path, {"stage": "pretrain", "config": cfg.to_dict(), "tokenizer": tok.to_state(),
                           "model": Transformer(cfg.model).state_dict(), "step": 0})
    return path


def test_cli_eval_table_shows_long_paths_whole_when_piped(untrained_checkpoint, shakespeare, tmp_path, cli_env):
    """stdout is a pipe here, where Rich assumes 80 columns and used to cut the data column with "…"."""
    folder = tmp_path.joinpath(*["a-rather-long-folder-name-for-held-out-text"] * 4)
    folder.mkdir(parents=True)
    held = folder / "held-out.txt"
    held.write_text(shakespeare.read_text(encoding="utf-8")[-1500:], encoding="utf-8")
    env = {k: v for k, v in cli_env.items() if k != "COLUMNS"}
    result = llmctl_cli("eval", "-c", str(untrained_checkpoint), "--data", f"text:{held}", "--device", "cpu",
                        cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(f"text:{held} " in line for line in lines), result.stdout  # on one line, not folded or cut
    assert any(f"{untrained_checkpoint}  (context 32" in line for line in lines), result.stdout
    assert "…" not in result.stdout
