"""`llmctl export`: a checkpoint out into the ecosystem, checked before it is handed over.

`--format hf` writes a transformers model folder — config.json, model.safetensors,
generation_config.json, tokenizer.json + tokenizer_config.json, and for an SFT checkpoint
its chat template — that `AutoModelForCausalLM` and `AutoTokenizer` load with no custom
code. llmctl's decoder is Llama's (rotate-half RoPE, RMSNorm, SwiGLU, GQA, tied
embeddings, no biases), so it maps onto `LlamaForCausalLM` one tensor for one
(`llama_state_dict` splits the fused q/k/v and gate/up weights and drops the vocabulary
padding). Llama cannot express attention sinks (`model.use_attention_sinks`);
transformers' `GraniteSWAForCausalLM` can — one learned logit per head in the softmax
denominator, applied as sigmoid(logsumexp - sink) — and with every layer on full attention
and Granite's multipliers at 1 (attention scale 1/sqrt(head_dim)) it computes llmctl's
model exactly, so sink models go there. Where the installed transformers lacks it, the
export stops with one line naming the option. No transformers architecture has a copy
pointer (`model.copy_pointer`) or block-local attention: such a model exports only as
`--format safetensors`. Counted n-grams (`model.ngram_order`, `model.cache_weight`) are mixed
in by llmctl at inference, outside the network: `hf` exports the network alone (what
`llmctl eval` reports as the network's score), `safetensors` carries the counts too.

`--format safetensors` writes the bare weights under llmctl's own names (`model.safetensors`,
fused tensors, padded vocabulary) with `config.toml`, `tokenizer.json` and `llmctl.json`
(stage, step, end-of-text id, chat template): for code that builds llmctl's
`Transformer` itself (`load_safetensors_folder`).

Nothing is trusted: the folder is written to a temporary sibling of OUT_DIR, then loaded
back — by transformers for `hf`, by llmctl for `safetensors` — and run on a fixed input
(an encoded paragraph and random ids, up to 128 positions) next to the checkpoint's model
in float32. Logits that differ beyond a tolerance (1e-4 absolute + 1e-4 relative), a
tokenizer that encodes the probe text to other ids, or a chat template that renders a
conversation differently end the export with the numbers, and the temporary folder is
removed. Only then is it renamed to OUT_DIR, so OUT_DIR is either complete and verified or
untouched. An existing non-empty OUT_DIR is replaced only with `--force`, and never when it
holds llmctl checkpoints (a run directory given by mistake).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from llmctl import __version__
from llmctl.errors import ConfigError, LlmctlError

if TYPE_CHECKING:
    from llmctl.data.chat_template import ChatTemplate
    from llmctl.data.tokenizer import TextTokenizer
    from llmctl.loading import LoadedModel
    from llmctl.model import Transformer

FORMATS = ("hf", "safetensors")
ATOL, RTOL = 1e-4, 1e-4  # fp32 on both sides; observed differences are ~1e-6
PROBE_POSITIONS = 128
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. ROMEO: But, soft! what light through yonder "
              "window breaks?\n\nIt is the east, and Juliet is the sun. 1234 + 5678 = 6912; naïve café "
              "→ ünïcödé — “quotes” and   spaces\tand tabs.\n")
PROBE_CONVERSATION = [("system", "You are terse."), ("user", "Name a colour."), ("assistant", "Blue."),
                      ("user", "And another?")]


# --------------------------------------------------------------------------- the mapping

def llama_state_dict(model: "Transformer") -> dict[str, torch.Tensor]:
    """The model's weights under transformers `LlamaForCausalLM` names (fused q/k/v and
    gate/up split back); `lm_head.weight` is the tied embedding, without vocabulary padding."""
    V = model.vocab_size
    out = {"model.embed_tokens.weight": model.tok_emb.weight[:V], "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.tok_emb.weight[:V]}
    for i, block in enumerate(model.blocks):
        a, prefix = block.attn, f"model.layers.{i}."
        H, K, D = a.n_heads, a.n_kv_heads, a.head_dim
        q, k, v = a.wqkv.weight.split([H * D, K * D, K * D], dim=0)
        gate, up = block.mlp.w13.weight.split(block.mlp.hidden, dim=0)
        out.update({
            prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.v_proj.weight": v, prefix + "self_attn.o_proj.weight": a.wo.weight,
            prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up,
            prefix + "mlp.down_proj.weight": block.mlp.w2.weight,
            prefix + "input_layernorm.weight": block.attn_norm.weight,
            prefix + "post_attention_layernorm.weight": block.mlp_norm.weight,
        })
    return {name: t.detach().contiguous().clone() for name, t in out.items()}



def hf_architecture(model_cfg: Any, arch: str | None = None) -> str:
    """Which transformers architecture expresses this model: "llama", or "granite_swa" for
    attention sinks. `arch` forces one (the self-check then proves or refutes it)."""
    if getattr(model_cfg, "copy_pointer", False):
        raise LlmctlError("model.copy_pointer = true has no transformers architecture (a Llama-style model "
                          "cannot point at earlier tokens of its context); export with --format safetensors, "
                          "or train without the pointer for a transformers model")
    if getattr(model_cfg, "attention_block", 0) and model_cfg.attention_block < model_cfg.max_seq_len:
        raise LlmctlError(f"model.attention_block = {model_cfg.attention_block} (attention within blocks of the "
                          f"context) has no transformers architecture; export with --format safetensors")
    if arch is not None:
        return arch
    if not model_cfg.use_attention_sinks:
        return "llama"
    import transformers

    if not hasattr(transformers, "GraniteSWAForCausalLM"):
        raise LlmctlError(f"model.use_attention_sinks = true cannot be exported as LlamaForCausalLM, and this "
                          f"transformers ({transformers.__version__}) has no GraniteSWAForCausalLM, the "
                          f"architecture with attention sinks; upgrade transformers, or export with "
                          f"--format safetensors")
    return "granite_swa"


ARCH_CLASSES = {"llama": "LlamaForCausalLM", "granite_swa": "GraniteSWAForCausalLM"}


def hf_config(model: "Transformer", eos_id: int, arch: str) -> Any:
    """A transformers config whose model computes exactly what `model` computes."""
    cfg = model.cfg
    head_dim = cfg.d_model // cfg.n_heads
    common = dict(
        vocab_size=model.vocab_size, hidden_size=cfg.d_model, intermediate_size=model.blocks[0].mlp.hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_bias=False, mlp_bias=False, bos_token_id=eos_id, eos_token_id=eos_id, dtype="float32")
    if arch == "llama":
        from transformers import LlamaConfig

        config = LlamaConfig(head_dim=head_dim, **common)
    elif arch == "granite_swa":
        from transformers import GraniteSWAConfig

        config = GraniteSWAConfig(
            **common, embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0,
            attention_multiplier=1.0 / math.sqrt(head_dim),
            layer_types=["full_attention"] * cfg.n_layers,
            sliding_window=cfg.max_seq_len)  # required by the config, unused with full attention
    else:
        raise ConfigError(f"unknown export architecture '{arch}'; use llama or granite_swa")
    config.architectures = [ARCH_CLASSES[arch]]
    return config


def hf_state_dict(model: "Transformer", arch: str) -> dict[str, torch.Tensor]:
    """Weights under the architecture's names; the tied output matrix is stored once (as the embedding)."""
    weights = llama_state_dict(model)
    del weights["lm_head.weight"]  # tie_word_embeddings: transformers ties it back on load
    if arch == "granite_swa":
        for i, block in enumerate(model.blocks):
            weights[f"model.layers.{i}.self_attn.sinks"] = block.attn.sinks.detach().float().contiguous().clone()
    return weights


# --------------------------------------------------------------------------- writing

def _checkpoint_extras(loaded: "LoadedModel") -> dict[str, Any]:
    """stage, step and chat template of an llmctl checkpoint, read without loading its tensors
    again (memory-mapped: only the small entries are touched)."""
    extras = {"stage": None, "step": loaded.step, "template": getattr(loaded, "template", None)}
    try:
        payload = torch.load(loaded.path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an old-style (non-zip) file cannot be mapped; load_model read it already
        from llmctl.checkpoint import load_checkpoint

        payload = load_checkpoint(loaded.path)
    extras["stage"] = payload.get("stage")
    if extras["template"] is None and isinstance(payload.get("template"), dict):
        from llmctl.data.chat_template import ChatTemplate

        extras["template"] = ChatTemplate.from_state(payload["template"])
    elif isinstance(extras["template"], dict):
        from llmctl.data.chat_template import ChatTemplate

        extras["template"] = ChatTemplate.from_state(extras["template"])
    return extras


def eos_token(tokenizer: "TextTokenizer") -> str:
    token = tokenizer.backend.id_to_token(tokenizer.eos_id)
    if token is None:
        raise LlmctlError(f"the tokenizer has no token for its end-of-text id {tokenizer.eos_id}")
    return token


def write_hf_tokenizer(folder: Path, tokenizer: "TextTokenizer", max_len: int, chat_template: str | None) -> None:
    """tokenizer.json (the checkpoint's, as trained) + tokenizer_config.json (+ chat_template.jinja)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    eos = eos_token(tokenizer)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.to_json()), eos_token=eos,
                                   bos_token=eos, model_max_length=max_len, clean_up_tokenization_spaces=False,
                                   chat_template=chat_template)
    fast.save_pretrained(str(folder))
    # transformers 5 names its class TokenizersBackend; PreTrainedTokenizerFast is the same
    # class there and the one older transformers (and tools pinned to them) know.
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["clean_up_tokenization_spaces"] = False
    config.pop("chat_template", None)
    if chat_template is not None:
        config["chat_template"] = chat_template  # older readers look here; 5.x reads chat_template.jinja
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf(folder: Path, loaded: "LoadedModel", arch: str, template: "ChatTemplate | None") -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    model, tokenizer = loaded.model, loaded.tokenizer
    config = hf_config(model, tokenizer.eos_id, arch)
    config.save_pretrained(str(folder))
    path = folder / "config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["rope_theta"] = float(model.cfg.rope_theta)  # transformers < 5 and GGUF converters read it here
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(hf_state_dict(model, arch), str(folder / "model.safetensors"),
              metadata={"format": "pt", "producer": f"llmctl {__version__}"})
    # A chat reply is never empty in llmctl (no end-of-text first); min_new_tokens says the same to `generate`.
    chat = {"min_new_tokens": 1} if template is not None else {}
    GenerationConfig(bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
                     pad_token_id=tokenizer.eos_id, **chat).save_pretrained(str(folder))
    jinja = template.to_jinja(eos_token(tokenizer)) if template is not None else None
    write_hf_tokenizer(folder, tokenizer, model.cfg.max_seq_len, jinja)


def write_safetensors(folder: Path, loaded: "LoadedModel", extras: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in loaded.model.state_dict().items()}
    if loaded.counts is not None:  # the tables beside the weights, under "counts.*"
        state.update({f"counts.{k}": v.detach().contiguous().clone() for k, v in loaded.counts.state_dict().items()})
    save_file(state, str(folder / "model.safetensors"),
              metadata={"format": "pt", "producer": f"llmctl {__version__}"})
    (folder / "config.toml").write_text(loaded.config.to_toml(), encoding="utf-8")
    (folder / "tokenizer.json").write_text(loaded.tokenizer.to_json(), encoding="utf-8")
    template = extras["template"]
    meta = {"format": "llmctl-safetensors", "format_version": 1, "llmctl_version": __version__,
            "stage": extras["stage"], "step": extras["step"], "eos_id": loaded.tokenizer.eos_id,
            "template": template.to_state() if template is not None else None}
    (folder / "llmctl.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_safetensors_folder(folder: str | Path) -> tuple["Transformer", Any, "TextTokenizer", Any, dict[str, Any]]:
    """(model, counts, tokenizer, config, meta) from a `--format safetensors` export; the model
    in eval mode, counts None unless its config mixes them in (`llmctl.inference.Predictor`)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from llmctl.config import config_from_dict
    from llmctl.data.tokenizer import TextTokenizer
    from llmctl.model import Transformer
    from llmctl.ngram import load_counts

    folder = Path(folder)
    meta = json.loads((folder / "llmctl.json").read_text(encoding="utf-8"))
    with open(folder / "config.toml", "rb") as f:
        cfg = config_from_dict(tomllib.load(f))
    model = Transformer(cfg.model)
    state = load_file(str(folder / "model.safetensors"))
    counts = load_counts(cfg.model, state, None)
    model.load_state_dict(state)
    tokenizer = TextTokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), int(meta["eos_id"]), str(folder))
    return model.eval(), counts, tokenizer, cfg, meta


# --------------------------------------------------------------------------- checking

def probe_ids(tokenizer: "TextTokenizer", vocab_size: int, positions: int) -> torch.Tensor:
    """(2, T): the probe paragraph's ids (repeated to length) and seeded random ids over the vocabulary."""
    text = tokenizer.encode(PROBE_TEXT) or [tokenizer.eos_id]
    text = (text * (positions // len(text) + 1))[:positions]
    generator = torch.Generator().manual_seed(0)
    random = torch.randint(0, vocab_size, (positions,), generator=generator)
    return torch.stack([torch.tensor(text, dtype=torch.long), random])


def compare_logits(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    """Max |difference|; raises when any position differs beyond ATOL + RTOL * |ours|."""
    if ours.shape != theirs.shape:
        raise LlmctlError(f"export check failed: {what} gives logits of shape {tuple(theirs.shape)}, "
                          f"llmctl {tuple(ours.shape)}")
    diff = (ours - theirs).abs()
    worst = float(diff.max())
    if not bool((diff <= ATOL + RTOL * ours.abs()).all()) or not math.isfinite(worst):
        raise LlmctlError(f"export check failed: {what} disagrees with the checkpoint (max |logit difference| "
                          f"{worst:.3g}, tolerance {ATOL:g} + {RTOL:g}·|logit|); nothing was written")
    return worst


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def verify_hf(folder: Path, loaded: "LoadedModel", arch: str, template: "ChatTemplate | None") -> dict[str, Any]:
    """Load the folder with transformers alone and compare it with the checkpoint's model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if type(hf).__name__ != ARCH_CLASSES[arch]:
        raise LlmctlError(f"export check failed: transformers loaded {type(hf).__name__}, not {ARCH_CLASSES[arch]}")
    ids = probe_ids(loaded.tokenizer, loaded.model.vocab_size, min(loaded.context_length, PROBE_POSITIONS))
    with torch.no_grad():
        ours = loaded.model(ids).float()
        theirs = hf(input_ids=ids, use_cache=False).logits.float()
    worst = compare_logits(ours, theirs, ARCH_CLASSES[arch])

    tok = AutoTokenizer.from_pretrained(str(folder))
    expected = loaded.tokenizer.encode(PROBE_TEXT)
    got = tok(PROBE_TEXT)["input_ids"]
    if got != expected:
        raise LlmctlError(f"export check failed: the exported tokenizer encodes the probe text to other ids "
                          f"({len(got)} tokens vs {len(expected)}); nothing was written")
    if tok.eos_token_id != loaded.tokenizer.eos_id:
        raise LlmctlError(f"export check failed: the exported tokenizer's eos id is {tok.eos_token_id}, "
                          f"the checkpoint's {loaded.tokenizer.eos_id}")
    if template is not None:
        check_chat_template(tok, template, loaded.tokenizer)
    return {"max_abs_logit_diff": worst, "positions": ids.size(1)}


def render_prompt(template: "ChatTemplate", messages: list[tuple[str, str]], eos: str) -> str:
    """The text llmctl's SFT feeds the model for `messages` plus the generation prompt."""
    from llmctl.data.chat_template import render_segments

    return "".join(eos if text == "<eos>" else text for text, _ in render_segments(messages, template)) \
        + template.assistant_prefix


def check_chat_template(tok: Any, template: "ChatTemplate", tokenizer: "TextTokenizer") -> None:
    messages = [{"role": r, "content": c} for r, c in PROBE_CONVERSATION]
    got = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = render_prompt(template, PROBE_CONVERSATION, eos_token(tokenizer))
    if got != expected:
        raise LlmctlError(f"export check failed: the chat template renders {got[:80]!r}…, llmctl renders "
                          f"{expected[:80]!r}…; nothing was written")


def verify_safetensors(folder: Path, loaded: "LoadedModel") -> dict[str, Any]:
    model, counts, tokenizer, _, _ = load_safetensors_folder(folder)
    ids = probe_ids(loaded.tokenizer, loaded.model.vocab_size, min(loaded.context_length, PROBE_POSITIONS))
    with torch.no_grad():
        worst = compare_logits(loaded.model(ids).float(), model(ids).float(), "the reloaded safetensors model")
    saved = {**model.state_dict(), **({f"counts.{k}": v for k, v in counts.state_dict().items()} if counts else {})}
    expected = {**loaded.model.state_dict(),
                **({f"counts.{k}": v for k, v in loaded.counts.state_dict().items()} if loaded.counts else {})}
    changed = [k for k in expected if k not in saved or not torch.equal(saved[k], expected[k])]
    if changed:  # the pointer head and the counts are not in the logits compared above
        raise LlmctlError(f"export check failed: {changed[0]} does not round-trip; nothing was written")
    if tokenizer.fingerprint != loaded.tokenizer.fingerprint:
        raise LlmctlError("export check failed: tokenizer.json does not round-trip; nothing was written")
    return {"max_abs_logit_diff": worst, "positions": ids.size(1)}


# --------------------------------------------------------------------------- the folder, atomically

def check_out_dir(out: Path, force: bool, checkpoint: Path | None = None) -> None:
    """Refuse before any work: a file, a non-empty folder without --force, a run directory."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is a file; give a folder path for OUT_DIR")
    if out.is_dir() and any(out.iterdir()):
        if any(out.glob("*.pt")):
            raise ConfigError(f"{out} holds llmctl checkpoints (a run directory?); export to another folder")
        if not force:
            raise ConfigError(f"{out} already exists and is not empty; pass --force to replace it, "
                              f"or choose another folder")
    if checkpoint is not None and out.resolve() in checkpoint.resolve().parents:
        raise ConfigError(f"{out} contains the checkpoint {checkpoint}; export to another folder")


def _readable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give it and its files the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        os.chmod(p, 0o666 & ~umask)


def publish(tmp: Path, out: Path) -> None:
    """Move the verified folder into place; an existing OUT_DIR is swapped out, then deleted."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def _made_parents(out: Path):
    """Create OUT_DIR's missing parent folders; remove them again if the export fails."""
    missing = [p for p in reversed(out.parents) if not p.exists()]
    for p in missing:
        p.mkdir()
    try:
        yield
    except BaseException:
        for p in reversed(missing):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, fmt: str = "hf", force: bool = False,
                      arch: str | None = None, on_status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export an llmctl checkpoint (file or run directory) to OUT_DIR, verified; returns a summary."""
    from llmctl.loading import load_model

    if fmt == "gguf":  # one file, not a folder: llmctl.gguf_export
        from llmctl.gguf_export import export_gguf

        return export_gguf(checkpoint, out_dir, force=force, on_status=on_status)
    say = on_status or (lambda line: None)
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    out = Path(out_dir).expanduser()
    check_out_dir(out, force)
    source = Path(str(checkpoint)).expanduser()
    if not source.exists():
        raise ConfigError(f"checkpoint not found: {checkpoint}; pass an llmctl .pt file or a run directory")
    if source.is_dir() and (source / "config.json").is_file() and not any(source.glob("*.pt")):
        raise ConfigError(f"{checkpoint} is a transformers folder already; export takes an llmctl checkpoint "
                          f"(a .pt file or a run directory)")
    loaded = load_model(checkpoint, device="cpu", dtype="float32")
    if loaded.kind != "llmctl" or loaded.path is None:
        raise ConfigError(f"{checkpoint} is not an llmctl checkpoint; export takes a .pt file or a run directory")
    check_out_dir(out, force, loaded.path)
    extras = _checkpoint_extras(loaded)
    architecture = hf_architecture(loaded.config.model, arch) if fmt == "hf" else "llmctl"
    say(f"export: {loaded.path} (step {extras['step']}, {loaded.model.num_parameters():,} parameters) -> "
        f"{out} as {fmt}" + (f" ({ARCH_CLASSES[architecture]})" if fmt == "hf" else ""))
    if fmt == "hf" and loaded.counts is not None:
        say("export: the counted n-grams (model.ngram_order, model.cache_weight) stay behind: transformers "
            "computes the network alone, the score `llmctl eval` reports as the network's; --format "
            "safetensors carries them")
    with _made_parents(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
        try:
            if fmt == "hf":
                write_hf(tmp, loaded, architecture, extras["template"])
                say("export: written; loading it back with transformers to compare logits and tokens")
                check = verify_hf(tmp, loaded, architecture, extras["template"])
            else:
                write_safetensors(tmp, loaded, extras)
                check = verify_safetensors(tmp, loaded)
            _readable(tmp)
            files = sorted(p.name for p in tmp.iterdir())
            publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {"output": str(out), "format": fmt, "architecture": ARCH_CLASSES.get(architecture, architecture),
            "checkpoint": str(loaded.path), "stage": extras["stage"], "step": extras["step"],
            "parameters": loaded.model.num_parameters(), "chat_template": extras["template"] is not None,
            "files": files, **check}
