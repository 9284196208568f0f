"""Held-out loss and perplexity: one implementation for the trainer's periodic eval and `llmctl eval`.

The loss is summed over every scored token and divided once at the end, so it is the
exact mean token loss whatever the batch size; perplexity = exp(mean loss).
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch

from llmctl.data.batches import sequential_windows


@torch.no_grad()
def evaluate_tokens(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int,
                    device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
                    max_tokens: int = 0) -> dict[str, float]:
    """Mean next-token loss over `tokens` (or its first `max_tokens` targets)."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    start = time.perf_counter()
    try:
        for x, y in sequential_windows(tokens, seq_len, batch_size, max_tokens):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast or contextlib.nullcontext():
                loss_sum = model(x, y, reduction="sum")
            total_loss += float(loss_sum)
            total_tokens += y.numel()
    finally:
        model.train(was_training)
    mean = total_loss / max(total_tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": total_tokens,
            "seconds": time.perf_counter() - start}
