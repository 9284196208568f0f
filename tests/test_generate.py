"""Generation: the KV cache equals the full forward, sampling filters hold, seeds reproduce,
decoding never splits a character, stop strings cut exactly, and the CLI behaves."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import PYTHON
from llmctl.config import ModelConfig, load_config
from llmctl.errors import ConfigError
from llmctl.generate import (IncrementalDecoder, Sampling, StopFilter, complete, filter_logits, generate_text,
                             next_token, token_stream, unescape)
from llmctl.inference import KVCache
from llmctl.model import Transformer, apply_rope, rope_at



def tiny_model(seed: int = 0, **overrides) -> Transformer:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                init_std=0.3)  # large weights: varied outputs, not the echo of a 0.02 init
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**base, **overrides})).eval()
    with torch.no_grad():
        for block in model.blocks:
            if block.attn.sinks is not None:
                block.attn.sinks.normal_()  # sinks that matter, not the zero init
    return model


# --------------------------------------------------------------------------- KV cache

GEOMETRIES = [(4, False), (2, False), (1, False), (4, True), (2, True)]  # (kv heads, sinks)


@pytest.mark.parametrize("kv_heads,sinks", GEOMETRIES)
@torch.no_grad()
def test_cached_logits_equal_full_forward_at_every_position(kv_heads, sinks):
    model = tiny_model(n_kv_heads=kv_heads, use_attention_sinks=sinks)
    idx = torch.randint(0, 97, (2, 16))
    full = model(idx)  # (2, 16, 97)
    cache = KVCache(model.cfg)
    # A prefill of 5, a chunk of 3, then one token at a time: every way the cache is fed.
    pieces = [model(idx[:, :5], cache=cache), model(idx[:, 5:8], cache=cache)]
    pieces += [model(idx[:, t: t + 1], cache=cache) for t in range(8, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.pos == 16


def banded_reference(model: Transformer, idx: torch.Tensor, window: int) -> torch.Tensor:
    """Written from the weights alone: every token attends to itself and the window - 1 tokens
    before it, RoPE at absolute positions, sinks in the softmax. (B, T) -> logits (B, T, V)."""
    B, T = idx.shape
    a0 = model.blocks[0].attn
    H, K, D = a0.n_heads, a0.n_kv_heads, a0.head_dim
    cos, sin = rope_at(0, T, D, model.cfg.rope_theta)
    pos = torch.arange(T)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < window)  # (T, T)
    x = model.tok_emb(idx)
    for block in model.blocks:
        a = block.attn
        h = block.attn_norm(x)
        wq, wk, wv = a.wqkv.weight.split([H * D, K * D, K * D], dim=0)
        q = apply_rope((h @ wq.T).view(B, T, H, D).transpose(1, 2), cos, sin)
        k = apply_rope((h @ wk.T).view(B, T, K, D).transpose(1, 2), cos, sin).repeat_interleave(H // K, 1)
        v = (h @ wv.T).view(B, T, K, D).transpose(1, 2).repeat_interleave(H // K, 1)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
        if a.sinks is not None:
            scores = torch.cat([scores, a.sinks.view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
        probs = scores.softmax(dim=-1)[..., :T]
        x = x + a.wo((probs @ v).transpose(1, 2).reshape(B, T, H * D))
        x = x + block.mlp(block.mlp_norm(x))
    return F.linear(model.norm(x), model.tok_emb.weight)[..., : model.vocab_size]


@pytest.mark.parametrize("kv_heads,sinks", [(2, False), (2, True)])
@torch.no_grad()
def test_cache_slides_past_the_context_as_banded_attention(kv_heads, sinks):
    model = tiny_model(n_kv_heads=kv_heads, use_attention_sinks=sinks)
    L = model.cfg.max_seq_len
    idx = torch.randint(0, 97, (1, 3 * L + 5))
    # The reference is itself right where the plain forward applies.
    torch.testing.assert_close(banded_reference(model, idx[:, :L], L), model(idx[:, :L]), atol=1e-5, rtol=1e-4)
    cache = KVCache(model.cfg)
    pieces = [model(idx[:, :L], cache=cache)]  # the ring fills in one prefill...
    assert cache.room() == 1
    pieces += [model(idx[:, t: t + 1], cache=cache) for t in range(L, idx.size(1))]  # ...then slides
    torch.testing.assert_close(torch.cat(pieces, dim=1), banded_reference(model, idx, L), atol=1e-4, rtol=1e-4)


def test_cache_refuses_a_chunk_larger_than_its_room():
    model = tiny_model()
    cache = KVCache(model.cfg)
    with torch.no_grad():
        model(torch.zeros(1, 12, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="1..4"):
            model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("kv_heads,sinks", [(2, False), (4, True)])
def test_greedy_with_cache_equals_greedy_without(kv_heads, sinks):
    model = tiny_model(seed=1, n_kv_heads=kv_heads, use_attention_sinks=sinks)
    greedy = Sampling(max_new_tokens=12, temperature=0)
    run = lambda use_cache: list(token_stream(model, [5, 17, 3, 42], greedy, torch.Generator(),  # noqa: E731
                                              context_length=16, use_cache=use_cache))
    cached, plain = run(True), run(False)
    assert len(cached) == 12 and cached == plain
    assert len(set(cached)) > 1  # not a degenerate constant stream that would match by accident


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens_with_or_without_cache():
    model = tiny_model(seed=2)
    prompt = torch.randint(0, 97, (40,)).tolist()  # 2.5 contexts
    greedy = Sampling(max_new_tokens=20, temperature=0)
    cached = list(token_stream(model, prompt, greedy, torch.Generator(), context_length=16))
    with torch.no_grad():
        assert cached[0] == model(torch.tensor([prompt[-16:]]))[0, -1].argmax().item()
    # The first new token sees the same 16 tokens either way; later ones differ only in how
    # the window slides (cache: keys computed once; no cache: recomputed on the last 16).
    assert cached[0] == list(token_stream(model, prompt, greedy, torch.Generator(), context_length=16,
                                          use_cache=False))[0]


def test_generation_stops_at_eos():
    model = tiny_model(seed=3)
    greedy = Sampling(max_new_tokens=10, temperature=0)
    free = list(token_stream(model, [1, 2, 3], greedy, torch.Generator(), context_length=16))
    eos = free[4]
    first = free.index(eos)
    assert list(token_stream(model, [1, 2, 3], greedy, torch.Generator(), context_length=16, eos_id=eos)) == free[:first]


def test_eos_is_never_drawn_while_eos_allowed_says_no():
    """How a chat reply is kept from being empty: no end-of-text until the caller allows it."""
    model = tiny_model(seed=3)
    greedy = Sampling(max_new_tokens=6, temperature=0)
    free = list(token_stream(model, [1, 2, 3], greedy, torch.Generator(), context_length=16))
    eos = free[0]  # the greedy first token, as if the model would end its reply at once
    calls = []
    held = list(token_stream(model, [1, 2, 3], greedy, torch.Generator(), context_length=16, eos_id=eos,
                             eos_allowed=lambda: calls.append(1) is None and len(calls) > 2))
    assert held and held[0] != eos and eos not in held[:2]  # refused for two tokens, then allowed


# --------------------------------------------------------------------------- sampling

def test_same_seed_same_sample_and_another_seed_differs():
    model = tiny_model(seed=4)
    hot = Sampling(max_new_tokens=30, temperature=1.0, top_p=1.0)

    def draw(seed: int) -> list[int]:
        return list(token_stream(model, [7, 8], hot, torch.Generator().manual_seed(seed), context_length=16))

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)


def allowed_ids(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """The set the filters must keep, computed the slow, obvious way (one row)."""
    values = logits.tolist()
    order = sorted(range(len(values)), key=lambda i: -values[i])
    if top_k:
        order = order[:top_k]
    weights = [math.exp(values[i] - values[order[0]]) for i in order]
    total, kept, mass = sum(weights), [], 0.0
    for i, w in zip(order, weights):
        if mass >= top_p * total - 1e-9:
            break
        kept.append(i)
        mass += w
    return set(kept)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (0, 0.9), (20, 0.7), (1, 1.0)])
def test_top_k_and_top_p_never_emit_a_token_outside_the_allowed_set(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(1, 200) * 3
    allowed = allowed_ids(logits[0], top_k, top_p)
    kept = set(torch.isfinite(filter_logits(logits, top_k, top_p))[0].nonzero().flatten().tolist())
    assert kept == allowed and 0 < len(allowed) < 200
    sampling = Sampling(temperature=1.0, top_k=top_k, top_p=top_p)
    generator = torch.Generator().manual_seed(0)
    drawn = {int(next_token(logits, sampling, generator)) for _ in range(2000)}
    assert drawn <= allowed
    if len(allowed) <= 5:
        assert drawn == allowed  # each allowed token is reachable


@pytest.mark.parametrize("scale", [0.3, 8.0])  # flat: the full sort; peaked: the top-256 shortcut
def test_top_p_on_a_large_vocabulary_keeps_exactly_the_nucleus(scale):
    logits = torch.randn(2, 3000, generator=torch.Generator().manual_seed(1)) * scale
    kept = torch.isfinite(filter_logits(logits, 0, 0.9))
    for row in range(2):
        assert set(kept[row].nonzero().flatten().tolist()) == allowed_ids(logits[row], 0, 0.9)
    assert (kept.sum(dim=-1) > 256).all() == (scale < 1)


def test_temperature_zero_is_argmax_and_repetition_penalty_demotes_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    greedy = Sampling(temperature=0)
    assert int(next_token(logits, greedy, torch.Generator())) == 0
    penalised = Sampling(temperature=0, repetition_penalty=1.5)
    # Token 0 was seen: 2.0 / 1.5 < 1.9, so the runner-up wins.
    assert int(next_token(logits, penalised, torch.Generator(), history=torch.tensor([[0, 2]]))) == 1


@pytest.mark.parametrize("options,match", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -0.1}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"repetition_penalty": 0.0}, "repetition"),
    ({"stop": ("",)}, "stop"),
])
def test_bad_sampling_values_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        Sampling(**options)


# --------------------------------------------------------------------------- text

@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    from llmctl.data.tokenizer import load_tokenizer

    return load_tokenizer(str(gpt2_dir))


def test_incremental_decoding_never_splits_a_character(gpt2):
    text = " héllo wörld — 日本語のテキスト 🙂🚀 naïve café"
    ids = gpt2.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    decoder = IncrementalDecoder(gpt2, gpt2.encode("Prompt:"))
    deltas = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert any(d == "" for d in deltas[:-1])  # some tokens were held back until their character completed


def test_stop_filter_cuts_at_the_stop_string_and_never_releases_part_of_it():
    f = StopFilter(("\n\n", "THE END"))
    assert f.feed("Hel") == "Hel"
    assert f.feed("lo\n") == "lo"  # "\n" might start "\n\n": held back
    assert f.feed("there") == "\nthere"  # it did not
    assert f.feed(" THE E") == " "
    assert f.feed("NDING") == ""
    assert f.stopped and f.text == "Hello\nthere "
    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb\\n") == "a\tb\\n" and unescape("é") == "é"


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory, gpt2):
    """A real llmctl checkpoint file of an untrained tiny model (sampling needs no training)."""
    from llmctl.checkpoint import save_checkpoint
    from llmctl.pretrain import resolve_vocab

    cfg = resolve_vocab(load_config("tiny", ["model.d_model=32", "model.max_seq_len=32"], "gen"), gpt2.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "gen-pretrain_final.pt"
    save_checkpoint(path, {"stage": "pretrain", "config": cfg.to_dict(), "tokenizer": gpt2.to_state(),
                           "model": model.state_dict(), "step": 0})
    return path


@pytest.fixture(scope="module")
def loaded(random_checkpoint):
    from llmctl.loading import load_model

    return load_model(random_checkpoint, device="cpu")


def test_complete_streams_exactly_its_text_and_matches_the_tokens(loaded, gpt2):
    streamed: list[str] = []
    result = complete(loaded, "Once upon a time", on_text=streamed.append, max_new_tokens=40, temperature=1.0,
                      top_p=1.0, seed=3)
    assert result.tokens == 40 and result.finish_reason == "length" and result.seed == 3
    assert len(streamed) > 5 and "".join(streamed) == result.text
    assert result.text == gpt2.decode(result.token_ids)
    assert result.prompt_tokens == len(gpt2.encode("Once upon a time"))


def test_stop_strings_end_the_text_before_them(loaded):
    free = generate_text(loaded, "The", max_new_tokens=30, temperature=0)
    stop = free[len(free) // 2: len(free) // 2 + 3]
    expected = free[: free.find(stop)]
    result = complete(loaded, "The", max_new_tokens=30, temperature=0, stop=[stop, "never-there"])
    assert result.text == expected and result.finish_reason == "stop" and stop not in result.text


def test_generate_text_accepts_a_path_and_checks_its_inputs(random_checkpoint):
    import llmctl

    text = llmctl.generate_text(random_checkpoint, "Hi", max_new_tokens=5, temperature=0, device="cpu")
    assert isinstance(text, str) and text == generate_text(str(random_checkpoint), "Hi", max_new_tokens=5,
                                                           temperature=0, device="cpu")
    with pytest.raises(ConfigError, match="prompt is empty"):
        llmctl.generate_text(random_checkpoint, "", max_new_tokens=5)
    with pytest.raises(ConfigError, match="unknown sampling"):
        llmctl.generate_text(random_checkpoint, "Hi", temprature=0.5)


# --------------------------------------------------------------------------- the CLI

def llmctl_cli(*args: str, cwd, env) -> subprocess.CompletedProcess:
    env = dict(env, OMP_NUM_THREADS="1")  # steady on a busy 2-core machine; results do not depend on it
    return subprocess.run([PYTHON, "-m", "llmctl", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_generate_greedy_is_deterministic_seeds_reproduce_and_stop_strings_cut(random_checkpoint, tmp_path, cli_env):
    ckpt = str(random_checkpoint)
    greedy = ["generate", "-c", ckpt, "--prompt", "ROMEO:", "--max-new-tokens", "24", "--temperature", "0"]
    a, b = llmctl_cli(*greedy, cwd=tmp_path, env=cli_env), llmctl_cli(*greedy, cwd=tmp_path, env=cli_env)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout and "ROMEO:" not in a.stdout  # only the new text on stdout
    summary = a.stderr.strip().splitlines()
    assert len(summary) == 1 and "24 tokens" in summary[0] and "tokens/s" in summary[0]

    sample = ["generate", "-c", ckpt, "--prompt", "ROMEO:", "--max-new-tokens", "24", "--temperature", "1",
              "--top-k", "50"]
    s1 = llmctl_cli(*sample, "--seed", "5", cwd=tmp_path, env=cli_env)
    s2 = llmctl_cli(*sample, "--seed", "5", cwd=tmp_path, env=cli_env)
    assert s1.returncode == 0, s1.stderr
    assert s1.stdout == s2.stdout != a.stdout and "seed 5" in s1.stderr

    text = a.stdout
    stop = next(text[i: i + 3] for i in range(len(text) // 2, len(text)) if "\\" not in text[i: i + 3])
    cut = llmctl_cli(*greedy, "--stop", stop, cwd=tmp_path, env=cli_env)
    assert cut.returncode == 0 and cut.stdout == text[: text.find(stop)] and "finished: stop" in cut.stderr


def test_cli_generate_past_the_context_slides_the_window_and_says_so(random_checkpoint, tmp_path, cli_env):
    """max_seq_len is 32: 80 new tokens are all written (the KV cache slides; without it the last
    32 tokens are re-run), and the summary says the window slid; 20 new tokens say nothing of it."""
    ckpt = str(random_checkpoint)
    for extra in ([], ["--no-cache"]):
        long = llmctl_cli("generate", "-c", ckpt, "--prompt", "ROMEO:", "-m", "80", "-t", "1", "--top-p", "1",
                          "--seed", "1", *extra, cwd=tmp_path, env=cli_env)
        assert long.returncode == 0, long.stderr
        summary = long.stderr.strip().splitlines()
        assert len(summary) == 1 and "80 tokens" in summary[0] and "finished: length" in summary[0], long.stderr
        assert "past the 32-token context the window slid (each token saw the last 32)" in summary[0]
    short = llmctl_cli("generate", "-c", ckpt, "--prompt", "ROMEO:", "-m", "20", "-t", "0", cwd=tmp_path, env=cli_env)
    assert short.returncode == 0 and "20 tokens" in short.stderr and "slid" not in short.stderr, short.stderr


@pytest.mark.parametrize("args,message", [
    (["--top-p", "1.5"], "top_p"),
    (["--top-p", "0"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--prompt", ""], "prompt is empty"),
    (["-c", "no/such/run.pt"], "checkpoint not found"),
])
def test_cli_generate_bad_options_are_one_line(random_checkpoint, tmp_path, cli_env, args, message):
    base = ["generate"] + ([] if "-c" in args else ["-c", str(random_checkpoint)])
    base += [] if "--prompt" in args else ["--prompt", "Hi"]
    result = llmctl_cli(*base, *args, cwd=tmp_path, env=cli_env)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
