"""Model invariants: shapes, initial loss, causality, GQA, sinks, gradient checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.config import ModelConfig
from llmctl.model import Transformer, padded_vocab_size


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    return ModelConfig(**{**base, **overrides})


def test_shapes_and_vocab_padding():
    model = Transformer(tiny_cfg())
    idx = torch.randint(0, 100, (3, 10))
    assert model(idx).shape == (3, 10, 100)  # padded rows are sliced away
    assert model.tok_emb.weight.shape[0] == padded_vocab_size(100, 64) == 128


def test_tied_embeddings():
    model = Transformer(tiny_cfg())
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n for n in names)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("vocab", [100, 50257])
def test_initial_loss_is_log_vocab(vocab):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(vocab_size=vocab))
    idx, targets = torch.randint(0, vocab, (2, 4, 16))
    loss = model(idx, targets).item()
    assert abs(loss - math.log(vocab)) < 0.1


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_causal(sinks, kv_heads):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(n_kv_heads=kv_heads, use_attention_sinks=sinks)).eval()
    idx = torch.randint(0, 100, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 100
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_gqa_has_fewer_parameters():
    full = Transformer(tiny_cfg(n_kv_heads=4)).num_parameters()
    grouped = Transformer(tiny_cfg(n_kv_heads=1)).num_parameters()
    assert grouped < full


def test_sink_path_matches_flash_path_when_sinks_are_silenced():
    """With a very negative sink logit the explicit path must reduce to plain causal attention."""
    torch.manual_seed(0)
    plain = Transformer(tiny_cfg()).eval()
    sinks = Transformer(tiny_cfg(use_attention_sinks=True)).eval()
    missing, unexpected = sinks.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all("sinks" in m for m in missing)
    with torch.no_grad():
        for block in sinks.blocks:
            block.attn.sinks.fill_(-1e4)
    idx = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(sinks(idx), plain(idx), atol=1e-5, rtol=1e-4)


def test_sinks_change_output_and_learn():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(use_attention_sinks=True))
    idx = torch.randint(0, 100, (2, 16))
    model(idx, idx).backward()
    assert all(b.attn.sinks.grad is not None and b.attn.sinks.grad.abs().sum() > 0 for b in model.blocks)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = Transformer(tiny_cfg())
    b = Transformer(tiny_cfg(gradient_checkpointing=True))
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 100, (2, 16))
    a(idx, idx).backward()
    b(idx, idx).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_too_long_sequence_is_refused():
    model = Transformer(tiny_cfg())
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_state_dict_gives_transformers_llama_the_same_logits(kv_heads):
    """The fused q/k/v and gate/up tensors split back into LlamaForCausalLM's one for one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmctl.export import llama_state_dict

    torch.manual_seed(0)
    cfg = tiny_cfg(n_kv_heads=kv_heads)
    ours = Transformer(cfg).eval()
    for p in ours.parameters():  # norms away from 1 so a swapped tensor would show
        torch.nn.init.normal_(p, std=0.1) if p.dim() == 1 else None
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=ours.blocks[0].mlp.hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})).eval()
    missing, unexpected = llama.load_state_dict(llama_state_dict(ours), strict=False)
    assert unexpected == [] and missing == []
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=idx).logits, ours(idx), atol=1e-5, rtol=1e-4)


def test_dropout_acts_only_in_training_and_zero_changes_nothing():
    torch.manual_seed(0)
    plain = Transformer(tiny_cfg())
    dropped = Transformer(tiny_cfg(dropout=0.2))
    dropped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 100, (2, 16))
    plain.train()
    dropped.train()
    assert not torch.equal(dropped(idx), dropped(idx))  # a fresh mask each call
    torch.manual_seed(1)
    a = dropped(idx)
    torch.manual_seed(1)
    torch.testing.assert_close(dropped(idx), a)  # seeded: reproducible (resume restores the RNG)
    dropped.eval()
    torch.testing.assert_close(dropped(idx), plain.eval()(idx))  # no dropout at inference
    for sinks in (False, True):
        m = Transformer(tiny_cfg(dropout=0.3, use_attention_sinks=sinks)).train()
        m(idx, idx).backward()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_explicit_bf16_attention_matches_sdpa(kv_heads, monkeypatch):
    """On a CPU in bf16, short sequences take the explicit GEMM-softmax-GEMM path; its outputs
    and gradients match SDPA's within bf16 rounding."""
    import llmctl.model as model_module

    torch.manual_seed(0)
    model = Transformer(tiny_cfg(n_kv_heads=kv_heads))
    idx = torch.randint(0, 100, (2, 16))

    def run(explicit: bool):
        monkeypatch.setattr(model_module, "_explicit_attention_wins", lambda q: explicit)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(idx).float()
            loss = model(idx, idx)
        loss.backward()
        return logits, loss.detach(), model.blocks[0].attn.wqkv.weight.grad.clone()

    assert model_module._explicit_attention_wins(torch.zeros(1, 1, 16, 8, dtype=torch.bfloat16))
    assert not model_module._explicit_attention_wins(torch.zeros(1, 1, 16, 8))  # fp32: SDPA
    a, b = run(True), run(False)
    torch.testing.assert_close(a[0], b[0], atol=0.05, rtol=0.05)
    torch.testing.assert_close(a[1], b[1], atol=0.01, rtol=0.01)
    torch.testing.assert_close(a[2], b[2], atol=0.02, rtol=0.1)


def test_cpu_dropout_drops_at_the_rate_keeps_the_expectation_and_masks_gradients():
    from llmctl.dropout import dropout

    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 26 / 256) < 0.003  # 0.1 rounded to a multiple of 1/256
    assert abs(y.mean().item() - 1.0) < 0.01  # kept elements are scaled up: same expectation
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient flows exactly where values did
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x
    a, b = dropout(torch.ones(1000), 0.5, True), dropout(torch.ones(1000), 0.5, True)
    assert not torch.equal(a, b)  # a fresh mask per call


@pytest.mark.parametrize("sinks", [False, True])
def test_block_attention_reads_only_its_own_block_in_training_and_in_cached_generation(sinks):
    """model.attention_block = 4 with a 16-token context: position t attends to the positions of
    its block (t // 4) up to t, whether the window runs at once or token by token from a cache,
    and once the cache slides, as a window starting at the block would."""
    from llmctl.inference import KVCache

    torch.manual_seed(0)
    model = Transformer(tiny_cfg(attention_block=4, use_attention_sinks=sinks)).eval()
    if sinks:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.sinks.normal_()
    seq = torch.randint(0, 100, (1, 40))
    changed = seq.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 100  # a token in the second block
    with torch.no_grad():
        a, b = model(seq[:, :14]), model(changed[:, :14])
        assert torch.equal(a[0, :5], b[0, :5]) and torch.equal(a[0, 8:], b[0, 8:])  # other blocks never see it
        assert not torch.allclose(a[0, 5:8], b[0, 5:8])  # its own block does
        cache = KVCache(model.cfg)
        steps = [model(seq[:, :3], cache=cache, last_only=True)[:, -1]]
        steps += [model(seq[:, t: t + 1], cache=cache, last_only=True)[:, -1] for t in range(3, 40)]
        for i, logits in enumerate(steps[:14]):  # while the ring fills: the full forward's last position
            assert torch.allclose(logits, model(seq[:, : 3 + i])[:, -1], atol=1e-5)
        # t = 38 (past the 16-slot ring) sees positions 36..38 only
        assert torch.allclose(steps[38 - 2], model(seq[:, 36:39])[:, -1], atol=1e-5)


def test_block_attention_that_does_not_divide_the_context_is_refused():
    from llmctl.config import load_config
    from llmctl.errors import ConfigError

    with pytest.raises(ConfigError, match="model.attention_block must be 0"):
        load_config(None, ["model.max_seq_len=16", "model.attention_block=5"])
