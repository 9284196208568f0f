"""`llmctl export --format gguf`: the file reads back with gguf's own reader (names, shapes,
metadata, tokenizer), llama.cpp (through llama-cpp-python, where installed) continues a prompt
with llmctl's greedy tokens and log-probabilities, and what llama cannot express is refused.

One real `llmctl pretrain` run of the 1-layer, 32-wide model of small_runs.py (GQA: 4 heads,
2 KV heads; every matrix has rows of a multiple of 32, so q8_0 quantizes all of them) with a
320-token byte-level BPE, and SFT and attention-sink checkpoints derived from it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import PYTHON
from llmctl.cli import app
from llmctl.errors import ConfigError
from llmctl.loading import load_model
from small_runs import small_run_args
from test_export import derived_checkpoint

gguf = pytest.importorskip("gguf", reason='the gguf package is not installed (pip install "llmctl[gguf]")')

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama_cpp is not installed "
                                     "(pip install llama-cpp-python); the llama.cpp comparisons need it")


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def sources(work, shakespeare, small_tok) -> dict[str, Path]:
    env = dict(os.environ, LLMCTL_CACHE=str(work / "cache"), OMP_NUM_THREADS="1")
    env.pop("LLMCTL_DEBUG", None)
    result = subprocess.run([PYTHON, "-m", "llmctl", *small_run_args("g", shakespeare, small_tok)],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    final = next((work / "experiments" / "runs" / "g").glob("*_final.pt"))
    return {"base": final, "sft": derived_checkpoint(final, work / "sft.pt", template=True),
            "sinks": derived_checkpoint(final, work / "sinks.pt", sinks=True)}


@pytest.fixture(scope="module")
def exported(work, sources) -> dict[str, tuple[Path, dict]]:
    """f32 and q8_0 of the base checkpoint and f16 of the SFT one, through the CLI (--json)."""
    files = {}
    for name, source, dtype in (("f32", "base", "f32"), ("q8_0", "base", "q8_0"), ("sft", "sft", "f16")):
        out = work / "out" / f"{name}.gguf"
        result = cli("export", "-c", str(sources[source]), "--format", "gguf", "--dtype", dtype, "--json", str(out))
        assert result.exit_code == 0, result.output
        files[name] = (out, json.loads(result.stdout))
    return files


def field(reader, key):
    return reader.fields[key].contents()


def test_the_file_reads_back_with_llama_metadata_tensors_and_the_tokenizer(exported, sources):
    path, summary = exported["f32"]
    assert summary["format"] == "gguf" and summary["architecture"] == "llama" and summary["stored_as_f16"] == []
    loaded = load_model(sources["base"], device="cpu")
    cfg = loaded.config.model
    reader = gguf.GGUFReader(str(path))
    assert field(reader, "general.architecture") == "llama"
    expected = {"llama.context_length": 32, "llama.embedding_length": 32, "llama.block_count": 1,
                "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 8, "llama.vocab_size": 320,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                "tokenizer.ggml.bos_token_id": loaded.tokenizer.eos_id,
                "tokenizer.ggml.eos_token_id": loaded.tokenizer.eos_id, "tokenizer.ggml.add_bos_token": False}
    assert {k: field(reader, k) for k in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert "tokenizer.chat_template" not in reader.fields

    vocab = loaded.tokenizer.backend.get_vocab(with_added_tokens=True)
    assert field(reader, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[loaded.tokenizer.eos_id] == gguf.TokenType.CONTROL and set(types) == {1, 3}
    merges = json.loads(loaded.tokenizer.to_json())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]

    tensors = {t.name: t for t in reader.tensors}
    layer = {"attn_q": (32, 32), "attn_k": (16, 32), "attn_v": (16, 32), "attn_output": (32, 32),
             "ffn_gate": (128, 32), "ffn_up": (128, 32), "ffn_down": (32, 128), "attn_norm": (32,), "ffn_norm": (32,)}
    shapes = {"token_embd.weight": (320, 32), "output_norm.weight": (32,),
              **{f"blk.0.{k}.weight": v for k, v in layer.items()}}
    assert set(tensors) == set(shapes)  # no output.weight: llama.cpp ties it to token_embd
    for name, shape in shapes.items():  # GGUF lists dimensions innermost first
        assert tuple(int(d) for d in tensors[name].shape[::-1]) == shape, name
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
    embedding = loaded.model.tok_emb.weight.detach()[:320].numpy()
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data).reshape(320, 32), embedding)


def test_q8_0_quantizes_every_matrix_and_keeps_norms_in_f32(exported):
    path, summary = exported["q8_0"]
    assert summary["stored_as_f16"] == []
    reader = gguf.GGUFReader(str(path))
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for t in reader.tensors:
        want = gguf.GGMLQuantizationType.F32 if t.name.endswith("norm.weight") else gguf.GGMLQuantizationType.Q8_0
        assert t.tensor_type == want, t.name
    assert path.stat().st_size < exported["f32"][0].stat().st_size / 2


def test_the_sft_export_carries_the_chat_template_export_hf_writes(exported, sources):
    from llmctl.data.chat_template import ChatTemplate
    from llmctl.export import eos_token

    path, summary = exported["sft"]
    assert summary["chat_template"] is True
    tokenizer = load_model(sources["sft"], device="cpu").tokenizer
    reader = gguf.GGUFReader(str(path))
    assert field(reader, "tokenizer.chat_template") == ChatTemplate().to_jinja(eos_token(tokenizer))
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32}
    if HAS_LLAMA_CPP:  # rendered as llama-cpp-python renders a GGUF's template
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(field(reader, "tokenizer.chat_template"), eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", add_generation_prompt=True)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]
        assert formatter(messages=messages).prompt == ("Be brief.\n\n### Human: Hi there\n### Assistant: Hello."
                                                       "<|endoftext|>\n### Human: Bye?\n### Assistant:")


def test_q_and_k_rows_are_permuted_for_llama_cpp_adjacent_pair_rope():
    """Rotate-half RoPE on the original rows gives the same q·k as adjacent-pair RoPE (llama.cpp's
    llama) on the permuted rows: the permutation is right without llama.cpp installed."""
    from llmctl.gguf_export import permute_rope
    from llmctl.model import apply_rope, rope_tables

    H, D, C, T = 2, 8, 16, 5
    generator = torch.Generator().manual_seed(0)
    wq, wk, x = (torch.randn(H * D, C, generator=generator), torch.randn(H * D, C, generator=generator),
                 torch.randn(T, C, generator=generator))
    cos, sin = rope_tables(D, T, 10000.0)

    def heads(w):
        return (x @ w.T).view(T, H, D).transpose(0, 1)  # (H, T, D)

    def rope_adjacent(t):  # pairs (2i, 2i+1) rotated by angle i, as ggml_rope with mode 0
        angles = cos[:, : D // 2], sin[:, : D // 2]
        even, odd = t[..., 0::2], t[..., 1::2]
        return torch.stack([even * angles[0] - odd * angles[1], even * angles[1] + odd * angles[0]], -1).flatten(-2)

    ours = apply_rope(heads(wq), cos, sin) @ apply_rope(heads(wk), cos, sin).transpose(-1, -2)
    theirs = rope_adjacent(heads(permute_rope(wq, H))) @ rope_adjacent(heads(permute_rope(wk, H))).transpose(-1, -2)
    torch.testing.assert_close(theirs, ours)


@needs_llama_cpp
@pytest.mark.parametrize("name", ["f32", "q8_0"])
def test_llama_cpp_continues_greedily_with_llmctls_tokens(name, exported, sources):
    import llama_cpp

    from llmctl.gguf_export import KL_TOLERANCE, TOLERANCE, llmctl_greedy

    path, summary = exported[name]
    assert summary["llama_cpp"] and summary["max_abs_logprob_diff"] <= TOLERANCE[name]
    assert summary["max_kl"] <= KL_TOLERANCE[name]
    loaded = load_model(sources["base"], device="cpu")
    text = "ROMEO: But, soft! what light"
    prompt = loaded.tokenizer.encode(text)[:16]  # + 12 new tokens within the 32 positions
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, verbose=False, n_threads=1)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == loaded.tokenizer.encode(text)
    assert llm.n_vocab() == 320 and llm.token_eos() == loaded.tokenizer.eos_id
    llm.eval(prompt)
    theirs = []
    for step in range(12):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if step < 11:
            llm.eval([theirs[-1]])
    assert theirs == llmctl_greedy(loaded.model, prompt, 12)
    # The greedy choice at every position of a random sequence, not only after this prompt.
    random = torch.randint(0, 320, (32,), generator=torch.Generator().manual_seed(3)).tolist()
    llm.reset()
    llm.eval(random)
    with torch.no_grad():
        ours = loaded.model(torch.tensor([random]))[0]
    assert np.argmax(np.array(llm.scores[:32]), -1).tolist() == ours.argmax(-1).tolist()
    print(f"{name}: max |log-prob difference| {summary['max_abs_logprob_diff']:.3g}, greedy {theirs}")


def test_without_llama_cpp_the_check_is_skipped_and_says_how_to_enable_it(work, sources, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    out = work / "skipped.gguf"
    result = cli("export", "-c", str(sources["base"]), "--format", "gguf", str(out))
    assert result.exit_code == 0, result.output
    assert "skipped" in result.stderr and "pip install llama-cpp-python" in result.stderr and out.is_file()


def test_refusals_leave_nothing_behind(work, sources, monkeypatch):
    out = work / "refused" / "sinks.gguf"
    sinks = cli("export", "-c", str(sources["sinks"]), "--format", "gguf", str(out))
    assert sinks.exit_code == 2 and "attention sinks" in sinks.stderr and len(sinks.stderr.strip().splitlines()) == 1
    assert not out.parent.exists()

    taken = work / "taken.gguf"
    taken.write_text("mine")
    refused = cli("export", "-c", str(sources["base"]), "--format", "gguf", str(taken))
    assert refused.exit_code == 2 and "--force" in refused.stderr and taken.read_text() == "mine"
    replaced = cli("export", "-c", str(sources["base"]), "--format", "gguf", "--dtype", "f32", "--force", str(taken))
    assert replaced.exit_code == 0, replaced.output
    assert gguf.GGUFReader(str(taken)).fields["general.architecture"].contents() == "llama"
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary files left

    wrong = cli("export", "-c", str(sources["base"]), "--format", "hf", "--dtype", "f16", str(work / "hf"))
    assert wrong.exit_code == 2 and "--format gguf only" in wrong.stderr

    monkeypatch.setitem(sys.modules, "gguf", None)
    missing = cli("export", "-c", str(sources["base"]), "--format", "gguf", str(work / "never.gguf"))
    assert missing.exit_code == 2 and 'pip install "llmctl[gguf]"' in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (work / "never.gguf").exists()


@pytest.mark.parametrize("change, words", [({"copy_pointer": True}, "copy pointer"),
                                           ({"attention_block": 8}, "attention_block = 8"),
                                           ({"use_attention_sinks": True}, "attention sinks")])
def test_what_llama_cannot_express_is_refused_in_one_line(change, words, sources):
    from llmctl.gguf_export import refuse_unexpressible

    cfg = dataclasses.replace(load_model(sources["base"], device="cpu").config.model, **change)
    with pytest.raises(ConfigError, match=words):
        refuse_unexpressible(cfg, None)
    with pytest.raises(ConfigError, match="counted n-grams"):
        refuse_unexpressible(load_model(sources["base"], device="cpu").config.model, counts=object())


@needs_llama_cpp
def test_the_gpt2_tokenizer_encodes_in_llama_cpp_as_in_llmctl(work, sources, gpt2_dir):
    """GPT-2's own 50,257-token vocabulary (the small model with a new, random embedding): llama.cpp's
    "gpt-2" pre-tokenizer and merges give llmctl's ids on text with accents, quotes, tabs and digits."""
    import llama_cpp

    from llmctl.checkpoint import load_checkpoint, save_checkpoint
    from llmctl.data.tokenizer import load_tokenizer
    from llmctl.gguf_export import export_gguf
    from llmctl.model import padded_vocab_size

    payload = load_checkpoint(sources["base"])
    for key in ("kind", "format_version", "optimizer"):
        payload.pop(key, None)
    tokenizer = load_tokenizer(str(gpt2_dir))
    config = {section: dict(values) for section, values in payload["config"].items()}
    config["model"]["vocab_size"] = tokenizer.vocab_size
    model = dict(payload["model"])
    rows = padded_vocab_size(tokenizer.vocab_size, config["model"]["pad_vocab_multiple"])
    model["tok_emb.weight"] = 0.5 * torch.randn(rows, 32, generator=torch.Generator().manual_seed(0))
    payload.update(config=config, model=model, tokenizer=tokenizer.to_state())
    save_checkpoint(work / "gpt2.pt", payload)

    summary = export_gguf(work / "gpt2.pt", work / "gpt2.gguf", "f32")  # its check compares the probe text's ids
    assert summary["max_abs_logprob_diff"] < 1e-3 and summary["greedy_agree"] == summary["greedy_tokens"]
    llm = llama_cpp.Llama(model_path=str(work / "gpt2.gguf"), vocab_only=True, verbose=False)
    text = "Naïve café's “smart” quotes,\ttabs   and 12345 digits — they'll DON'T\n\n  end."
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text)
    assert llm.token_eos() == tokenizer.eos_id == 50256
