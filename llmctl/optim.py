"""The optimizers a training run steps: AdamW alone, or Muon with AdamW (`optimizer = "muon"`).

AdamW decays matrices only (embeddings and linear weights); norm gains and sink logits are
not decayed.

Muon (torch.optim.Muon) updates a weight matrix with its momentum orthogonalized by a few
Newton-Schulz iterations: every direction of the update moves by the same amount, instead of
the few directions that dominate a raw gradient. On small transformers it usually reaches a
given training loss in fewer tokens than AdamW; on small data it overfits sooner too, and
its Newton-Schulz steps cost CPU time (benchmarks/sweep_local_results.md). It only applies
to 2-D weights that act as linear maps inside the blocks (attention and MLP); the token
embedding (tied to the output layer), whose rows are looked up rather than multiplied, and
the norm gains stay with AdamW. With `adjust_lr_fn="match_rms_adamw"` Muon scales each
update to AdamW's typical size, so one `lr` and `weight_decay` serve both optimizers and a
recipe tuned for AdamW is a fair starting point.
"""

from __future__ import annotations

import math

import torch

from llmctl.config import OPTIMIZERS, TrainConfig
from llmctl.errors import ConfigError


def _adamw(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel is several times faster than the per-tensor loop on CUDA and CPU.
    fused = device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """The optimizers for `model`'s trainable parameters, each parameter in exactly one: with
    Muon, [Muon, AdamW], else [AdamW]. (Muon needs whole matrices: config validation refuses
    it with FSDP's sharded parameters.)"""
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{cfg.optimizer}'")
    matrices, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            muon_takes = cfg.optimizer == "muon" and p.dim() == 2 and name.startswith("blocks.")
            (matrices if muon_takes else rest).append(p)
    adamw = _adamw([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                    {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}], cfg, device)
    if cfg.optimizer != "muon":
        return [adamw]
    return [torch.optim.Muon(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"),
            adamw]


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from 0 over
    warmup_steps, then constant; or cosine down to `min_lr_ratio * lr` at the end; or wsd:
    constant, then a linear decay to `min_lr_ratio * lr` over the last `decay_fraction`.

    `progress` is the fraction of the run done, in [0, 1]; the trainer passes elapsed time
    over max_time when a time budget is set (or the step fraction, whichever is further),
    else None and the schedule follows steps: a pure function of (step, cfg), so step-based
    runs are exactly reproducible. Warmup always counts steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        if progress is None:
            span = max(1, cfg.max_steps - cfg.warmup_steps)
            progress = (step - cfg.warmup_steps) / span
        progress = min(1.0, max(0.0, progress))
        return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "wsd":
        # fraction of the run still ahead (steps counted exactly, without float round-off)
        left = (cfg.max_steps - step) / cfg.max_steps if progress is None else 1.0 - progress
        left = min(1.0, max(0.0, left))
        if left >= cfg.decay_fraction:
            return cfg.lr
        return floor + (cfg.lr - floor) * left / cfg.decay_fraction
    return cfg.lr
