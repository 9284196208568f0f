"""Dropout whose random mask is cheap on a CPU.

`F.dropout` draws one Bernoulli sample per element; on a CPU that sampling, not the
multiply, is the cost, and it slows small models' training markedly. Here the mask comes
from random 64-bit integers viewed as bytes, eight elements per draw, compared with a
threshold: about a tenth of the time (benchmarks/RESULTS.md). The rate is therefore rounded
to a multiple of 1/256 (0.1 becomes 26/256 = 0.1016) and kept elements are scaled by
1 / (1 - that rate), so the expectation is exact. On GPUs `F.dropout`'s fused kernel is
already cheap and is used as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _keep_mask(shape: torch.Size, threshold: int, device: torch.device) -> torch.Tensor:
    """A bool tensor of `shape`, each element False with probability threshold / 256."""
    n = shape.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=device)
    return (words.view(torch.uint8)[:n] >= threshold).view(shape)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0.0), None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with a byte-threshold mask on CPU (see the module doc)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training)
    threshold = max(1, min(255, round(p * 256)))
    return _MaskedScale.apply(x, _keep_mask(x.shape, threshold, x.device), 256.0 / (256 - threshold))
