"""benchmarks/nanogpt_reference.py: the nanoGPT-recipe baseline trains, learns, and is scored like llmctl eval."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import torch

from conftest import REPO


def _load_reference():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("nanogpt_reference", REPO / "benchmarks" / "nanogpt_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


ref = _load_reference()


def test_byte_tokenizer_stream_counts_every_byte_and_separates_documents(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("héllo\n\nworld\n", encoding="utf-8")
    stream = ref.token_stream(text, ref.ByteTokenizer())
    assert stream.max() <= ref.ByteTokenizer.eos_id
    assert stream[-1] == ref.ByteTokenizer.eos_id
    # blank-line-separated documents, as llmctl reads text files: 6 + 5 bytes (é is two) + 2 EOS
    assert stream.tolist() == [*"héllo".encode("utf-8"), 256, *b"world", 256]


def test_summed_loss_is_the_mean_times_the_targets():
    recipe = ref.Recipe("bytes", n_layer=1, n_head=2, n_embd=16, block=8, batch=2, dropout=0.0)
    model = ref.GPT(recipe, 257).eval()
    x, y = torch.randint(0, 257, (2, 8)), torch.randint(0, 257, (2, 8))
    assert torch.allclose(model(x, y, reduction="sum"), model(x, y) * 16, rtol=1e-5)


def test_reference_recipe_learns_a_repetitive_text_in_seconds():
    torch.set_num_threads(1)
    data = np.tile(np.frombuffer(b"the cat sat on the mat. ", dtype=np.uint8).astype(np.int64), 400)
    recipe = ref.Recipe("bytes", n_layer=1, n_head=2, n_embd=32, block=16, batch=8, dropout=0.0, lr=3e-3, warmup=5)
    model, info = ref.train(recipe, 257, data, budget_s=4.0)
    assert info["steps"] > 20 and info["planned_steps"] >= info["steps"]
    assert info["best_val_loss"] < math.log(257) / 2  # far below a uniform guess over 257 ids


def test_heldout_breakdown_scores_every_token_as_llmctl_eval_does():
    """heldout_breakdown.token_losses: one loss per target, averaging to evaluate_tokens' loss
    on the same stream and context (disjoint windows), so its shares add up to `llmctl eval`."""
    from llmctl.config import ModelConfig
    from llmctl.evaluate import evaluate_tokens
    from llmctl.model import Transformer

    spec = importlib.util.spec_from_file_location("heldout_breakdown", REPO / "benchmarks" / "heldout_breakdown.py")
    breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(breakdown)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)).eval()
    ids = torch.randint(0, 50, (75,)).tolist()  # 74 targets: four full windows and one of 10
    losses = breakdown.token_losses(model, ids, 16)
    assert losses.shape == (74,) and np.isfinite(losses).all()
    reference = evaluate_tokens(model, np.array(ids), 16, batch_size=2, device=torch.device("cpu"))
    assert reference["tokens"] == 74
    assert math.isclose(float(losses.mean()), reference["loss"], rel_tol=1e-5)
