"""Counted n-grams mixed into the predictions (`model.ngram_order`, `model.cache_weight`): the
n-gram model is interpolated absolute discounting to the letter, the window cache counts the
continuations of the last two tokens (else the last one), the mixture is one distribution in
evaluation and cached generation, training ignores it, and the counts survive a checkpoint.
Also `pretrain.seq_len`: training on sequences shorter than the model's window."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import PYTHON
from llmctl.config import ModelConfig
from llmctl.model import KVCache, Transformer
from llmctl.ngram import DISCOUNT, NOVEL_SHARE, ZIPF_OFFSET, CountMixture, WindowView
from small_runs import small_run_args

V = 12


def reference_probability(text: list[int], history: list[int], w: int, order: int) -> float:
    """Interpolated absolute discounting written out with Counters: history = [x_t, x_{t-1}, ...]."""
    bigram_types = {(a, b) for a, b in zip(text, text[1:])}
    continuation = Counter(b for _, b in bigram_types)
    zipf = [1 / (i + ZIPF_OFFSET) for i in range(V)]
    p = (1 - NOVEL_SHARE) * continuation[w] / sum(continuation.values()) + NOVEL_SHARE * zipf[w] / sum(zipf)
    for k in range(1, order):
        context = tuple(reversed(history[:k]))
        follows = Counter(text[i + k] for i in range(len(text) - k)
                          if tuple(text[i: i + k]) == context)
        total = sum(follows.values())
        if len(context) == k and all(c >= 0 for c in context) and total:
            p = max(follows[w] - DISCOUNT, 0) / total + DISCOUNT * len(follows) / total * p
    return p


def test_the_ngram_model_is_interpolated_absolute_discounting_and_sums_to_one():
    rng = np.random.default_rng(0)
    text = rng.integers(0, 6, 400).tolist()  # ids 6..11 never occur: only the Zipf prior covers them
    counts = CountMixture(V, order=3, ngram_weight=0.3, cache_weight=0.0)
    assert counts.fit(np.array(text)) == 400
    history = torch.tensor([[[3, 1], [5, -1], [9, 2], [0, 0]]])  # (B=1, Q=4, K=2); 9 was never seen
    full = counts.ngram_probs(history)  # (1, 4, V)
    assert torch.allclose(full.sum(-1), torch.ones(1, 4, dtype=torch.float64))
    for q in range(4):
        for w in range(V):
            expected = reference_probability(text, history[0, q].tolist(), w, order=3)
            assert full[0, q, w].item() == pytest.approx(expected, rel=1e-9)
    targets = torch.tensor([[2, 7, 0, 4]])
    assert torch.allclose(counts.ngram_target_probs(history, targets), full.gather(2, targets[..., None])[..., 0])
    assert full[0, 0, 7] > 0 and full[0, 0, 6] > full[0, 0, 11]  # unseen ids: small, by rank


def test_the_cache_reads_the_continuations_of_the_last_two_tokens_else_the_last_one():
    counts = CountMixture(V, order=0, ngram_weight=0.0, cache_weight=0.5)
    idx = torch.tensor([[5, 1, 2, 5, 1, 3, 4, 1, 7, 5, 1]])
    view = WindowView.of_sequence(idx, idx.size(1), window=64)
    weights, offered = counts._cache_weights(view)  # (1, Q, S), (1, S)

    def cache_distribution(t: int) -> dict[int, float]:
        dist: dict[int, float] = {}
        for j, weight in enumerate(weights[0, t].tolist()):
            if weight:
                dist[int(offered[0, j])] = dist.get(int(offered[0, j]), 0.0) + weight
        return dist
    assert cache_distribution(10) == {2: 0.5, 3: 0.5}  # "5 1" was followed by 2 and by 3, never by 7
    assert cache_distribution(7) == pytest.approx({2: 0.5, 3: 0.5})  # "4 1" is new: what followed "1"
    assert cache_distribution(2) == {}  # 2 has not occurred before
    weights, offered = counts._cache_weights(WindowView.of_sequence(idx, idx.size(1), window=4))
    assert cache_distribution(10) == {7: 1.0}  # t = 10 sees positions 7..10: one "1" (at 7), no "5 1"


def counted_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    settings = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, copy_pointer=True,
                    ngram_order=3, ngram_weight=0.3, cache_weight=0.2)
    model = Transformer(ModelConfig(**{**settings, **overrides}))
    if model.counts is not None:
        model.counts.fit(np.random.default_rng(seed).integers(0, 8, 2000))
    return model.eval()


def test_the_mixture_is_one_distribution_and_the_loss_is_its_log_probability():
    model = counted_model()
    idx = torch.randint(0, 8, (2, 16))
    targets = torch.randint(0, V, (2, 16))
    targets[1, 4] = -100
    with torch.no_grad():
        log_probs = model(idx).double()  # (B, T, V) log-probabilities of the mixture
        per_token = model(idx, targets, reduction="none").view(2, 16)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2, 16, dtype=torch.float64), atol=1e-5)
    expected = -log_probs.gather(2, targets.clamp(min=0)[..., None])[..., 0].masked_fill(targets == -100, 0.0)
    assert torch.allclose(per_token.double(), expected, atol=1e-4)
    without = counted_model(ngram_order=0, ngram_weight=0.0, cache_weight=0.0)  # same seed: same network
    with torch.no_grad():
        assert not torch.allclose(model(idx, targets), without(idx, targets))


def test_training_loss_is_the_networks_own():
    model, plain = counted_model(), counted_model(ngram_order=0, ngram_weight=0.0, cache_weight=0.0)
    model.train(), plain.train()
    idx, targets = torch.randint(0, 8, (2, 16)), torch.randint(0, 8, (2, 16))
    assert torch.equal(model(idx, targets), plain(idx, targets))


def test_cached_generation_gives_the_uncached_mixture_and_slides_past_the_window():
    model = counted_model()
    seq = torch.randint(0, 6, (1, 40))
    cache = KVCache(model.cfg)
    L = model.cfg.max_seq_len
    with torch.no_grad():
        steps = [model(seq[:, :5], cache=cache, last_only=True)[:, -1]]
        steps += [model(seq[:, t: t + 1], cache=cache, last_only=True)[:, -1] for t in range(5, seq.size(1))]
        for i, logits in enumerate(steps[: L - 4]):  # while the ring fills: exactly the full forward
            full = model(seq[:, : 5 + i], last_only=True)[:, -1]
            assert torch.allclose(logits, full, atol=1e-4), i
        # Once it slides, the counts read what a window of the last L tokens holds (the
        # network's cached keys, computed with longer contexts, may differ slightly).
        t = seq.size(1) - 1
        uniform = torch.zeros(1, 1, V)
        from_ring = model.counts.mix_log_probs(uniform, cache.window(torch.tensor([t])))
        from_window = model.counts.mix_log_probs(uniform, WindowView.of_sequence(seq[:, t + 1 - L: t + 1], 1, L))
        assert torch.allclose(from_ring, from_window, atol=1e-6)
    assert all(torch.isfinite(step).all() for step in steps)


def test_the_counts_travel_with_the_weights():
    model = counted_model()
    fresh = Transformer(model.cfg).eval()  # empty tables: their sizes come from the state dict
    fresh.load_state_dict(model.state_dict())
    idx = torch.randint(0, 8, (1, 16))
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))


@pytest.mark.parametrize("setting, message", [
    (("model.ngram_order=5",), "model.ngram_order must be 0 (off) or 1..4"),
    (("model.ngram_order=3",), "go together"),
    (("model.ngram_order=3", "model.ngram_weight=0.6", "model.cache_weight=0.5"), "sum below 1"),
    (("model.attention_block=8", "pretrain.seq_len=12"), "multiple of model.attention_block"),
    (("pretrain.seq_len=64",), "pretrain.seq_len must be 0"),
])
def test_bad_count_and_sequence_settings_end_in_one_line(tmp_path, cli_env, shakespeare, small_tok, setting, message):
    sets = [arg for s in setting for arg in ("--set", s)]
    run = subprocess.run([PYTHON, "-m", "llmctl", *small_run_args("bad", shakespeare, small_tok, *sets)],
                         cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert message in run.stderr, run.stderr[-1000:]
    assert not (tmp_path / "experiments").exists()


def test_a_counted_model_trains_on_short_sequences_evaluates_generates_and_exports(tmp_path, cli_env, shakespeare,
                                                                                    small_tok):
    def llmctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "llmctl", *args], cwd=tmp_path, env=cli_env, capture_output=True,
                              text=True, timeout=300)

    counted = ("--set", "model.ngram_order=3", "--set", "model.ngram_weight=0.3", "--set", "model.cache_weight=0.2",
               "--set", "pretrain.seq_len=16")
    trained = llmctl(*small_run_args("counts", shakespeare, small_tok, *counted))
    assert trained.returncode == 0, trained.stderr[-2000:]
    run_dir = tmp_path / "experiments" / "runs" / "counts"
    log = (run_dir / "training.log").read_text()
    assert "(4 x 16," in log and "counts: order-3 n-grams of" in log  # 16-token sequences, a 32-token model
    scored = llmctl("eval", "-c", str(run_dir), "--data", f"text:{shakespeare}", "--json")
    assert scored.returncode == 0, scored.stderr[-2000:]
    report = json.loads(scored.stdout)
    (row,) = report["datasets"].values()
    assert report["context"] == 32 and 0 < row["bits_per_byte"] < 8
    generated = llmctl("generate", "-c", str(run_dir), "-p", "ROMEO:", "-m", "40", "--temperature", "0")
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr[-2000:]
    refused = llmctl("export", "-c", str(run_dir), str(tmp_path / "hf"))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr and not (tmp_path / "hf").exists()
    assert "model.ngram_order" in refused.stderr and "--format safetensors" in refused.stderr
    exported = llmctl("export", "-c", str(run_dir), "--format", "safetensors", str(tmp_path / "weights"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    from llmctl.export import load_safetensors_folder

    model, _, config, _ = load_safetensors_folder(tmp_path / "weights")
    assert config.model.ngram_order == 3 and model.counts.contexts2.numel() > 0 and model.counts.unigram.sum() > 0

    # SFT re-counts on its own conversations: the counts it carries are the tuned-on text's.
    records = [{"prompt": f"Name number {i}.", "response": f"Number {i} it is."} for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tuned = llmctl("sft", "--from", str(run_dir), "--preset", "tiny", "--run-name", "chat",
                   "--set", f'sft.datasets=["jsonl:{tmp_path / "chat.jsonl"}"]', "--set", "sft.max_steps=4",
                   "--set", "sft.batch_size=4", "--set", "sft.micro_batch_size=4", "--set", "sft.eval_every=2",
                   "--set", "sft.samples=1", "--set", "sft.sample_tokens=4", "--set", "run.device=cpu",
                   "--set", "run.dtype=float32")
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert "re-counted on the training conversations" in (tmp_path / "experiments" / "runs" / "chat" /
                                                          "training.log").read_text()
