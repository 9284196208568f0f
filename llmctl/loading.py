"""Load a trained model to evaluate, sample from or fine-tune: model, tokenizer and config together.

Two kinds of source sit behind one `LoadedModel`:
- an llmctl checkpoint: a `.pt` file, or a run directory (its final checkpoint, else its
  latest step). The file carries its config and tokenizer, so nothing else is needed.
- a transformers causal LM: a local folder with `config.json`, or a Hub id such as `gpt2`.
  It is wrapped so it is called exactly like llmctl's `Transformer`, and `llmctl eval`
  scores it with the same code on the same text.

Weights are loaded in float32; `dtype` picks the autocast precision used at run time, so
`float32` (the default) gives exact numbers and `bfloat16` speed where the hardware has it.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmctl.config import Config, config_from_dict
from llmctl.cross_entropy import IGNORE_INDEX
from llmctl.data.tokenizer import TextTokenizer
from llmctl.errors import ConfigError, LlmctlError

TRANSFORMERS_EVAL_BATCH = 8  # sequences per eval forward for a transformers model


@dataclass
class LoadedModel:
    model: torch.nn.Module  # model(idx (B, T)) -> logits; model(idx, targets, reduction) -> loss
    tokenizer: TextTokenizer
    context_length: int  # the longest sequence the model takes
    source: str  # what the user passed
    path: Path | None  # the checkpoint file, for llmctl checkpoints
    config: Config | None  # the run's resolved config, for llmctl checkpoints
    device: torch.device
    dtype: torch.dtype  # autocast precision
    step: int | None = None
    template: dict[str, str] | None = None  # an SFT checkpoint's chat template (`llmctl.data.chat_template.ChatTemplate`)
    counts: Any = None  # `llmctl.ngram.CountMixture` when the config mixes counts in at inference

    @property
    def kind(self) -> str:
        return "llmctl" if self.config is not None else "transformers"

    @property
    def eval_batch_size(self) -> int:
        if self.config is None:
            return TRANSFORMERS_EVAL_BATCH
        return self.config.eval_batch_size()


def load_model(source: str | Path, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """An llmctl checkpoint file or run directory, or a transformers folder or Hub id."""
    from llmctl.checkpoint import resolve_checkpoint
    from llmctl.runtime import resolve_device, resolve_dtype

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype} is not one of auto, float32, bfloat16, float16")
    dev = resolve_device(device)
    precision = resolve_dtype(dtype, dev)
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and not any(path.glob("*.pt")):
        return _load_transformers(text, str(path), dev, precision)
    if path.exists():
        return _load_llmctl(text, resolve_checkpoint(path), dev, precision)
    if _looks_like_hub_id(text):
        return _load_transformers(text, text, dev, precision)
    raise ConfigError(f"checkpoint not found: {text}; pass an llmctl .pt file, a run directory, "
                      f"or a transformers model folder or Hub id")


def _looks_like_hub_id(text: str) -> bool:
    """NAME or ORG/NAME, not a path (no ./, /, ~, backslash, no file suffix such as .pt)."""
    if not text or text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        return False
    return not Path(text).suffix


def _load_llmctl(source: str, path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from llmctl.checkpoint import load_checkpoint
    from llmctl.model import Transformer
    from llmctl.ngram import load_counts

    payload = load_checkpoint(path)
    missing = [k for k in ("config", "tokenizer", "model") if k not in payload]
    if missing:
        raise LlmctlError(f"{path} lacks {', '.join(missing)}; it was not written by llmctl pretrain or sft")
    cfg = config_from_dict(payload["config"])
    tokenizer = TextTokenizer.from_state(payload["tokenizer"])
    model = Transformer(cfg.model)
    try:
        counts = load_counts(cfg.model, payload["model"], payload.get("counts"))
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise LlmctlError(f"{path}: its weights do not fit its own config ({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, cfg.model.max_seq_len, source, path, cfg, device, dtype,
                       step=int(payload["step"]) if "step" in payload else None, template=payload.get("template"),
                       counts=counts.to(device) if counts is not None else None)


class TransformersLM(torch.nn.Module):
    """A transformers causal LM called like llmctl's Transformer: forward(idx, targets, reduction)."""

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                last_only: bool = False) -> torch.Tensor:
        logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, vocab)
        if last_only:
            logits = logits[:, -1:]
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction=reduction)


def _load_transformers(source: str, name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from llmctl.data.hub import hub_offline, hub_reachable
    from llmctl.data.tokenizer import load_tokenizer

    local = Path(name).expanduser().is_dir()
    if not local and not (hub_offline() or hub_reachable()):
        raise ConfigError(f"checkpoint not found: {source} is no local file or folder, and the Hugging "
                          f"Face Hub cannot be reached to fetch it as a model id (set HF_HUB_OFFLINE=1 "
                          f"to use a populated Hugging Face cache)")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter stderr
    try:
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except pickle.UnpicklingError:
        # transformers loads .bin weights with weights_only=True; its message then suggests
        # weights_only=False, which is exactly what must not be done with an untrusted file.
        raise LlmctlError(f"{source} was refused: its weights file holds pickled objects that are not "
                          f"plain tensors; llmctl never unpickles code — use a safetensors copy") from None
    except (OSError, ValueError) as e:
        raise LlmctlError(f"cannot load {source} as a transformers causal LM: "
                          f"{str(e).strip().splitlines()[0][:200]}") from None
    tokenizer = load_tokenizer(os.path.expanduser(name) if local else name)
    context = _context_length(hf.config)
    if context is None:
        raise LlmctlError(f"{source}: its config states no context length (max_position_embeddings)")
    model = TransformersLM(hf).to(device).eval()
    return LoadedModel(model, tokenizer, context, source, None, None, device, dtype)


def _context_length(hf_config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
