"""Counted n-grams mixed into the predictions (`model.ngram_order`, `model.cache_weight`): the
n-gram model is interpolated absolute discounting to the letter, the window cache counts the
continuations of the last two tokens (else the last one), the mixture is one distribution in
evaluation and cached generation, composed by `llmctl.inference` outside the network (which
computes the same in train and eval mode), and the counts survive a checkpoint, old layout
included. Also `pretrain.seq_len`: training on sequences shorter than the model's window."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import PYTHON
from llmctl.config import ModelConfig
from llmctl.inference import Generation, Predictor
from llmctl.model import Transformer
from llmctl.ngram import DISCOUNT, NOVEL_SHARE, ZIPF_OFFSET, CountMixture, counts_for, load_counts
from llmctl.window import WindowView
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


def counted_model(seed: int = 0, **overrides) -> tuple[Transformer, CountMixture | None]:
    torch.manual_seed(seed)
    settings = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, copy_pointer=True,
                    ngram_order=3, ngram_weight=0.3, cache_weight=0.2)
    cfg = ModelConfig(**{**settings, **overrides})
    model, counts = Transformer(cfg), counts_for(cfg)
    if counts is not None:
        counts.fit(np.random.default_rng(seed).integers(0, 8, 2000))
    return model.eval(), counts


def test_the_mixture_is_one_distribution_and_the_loss_is_its_log_probability():
    model, counts = counted_model()
    idx = torch.randint(0, 8, (2, 16))
    targets = torch.randint(0, V, (2, 16))
    targets[1, 4] = -100
    with torch.no_grad():  # (B, T, V): each position's mixture, from a generation fed the prefix
        log_probs = torch.stack([Generation(model, counts).feed(idx[:, : t + 1]) for t in range(16)], 1).double()
        network_sum, mixture_sum = Predictor(model, counts).score(idx, targets)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2, 16, dtype=torch.float64), atol=1e-5)
    expected = -log_probs.gather(2, targets.clamp(min=0)[..., None])[..., 0].masked_fill(targets == -100, 0.0)
    assert float(mixture_sum) == pytest.approx(float(expected.sum()), rel=1e-5)
    with torch.no_grad():
        assert float(network_sum) == pytest.approx(float(model(idx, targets, reduction="sum")), rel=1e-6)
    assert abs(float(mixture_sum) - float(network_sum)) > 1e-3  # the counts change the score...


def test_the_network_is_the_same_in_train_and_eval_mode_and_the_counts_live_outside_it():
    model, counts = counted_model()
    plain, _ = counted_model(ngram_order=0, ngram_weight=0.0, cache_weight=0.0)  # same seed: same network
    idx, targets = torch.randint(0, 8, (2, 16)), torch.randint(0, 8, (2, 16))
    with torch.no_grad():
        evaluated = model.eval()(idx), model(idx, targets)
        trained = model.train()(idx), model(idx, targets)
    assert torch.equal(evaluated[0], trained[0]) and torch.equal(evaluated[1], trained[1])  # dropout 0
    assert torch.equal(trained[1], plain.train()(idx, targets))  # the config's counts are not in the model
    assert not any(name.startswith("counts") for name in model.state_dict())


def test_cached_generation_gives_the_uncached_mixture_and_slides_past_the_window():
    model, counts = counted_model()
    seq = torch.randint(0, 6, (1, 40))
    state = Generation(model, counts)
    L = model.cfg.max_seq_len
    with torch.no_grad():
        steps = [state.feed(seq[:, :5])]
        steps += [state.feed(seq[:, t: t + 1]) for t in range(5, seq.size(1))]
        for i, logits in enumerate(steps[: L - 4]):  # while the ring fills: exactly the full forward
            full = Generation(model, counts).feed(seq[:, : 5 + i])
            assert torch.allclose(logits, full, atol=1e-4), i
        # Once it slides, the counts read what a window of the last L tokens holds (the
        # network's cached keys, computed with longer contexts, may differ slightly).
        t = seq.size(1) - 1
        uniform = torch.zeros(1, 1, V)
        from_ring = counts.mix_log_probs(uniform, state.ring.view(torch.tensor([t])))
        from_window = counts.mix_log_probs(uniform, WindowView.of_sequence(seq[:, t + 1 - L: t + 1], 1, L))
        assert torch.allclose(from_ring, from_window, atol=1e-6)
    assert all(torch.isfinite(step).all() for step in steps)


def test_the_counts_load_from_their_own_entry_and_from_the_older_layout_inside_the_model_state():
    model, counts = counted_model()
    idx, targets = torch.randint(0, 8, (1, 16)), torch.randint(0, 8, (1, 16))
    expected = Predictor(model, counts).score(idx, targets)
    saved = {k: v.clone() for k, v in counts.state_dict().items()}
    older = {**model.state_dict(), **{f"counts.{k}": v for k, v in saved.items()}}  # before the counts left the model
    for model_state, entry in ((dict(model.state_dict()), saved), (older, None)):
        loaded = load_counts(model.cfg, model_state, entry)  # empty tables: sizes come from the state
        fresh = Transformer(model.cfg).eval()
        fresh.load_state_dict(model_state)  # strict: the counts' keys were taken out
        got = Predictor(fresh, loaded).score(idx, targets)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


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
    # Validation is reported two ways: the network's own scores, and with the counts mixed in.
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "val_loss" in line]
    assert evals and all({"val_mixture_loss", "val_mixture_perplexity", "val_mixture_bits_per_byte"} <= set(e)
                         for e in evals)
    assert "with counts: val_loss" in log
    runs = llmctl("runs", "--json")
    assert runs.returncode == 0 and json.loads(runs.stdout)["runs"][0]["val_mixture_perplexity"] > 0, runs.stderr[-2000:]

    scored = llmctl("eval", "-c", str(run_dir), "--data", f"text:{shakespeare}", "--json")
    assert scored.returncode == 0, scored.stderr[-2000:]
    report = json.loads(scored.stdout)
    (row,) = report["datasets"].values()
    assert report["context"] == 32 and 0 < row["bits_per_byte"] < 8 and 0 < row["mixture"]["bits_per_byte"] < 8
    # The network's score is what the same weights score with no counts at all.
    from llmctl.evaluate import evaluate_model
    from llmctl.loading import load_model

    loaded = load_model(run_dir, device="cpu")
    assert loaded.counts is not None
    loaded.counts = None
    alone = evaluate_model(loaded, [f"text:{shakespeare}"])["datasets"][f"text:{shakespeare}"]
    assert alone["loss"] == pytest.approx(row["loss"], rel=1e-6) and "mixture" not in alone
    table = subprocess.run([PYTHON, "-m", "llmctl", "eval", "-c", str(run_dir), "--data", f"text:{shakespeare}"],
                           cwd=tmp_path, env={**cli_env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=300)
    assert "network + counts" in table.stdout and f"{row['mixture']['loss']:.4f}" in table.stdout

    # A checkpoint in the older layout (counts inside the model's state) scores the same.
    final = next(run_dir.glob("*_final.pt"))
    payload = torch.load(final, weights_only=True)
    payload["model"].update({f"counts.{k}": v for k, v in payload.pop("counts").items()})
    torch.save(payload, tmp_path / "older.pt")
    older = llmctl("eval", "-c", str(tmp_path / "older.pt"), "--data", f"text:{shakespeare}", "--json")
    assert older.returncode == 0, older.stderr[-2000:]
    assert json.loads(older.stdout)["datasets"] == {k: {**v, "seconds": json.loads(older.stdout)["datasets"][k]
                                                        ["seconds"]} for k, v in report["datasets"].items()}

    generated = llmctl("generate", "-c", str(run_dir), "-p", "ROMEO:", "-m", "40", "--temperature", "0")
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr[-2000:]
    hf = llmctl("export", "-c", str(run_dir), str(tmp_path / "hf"))  # the network alone, with a note
    assert hf.returncode == 0 and "stay behind" in hf.stderr, hf.stderr[-2000:]
    exported = llmctl("export", "-c", str(run_dir), "--format", "safetensors", str(tmp_path / "weights"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    from llmctl.export import load_safetensors_folder

    _, counts, _, config, _ = load_safetensors_folder(tmp_path / "weights")
    assert config.model.ngram_order == 3 and counts.contexts2.numel() > 0 and counts.unigram.sum() > 0

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
