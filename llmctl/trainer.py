"""The one training loop, shared by pretraining and SFT.

The trainer knows nothing about where its config, data or model came from. It gets a
model, a `TrainConfig` section, a batch source with `next_batch()` and state, and an
`evaluate()` function; it reports through callbacks as plain dicts. SFT differs only in
its batches (ignored targets) and starting weights.

One optimizer step = `accumulation` micro-batches, each loss scaled by 1/accumulation so
the summed gradient equals that of one batch of `batch_size` sequences. The loss is read
back to the host only at log steps, so the device never waits on the Python loop.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from llmctl.config import TrainConfig
from llmctl.runtime import autocast, rng_state, set_rng_state


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from 0, then
    constant, or cosine down to `min_lr_ratio * lr` at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
    return cfg.lr


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings and linear weights);
    norm gains and sink logits are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel is several times faster than the per-tensor loop on CUDA and CPU.
    fused = device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


class BatchSource(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Callback:
    """Hooks the trainer calls; records are plain dicts."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_log(self, trainer: "Trainer", record: dict[str, Any]) -> None: ...
    def on_eval(self, trainer: "Trainer", record: dict[str, Any]) -> None: ...
    def on_save(self, trainer: "Trainer", final: bool) -> None: ...
    def on_fit_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None: ...


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, *, batches: BatchSource,
                 evaluate: Callable[[], dict[str, float]] | None, device: torch.device,
                 dtype: torch.dtype, seq_len: int, log_every: int = 10, compile: bool = False,
                 callbacks: Sequence[Callback] = ()):
        self.model = model  # the raw module: its state_dict is what checkpoints hold
        self.cfg = cfg
        self.batches = batches
        self.evaluate_fn = evaluate
        self.device = device
        self.dtype = dtype
        self.seq_len = seq_len
        self.log_every = log_every
        self.callbacks = list(callbacks)
        self.accumulation = cfg.batch_size // cfg.micro_batch_size
        self.optimizer = build_optimizer(model, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        self.step = 0  # optimizer steps completed
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []  # eval records, for resume and summaries
        self.forward_model: torch.nn.Module = model
        self._compile_pending = compile

    # ------------------------------------------------------------------ one step

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `accumulation` micro-batches; returns device tensors
        (mean loss, gradient norm before clipping) without synchronising."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.accumulation):
            x, y = self.batches.next_batch()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with autocast(self.device, self.dtype):
                loss = self._forward(x, y) / self.accumulation
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.cfg.batch_size * self.seq_len
        return loss_sum, grad_norm

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._compile_pending:
            self._compile_pending = False
            try:
                compiled = torch.compile(self.model)
                loss = compiled(x, y)
                self.forward_model = compiled
                return loss
            except Exception as e:  # compilers fail in many ways; eager always works
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                              f"training continues in eager mode", stacklevel=2)
                self.forward_model = self.model
        return self.forward_model(x, y)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        self.model.train()
        for cb in self.callbacks:
            cb.on_fit_start(self)
        cfg = self.cfg
        interval_start, interval_tokens = time.perf_counter(), 0
        fit_start = time.perf_counter()
        start_step = self.step
        while self.step < cfg.max_steps:
            loss, grad_norm = self.train_step()
            interval_tokens += cfg.batch_size * self.seq_len
            step, last = self.step, self.step == cfg.max_steps
            if step % self.log_every == 0 or last or step == start_step + 1:
                now = time.perf_counter()
                loss_value = float(loss)  # the one host sync per log interval
                steps_left = cfg.max_steps - step
                per_step = (now - fit_start) / max(1, step - start_step)
                record = {
                    "step": step, "max_steps": cfg.max_steps, "loss": loss_value,
                    "perplexity": math.exp(min(loss_value, 700.0)), "lr": lr_at(step - 1, cfg),
                    "grad_norm": float(grad_norm), "tokens": self.tokens_seen,
                    "tokens_per_sec": interval_tokens / max(now - interval_start, 1e-9),
                    "eta_seconds": steps_left * per_step, "elapsed_seconds": now - fit_start,
                }
                for cb in self.callbacks:
                    cb.on_log(self, record)
                interval_start, interval_tokens = time.perf_counter(), 0
            pause_start = time.perf_counter()
            # Save before evaluating: an eval that crashes must not cost the steps since the last save.
            if step % cfg.save_every == 0 and not last:
                for cb in self.callbacks:
                    cb.on_save(self, final=False)
            if (step % cfg.eval_every == 0 or last) and self.evaluate_fn is not None:
                self.run_eval()
            interval_start += time.perf_counter() - pause_start  # tokens/s counts training time only
        summary = {"step": self.step, "tokens": self.tokens_seen,
                   "seconds": time.perf_counter() - fit_start,
                   "val_loss": self.history[-1]["val_loss"] if self.history else None,
                   "val_perplexity": self.history[-1]["val_perplexity"] if self.history else None}
        for cb in self.callbacks:
            cb.on_save(self, final=True)
        for cb in self.callbacks:
            cb.on_fit_end(self, summary)
        return summary

    def run_eval(self) -> dict[str, Any]:
        result = self.evaluate_fn()
        record = {"step": self.step, "tokens": self.tokens_seen, "val_loss": result["loss"],
                  "val_perplexity": result["perplexity"], "val_tokens": result["tokens"],
                  "eval_seconds": result["seconds"]}
        self.history.append(record)
        for cb in self.callbacks:
            cb.on_eval(self, record)
        return record

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data_position": self.batches.state_dict(),
            "rng": rng_state(),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.batches.load_state_dict(state["data_position"])
        set_rng_state(state["rng"])
        self.history = list(state.get("history", []))
