"""`llmctl export --format gguf OUT.gguf`: one file that llama.cpp, Ollama and LM Studio run.

The route is the one llama.cpp's own `convert_hf_to_gguf.py` takes for a Llama folder, starting
from the same tensors `--format hf` writes (`llmctl.export.llama_state_dict`): GGUF architecture
"llama", llama.cpp's tensor names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`), and q and k
rows permuted per head. llmctl (like transformers) rotates the pairs (i, i + D/2) of each head
(rotate-half RoPE); llama.cpp's llama architecture rotates adjacent pairs (2i, 2i + 1), so the
rows of each head of q and k are reordered [0, D/2, 1, D/2 + 1, ...] — the same attention
scores, with no change to the runtime. The output matrix is the tied embedding, stored once:
llama.cpp uses `token_embd` for the output when `output.weight` is absent.

The tokenizer goes in as a GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`): the
tokens in id order, their types (special added tokens are control tokens), the merges, the
end-of-text id as both bos and eos (llmctl adds neither), and the pre-tokenizer "gpt-2" — the
regex of a `tokenizers` ByteLevel pre-tokenizer, which both the GPT-2 tokenizer and llmctl's
`train:V` tokenizers use. Any other pre-tokenization is refused rather than guessed. An SFT
checkpoint's chat template goes in as `tokenizer.chat_template`, the jinja `--format hf` writes.

`--dtype`: f32, f16, bf16 or q8_0 for the matrices (q8_0 needs rows of a multiple of 32 values;
a matrix whose rows are not is stored as f16 and the summary says which); the norms stay f32,
as llama.cpp's converter keeps them.

Checked before it is handed over: where `llama_cpp` (llama-cpp-python) is importable, the file
is loaded by llama.cpp and must encode the probe text to llmctl's token ids, give llmctl's
next-token distributions (over a prompt with its greedy continuation, and over random ids)
within a KL divergence per dtype (`KL_TOLERANCE`; a float32 KV cache, so the file is what is
measured; the largest |log p| difference on tokens of probability >= 1e-4 is reported), and
continue the prompt greedily with llmctl's tokens (a divergence is accepted only at a near tie:
llmctl's top two log-probabilities closer than the tolerance); an SFT file's chat template,
rendered by llama-cpp-python's jinja2 formatter, must give the text llmctl's SFT feeds the
model. Without llama_cpp the check is skipped and the summary says so. The file is written to a
temporary sibling and renamed over OUT only after the check, so OUT is complete and checked or
untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from llmctl import __version__
from llmctl.errors import ConfigError, LlmctlError

if TYPE_CHECKING:
    from llmctl.data.chat_template import ChatTemplate
    from llmctl.loading import LoadedModel

DTYPES = ("f32", "f16", "bf16", "q8_0")
# Max |log-probability difference| llama.cpp may show against llmctl's float32 model, per dtype.
# f32 differs by summation order only (observed ~1e-6); the others by their rounding of the weights.
# Log-probabilities are compared where llmctl gives a token at least this probability: a
# quantised file's error on a token of probability 1e-9 changes no sample, and on a trained
# model such tails dominate the raw maximum (q8_0: 0.13 over all tokens, far less over these).
LIKELY = math.log(1e-4)


def _likely_diff(theirs: "torch.Tensor", ours: "torch.Tensor") -> float:
    """Largest |log p| difference (T, V) over the tokens llmctl gives probability >= 1e-4."""
    return float((theirs - ours).abs().masked_fill(ours < LIKELY, 0.0).max())


TOLERANCE = {"f32": 1e-3, "f16": 5e-2, "bf16": 2e-1, "q8_0": 2e-1}  # |log p| (reported) and near-tie gap
# What decides: the largest KL divergence (nats) of llama.cpp's next-token distribution from
# llmctl's at any position. q8_0 of the trained quickstart model measured 5.7e-4 at worst.
KL_TOLERANCE = {"f32": 1e-5, "f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2}


def _worst_kl(theirs: "torch.Tensor", ours: "torch.Tensor") -> float:
    """max over positions of KL(ours || theirs), log-probabilities (T, V) each."""
    return float((ours.exp() * (ours - theirs)).sum(-1).max())
GREEDY_TOKENS = 12
INSTALL_HINT = 'pip install "llmctl[gguf]"'

# transformers Llama name (after "model.layers.N.") -> llama.cpp name (after "blk.N.")
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"--format gguf needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def refuse_unexpressible(model_cfg: Any, counts: Any) -> None:
    """One line for what a llama GGUF cannot compute, before any work."""
    if getattr(model_cfg, "copy_pointer", False):
        raise ConfigError("model.copy_pointer = true cannot be expressed in a llama GGUF (llama.cpp's llama "
                          "architecture has no copy pointer); export with --format safetensors")
    if getattr(model_cfg, "attention_block", 0) and model_cfg.attention_block < model_cfg.max_seq_len:
        raise ConfigError(f"model.attention_block = {model_cfg.attention_block} (attention within blocks) cannot "
                          f"be expressed in a llama GGUF; export with --format safetensors")
    if model_cfg.use_attention_sinks:
        raise ConfigError("model.use_attention_sinks = true cannot be expressed in a llama GGUF (llama.cpp's "
                          "llama architecture has no attention sinks); export with --format hf "
                          "(GraniteSWAForCausalLM) or --format safetensors")
    if counts is not None:
        raise ConfigError("model.ngram_order / model.cache_weight mix counted n-grams into the predictions, which "
                          "llama.cpp cannot do; export with --format safetensors (or --format hf for the "
                          "network alone)")
    from llmctl.export import hf_architecture

    hf_architecture(model_cfg)  # anything else --format hf refuses


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q or k from rotate-half order to llama.cpp's adjacent-pair order, per head
    (`convert_hf_to_gguf.LlamaModel.permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: Any) -> dict[str, torch.Tensor]:
    """llama.cpp's names and layout for the model's weights (float32, row-major as PyTorch has them)."""
    from llmctl.export import llama_state_dict

    weights = llama_state_dict(model)
    cfg = model.cfg
    n_heads, n_kv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    out = {"token_embd.weight": weights.pop("model.embed_tokens.weight"),
           "output_norm.weight": weights.pop("model.norm.weight")}
    weights.pop("lm_head.weight")  # tied: llama.cpp falls back to token_embd
    for name, tensor in weights.items():
        _, _, layer, rest = name.split(".", 3)
        if rest == "self_attn.q_proj.weight":
            tensor = permute_rope(tensor, n_heads)
        elif rest == "self_attn.k_proj.weight":
            tensor = permute_rope(tensor, n_kv)
        out[f"blk.{layer}.{LAYER_NAMES[rest]}"] = tensor
    return {k: v.float().contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------- the tokenizer

def gguf_vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, token types, merges "a b") for `tokenizer.ggml.model = "gpt2"`;
    refuses a tokenizer that llama.cpp's "gpt-2" pre-tokenizer would split differently."""
    gguf = require_gguf()
    spec = json.loads(tokenizer.to_json())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space") or spec.get("normalizer"):
        raise ConfigError(f"the checkpoint's tokenizer ({tokenizer.source}) is not a GPT-2 style byte-level BPE "
                          f"(model {model.get('type')}, pre-tokenizer {pre.get('type')}); --format gguf writes "
                          f"those only — use --format hf")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise LlmctlError(f"the tokenizer has {len(vocab)} tokens, more than the model's {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, int(gguf.TokenType.NORMAL)
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[i] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


# --------------------------------------------------------------------------- writing

def _encode(gguf: Any, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any, str]:
    """(data, raw_dtype for add_tensor, the type written) for one tensor."""
    data = tensor.numpy()
    if data.ndim == 1 or dtype == "f32":
        return data.astype(np.float32), None, "f32"
    if dtype == "f16":
        return data.astype(np.float16), None, "f16"
    qtype = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    try:
        return gguf.quants.quantize(data, qtype), qtype, dtype
    except gguf.quants.QuantError:  # rows not a multiple of the block size
        return data.astype(np.float16), None, "f16"


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(path: Path, loaded: "LoadedModel", dtype: str, template: "ChatTemplate | None",
               name: str) -> dict[str, str]:
    """Write the GGUF file; returns {tensor name: the type it was stored as}."""
    gguf = require_gguf()
    from llmctl.export import eos_token

    model, tokenizer = loaded.model, loaded.tokenizer
    cfg = model.cfg
    tokens, types, merges = gguf_vocab(tokenizer, model.vocab_size)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    try:
        writer.add_type("model")
        writer.add_name(name)
        writer.add_string("general.producer", f"llmctl {__version__}")  # not a standard key; ignored by readers
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(model.blocks[0].mlp.hidden)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads or cfg.n_heads)
        writer.add_rope_dimension_count(cfg.d_model // cfg.n_heads)
        writer.add_rope_freq_base(float(cfg.rope_theta))
        writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
        writer.add_vocab_size(model.vocab_size)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[dtype])))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokenizer.eos_id)
        writer.add_eos_token_id(tokenizer.eos_id)
        writer.add_add_bos_token(False)  # llmctl trains and generates without a leading token
        writer.add_add_eos_token(False)
        if template is not None:
            writer.add_chat_template(template.to_jinja(eos_token(tokenizer)))
        stored = {}
        for tname, tensor in gguf_tensors(model).items():
            data, raw, stored[tname] = _encode(gguf, tensor, dtype)
            writer.add_tensor(tname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return stored


# --------------------------------------------------------------------------- checking

def llmctl_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def check_chat_template(path: Path, template: "ChatTemplate", eos: str) -> None:
    """The template stored in the file, rendered as llama-cpp-python renders GGUF templates (jinja2),
    gives the text llmctl's SFT feeds the model."""
    import gguf
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from llmctl.export import PROBE_CONVERSATION, render_prompt

    stored = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents()
    formatter = Jinja2ChatFormatter(stored, eos_token=eos, bos_token=eos, add_generation_prompt=True)
    got = formatter(messages=[{"role": r, "content": c} for r, c in PROBE_CONVERSATION]).prompt
    expected = render_prompt(template, PROBE_CONVERSATION, eos)
    if got != expected:
        raise LlmctlError(f"export check failed: the chat template renders {got[:80]!r}…, llmctl renders "
                          f"{expected[:80]!r}…; nothing was written")


def verify_gguf(path: Path, loaded: "LoadedModel", dtype: str,
                template: "ChatTemplate | None" = None) -> dict[str, Any]:
    """Load the file with llama.cpp (llama-cpp-python) and compare it with the checkpoint."""
    try:
        import llama_cpp
    except ImportError:
        return {"llama_cpp": None}
    from llmctl.export import PROBE_TEXT, eos_token

    if template is not None:
        check_chat_template(path, template, eos_token(loaded.tokenizer))

    model, tokenizer = loaded.model, loaded.tokenizer
    tol = TOLERANCE[dtype]
    ctx = min(loaded.context_length, 128)
    new = min(GREEDY_TOKENS, ctx // 2)
    prompt = (tokenizer.encode(PROBE_TEXT) or [tokenizer.eos_id])[: ctx - new]
    try:  # llama.cpp writes notes to the C stderr even with verbose=False
        from llama_cpp._utils import suppress_stdout_stderr
    except ImportError:
        suppress_stdout_stderr = None
    with suppress_stdout_stderr(disable=False) if suppress_stdout_stderr else contextlib.nullcontext():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False,
                              n_threads=max(1, min(4, os.cpu_count() or 1)), seed=0,
                              type_k=0, type_v=0)  # a float32 KV cache: the file is checked, not the f16 cache
    try:
        got = llm.tokenize(PROBE_TEXT.encode("utf-8"), add_bos=False, special=False)
        if got != tokenizer.encode(PROBE_TEXT):
            raise LlmctlError(f"export check failed: llama.cpp encodes the probe text to other ids ({len(got)} "
                              f"tokens vs llmctl's {len(tokenizer.encode(PROBE_TEXT))}); nothing was written")
        if llm.token_eos() != tokenizer.eos_id:
            raise LlmctlError(f"export check failed: llama.cpp's eos id is {llm.token_eos()}, llmctl's "
                              f"{tokenizer.eos_id}; nothing was written")
        ours = llmctl_greedy(model, prompt, new)
        # Log-probabilities over prompt + llmctl's continuation, every position at once.
        seq = prompt + ours
        llm.reset()
        llm.eval(seq)
        theirs_lp = torch.log_softmax(torch.from_numpy(np.array(llm.scores[: len(seq)], dtype=np.float32)), -1)
        with torch.no_grad():
            ours_lp = torch.log_softmax(model(torch.tensor([seq]))[0].float(), -1)
        if theirs_lp.shape != ours_lp.shape:
            raise LlmctlError(f"export check failed: llama.cpp gives {tuple(theirs_lp.shape)} scores, llmctl "
                              f"{tuple(ours_lp.shape)}; nothing was written")
        worst, kl = _likely_diff(theirs_lp, ours_lp), _worst_kl(theirs_lp, ours_lp)
        # And over random ids (every token's row of the embedding, positions up to the context).
        random = torch.randint(0, model.vocab_size, (ctx,), generator=torch.Generator().manual_seed(0)).tolist()
        llm.reset()
        llm.eval(random)
        theirs_random = torch.log_softmax(torch.from_numpy(np.array(llm.scores[:ctx], dtype=np.float32)), -1)
        with torch.no_grad():
            ours_random = torch.log_softmax(model(torch.tensor([random]))[0].float(), -1)
        worst = max(worst, _likely_diff(theirs_random, ours_random))
        kl = max(kl, _worst_kl(theirs_random, ours_random))
        if not kl <= KL_TOLERANCE[dtype]:
            raise LlmctlError(f"export check failed: llama.cpp's next-token distributions differ from llmctl's by "
                              f"KL {kl:.3g} nats at worst (tolerance {KL_TOLERANCE[dtype]:g} for {dtype}; "
                              f"|log p| up to {worst:.3g}); nothing was written")
        # Greedy decoding inside llama.cpp (its KV cache), token by token.
        llm.reset()
        llm.eval(prompt)
        theirs: list[int] = []
        for _ in range(new):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            theirs.append(token)
            llm.eval([token])
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        if agree < len(ours):
            top2 = ours_lp[len(prompt) - 1 + agree].topk(2).values
            if float(top2[0] - top2[1]) >= tol:
                raise LlmctlError(f"export check failed: llama.cpp's greedy continuation departs from llmctl's at "
                                  f"token {agree + 1} of {len(ours)} (not a near tie); nothing was written")
    finally:
        if hasattr(llm, "close"):  # frees the model now (llama-cpp-python >= 0.2.80)
            llm.close()
    return {"llama_cpp": llama_cpp.__version__, "max_abs_logprob_diff": worst, "tolerance": tol,
            "max_kl": kl, "kl_tolerance": KL_TOLERANCE[dtype],
            "positions": len(seq) + ctx, "greedy_tokens": len(ours), "greedy_agree": agree,
            "greedy_llmctl": ours, "greedy_llama_cpp": theirs}


# --------------------------------------------------------------------------- the file, atomically

def check_out_file(out: Path, force: bool) -> None:
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; --format gguf writes one file, give a path such as model.gguf")
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it, or choose another path")


def export_gguf(checkpoint: str | Path, out_path: str | Path, dtype: str = "f16", force: bool = False,
                on_status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export an llmctl checkpoint (file or run directory) to one GGUF file, checked; returns a summary."""
    from llmctl.export import _checkpoint_extras, _made_parents
    from llmctl.loading import load_model

    say = on_status or (lambda line: None)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} for --format gguf, got '{dtype}'")
    require_gguf()
    out = Path(out_path).expanduser()
    check_out_file(out, force)
    source = Path(str(checkpoint)).expanduser()
    if not source.exists():
        raise ConfigError(f"checkpoint not found: {checkpoint}; pass an llmctl .pt file or a run directory")
    loaded = load_model(checkpoint, device="cpu", dtype="float32")
    if loaded.kind != "llmctl" or loaded.path is None:
        raise ConfigError(f"{checkpoint} is not an llmctl checkpoint; export takes a .pt file or a run directory")
    refuse_unexpressible(loaded.config.model, loaded.counts)
    extras = _checkpoint_extras(loaded)
    say(f"export: {loaded.path} (step {extras['step']}, {loaded.model.num_parameters():,} parameters) -> "
        f"{out} as gguf ({dtype}, llama architecture)")
    with _made_parents(out):
        tmp = out.with_name(f".{out.name}.export-{secrets.token_hex(4)}")
        try:
            stored = write_gguf(tmp, loaded, dtype, extras["template"], name=loaded.path.parent.name or "llmctl")
            say("export: written; loading it back with llama.cpp to compare tokens, log-probabilities and "
                "greedy text" if _has_llama_cpp() else "export: written")
            check = verify_gguf(tmp, loaded, dtype, extras["template"])
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fallback = sorted(k for k, v in stored.items() if v != dtype and v != "f32")
    return {"output": str(out), "format": "gguf", "architecture": "llama", "dtype": dtype,
            "checkpoint": str(loaded.path), "stage": extras["stage"], "step": extras["step"],
            "parameters": loaded.model.num_parameters(), "chat_template": extras["template"] is not None,
            "bytes": out.stat().st_size, "stored_as_f16": fallback, **check}


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None
