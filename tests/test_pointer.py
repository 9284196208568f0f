"""The copy pointer (`model.copy_pointer`): a proper next-token distribution that can put
probability on tokens of the context, the same in training, evaluation and cached generation,
and a model that trains, evaluates, generates and exports (as llmctl weights) from the CLI."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from conftest import PYTHON
from llmctl.config import ModelConfig
from llmctl.inference import Generation
from llmctl.model import Transformer
from small_runs import small_run_args

CONTEXT = 16


def pointer_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=CONTEXT, copy_pointer=True,
                      **overrides)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper pointer scores and an even sentinel, so the pointer matters
        model.pointer.query.weight.normal_(0, 0.5)
        model.pointer.key.weight.normal_(0, 0.5)
        model.pointer.sentinel.bias.zero_()
    return model


def distribution(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """The network's next-token log-probabilities at every position of idx (B, T) -> (B, T, V),
    each from a fresh generation fed the prefix."""
    return torch.stack([Generation(model).feed(idx[:, : t + 1]) for t in range(idx.size(1))], dim=1)


def test_the_loss_is_the_mixture_distribution_and_it_sums_to_one():
    model = pointer_model()
    idx = torch.randint(0, 8, (2, CONTEXT))  # few distinct ids: many earlier copies to point at
    targets = torch.randint(0, 8, (2, CONTEXT))
    targets[0, 3] = -100
    with torch.no_grad():
        log_probs = torch.log_softmax(distribution(model, idx), dim=-1)  # (B, T, V): the pointer's mixture
        per_token = model(idx, targets, reduction="none").view(2, CONTEXT)
        total = model(idx, targets, reduction="sum")
        mean = model(idx, targets)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2, CONTEXT), atol=1e-5)
    expected = -log_probs.gather(2, targets.clamp(min=0)[..., None])[..., 0].masked_fill(targets == -100, 0.0)
    assert torch.allclose(per_token, expected, atol=1e-5)
    assert per_token[0, 3] == 0.0  # an ignored target carries no loss
    assert total == pytest.approx(float(expected.sum()), rel=1e-5)
    assert mean == pytest.approx(float(expected.sum()) / (2 * CONTEXT - 1), rel=1e-5)


def test_pointing_only_copies_the_tokens_that_followed_earlier_positions():
    """With the sentinel shut and flat scores, p(w) at t is the share of positions j < t whose
    next token x_{j+1} is w: the current input counts (j = t - 1), the future never does."""
    model = pointer_model()
    with torch.no_grad():
        model.pointer.query.weight.zero_()
        model.pointer.sentinel.bias.fill_(-1e4)
    idx = torch.tensor([[7, 3, 9, 3, 5, 3]])
    with torch.no_grad():
        probs = torch.softmax(distribution(model, idx), dim=-1)[0]  # (T, V)
    # t = 4 (input 5): earlier j = 0..3 offer x_1..x_4 = 3, 9, 3, 5
    assert probs[4, 3] == pytest.approx(0.5, abs=1e-5)
    assert probs[4, 9] == pytest.approx(0.25, abs=1e-5) and probs[4, 5] == pytest.approx(0.25, abs=1e-5)
    assert probs[4, 7] == pytest.approx(0.0, abs=1e-6)  # x_0 follows nothing
    assert probs[2, 3] == pytest.approx(0.5, abs=1e-5) and probs[2, 9] == pytest.approx(0.5, abs=1e-5)
    # position 0 has nothing to point at: the vocabulary's distribution alone, whatever the sentinel
    with torch.no_grad():
        vocab_only = torch.softmax(model(idx), dim=-1)[0]  # the vocabulary head alone
    assert torch.allclose(probs[0], vocab_only[0], atol=1e-5)
    assert not torch.allclose(probs[4], vocab_only[4], atol=1e-3)


def test_cached_generation_gives_the_uncached_distribution_and_slides_past_the_context():
    model = pointer_model()
    seq = torch.randint(0, 8, (1, 3 * CONTEXT))
    state = Generation(model)
    with torch.no_grad():
        steps = [state.feed(seq[:, :5])]  # a prefill, then one token at a time
        steps += [state.feed(seq[:, t: t + 1]) for t in range(5, seq.size(1))]
        for i, logits in enumerate(steps[: CONTEXT - 4]):  # while the ring fills: exactly the full forward
            full = Generation(model).feed(seq[:, : 5 + i])
            assert torch.allclose(torch.log_softmax(logits, -1), torch.log_softmax(full, -1), atol=1e-4)
    # Once the ring slides, a query at t points at keys t - L < j < t, each offering x_{j+1}.
    t = seq.size(1) - 1
    view = state.ring.view(torch.tensor([t]))
    offered, known = view.offered()
    visible = view.earlier() & known
    positions = state.ring.slot_pos[visible[0]]
    assert sorted(positions.tolist()) == list(range(t - CONTEXT + 1, t))
    assert offered[0, visible[0]].tolist() == seq[0, positions + 1].tolist()
    assert all(torch.isfinite(step).all() for step in steps)


def test_the_pointer_learns_to_copy_what_the_vocabulary_cannot_predict():
    """Random sequences that repeat their first half: the second half is unpredictable from
    the vocabulary and certain by copying. A few dozen steps teach the pointer that."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=200, d_model=32, n_layers=1, n_heads=4, max_seq_len=32)
    losses = {}
    for pointer in (False, True):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**cfg, copy_pointer=pointer))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(60):
            half = torch.randint(0, 200, (16, 16))
            x = torch.cat([half, half], dim=1)  # (B, 32)
            loss = model(x[:, :-1], x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            half = torch.randint(0, 200, (16, 16))
            x = torch.cat([half, half], dim=1)
            per_token = model(x[:, :-1], x[:, 1:], reduction="none").view(16, 31)
        losses[pointer] = float(per_token[:, 16:].mean())  # the copied half
    assert losses[False] > 0.8 * math.log(200)  # the plain model has not learned to copy yet
    assert losses[True] < 0.5  # the pointer copies


def test_a_pointer_model_trains_evaluates_generates_and_exports_as_llmctl_weights(tmp_path, cli_env, shakespeare,
                                                                                  small_tok):
    def llmctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "llmctl", *args], cwd=tmp_path, env=cli_env, capture_output=True,
                              text=True, timeout=300)

    trained = llmctl(*small_run_args("ptr", shakespeare, small_tok, "--set", "model.copy_pointer=true"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    run_dir = tmp_path / "experiments" / "runs" / "ptr"
    assert "copy_pointer = true" in (run_dir / "config.toml").read_text()
    scored = llmctl("eval", "-c", str(run_dir), "--data", f"text:{shakespeare}", "--json", "--stride", "16")
    assert scored.returncode == 0, scored.stderr[-2000:]
    (row,) = json.loads(scored.stdout)["datasets"].values()
    assert 0 < row["bits_per_byte"] < 8
    generated = llmctl("generate", "-c", str(run_dir), "-p", "ROMEO:", "-m", "40", "--temperature", "0")
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr[-2000:]
    refused = llmctl("export", "-c", str(run_dir), str(tmp_path / "hf"))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "copy_pointer" in refused.stderr and "--format safetensors" in refused.stderr
    assert not (tmp_path / "hf").exists()
    exported = llmctl("export", "-c", str(run_dir), "--format", "safetensors", str(tmp_path / "weights"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    from llmctl.export import load_safetensors_folder

    model, _, _, config, _ = load_safetensors_folder(tmp_path / "weights")
    assert model.pointer is not None and config.model.copy_pointer
