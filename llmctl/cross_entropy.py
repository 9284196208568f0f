"""The output layer and its cross-entropy as one autograd function.

The usual `F.cross_entropy(F.linear(x, W).float(), y)` materialises the logits three times
over: bf16 from the matmul, an fp32 copy, and fp32 log-probabilities kept for backward, then
a zero-filled fp32 gradient of the same size. With an 8k vocabulary and 2,048 tokens a step
each is 67 MB; on a CPU those passes over memory cost more than the output matmul itself
(measured on the nanoGPT shape of benchmarks/bench_train.py: 160 ms -> 86 ms for the output
layer's forward and backward).

Here the logits stay in the matmul's dtype and are kept once. The log-sum-exp of each row is
computed in fp32 a block of rows at a time, small enough to stay in cache (or, on a GPU, to
bound the temporary), and backward rebuilds softmax - one_hot the same way, writing the
gradient straight in the logits' dtype. The loss is identical to the usual one (the fp32 view
of bf16 logits is exact); the gradients differ only by bf16 rounding, as under autocast.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _rows_per_block(vocab: int, device: torch.device) -> int:
    # ~4 MB of fp32 per block on a CPU (cache-sized), ~256 MB on an accelerator (few launches).
    elements = 2**20 if device.type == "cpu" else 2**26
    return max(1, elements // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
        # x (N, C) in the compute dtype, weight (V_padded, C), targets (N,) -> per-token losses (N,) fp32
        w = weight[:vocab].to(x.dtype)  # (V, C): padded rows are never scored
        logits = x @ w.t()  # (N, V)
        N = logits.size(0)
        rows = _rows_per_block(vocab, logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        for r in range(0, N, rows):
            lse[r: r + rows] = torch.logsumexp(logits[r: r + rows].float(), dim=-1)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
        ctx.vocab = vocab
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(x, weight, logits, lse, safe_targets, valid)
        return (lse - target_logit) * valid

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        x, weight, logits, lse, safe_targets, valid = ctx.saved_tensors
        N = logits.size(0)
        scale = grad_losses.float() * valid  # (N,): d loss / d (per-token loss), 0 where ignored
        grad_logits = torch.empty_like(logits)  # (N, V) in the logits' dtype
        rows = _rows_per_block(ctx.vocab, logits.device)
        for r in range(0, N, rows):
            probs = logits[r: r + rows].to(torch.float32, copy=True).sub_(lse[r: r + rows, None]).exp_()  # softmax
            n = probs.size(0)
            probs[torch.arange(n, device=probs.device), safe_targets[r: r + rows]] -= 1.0
            grad_logits[r: r + rows] = probs.mul_(scale[r: r + rows, None])
        w = weight[: ctx.vocab].to(x.dtype)
        grad_x = grad_logits @ w if ctx.needs_input_grad[0] else None  # (N, C)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)  # (V_padded, C), padded rows get none
            grad_weight[: ctx.vocab] = grad_logits.t() @ x
        return grad_x, grad_weight, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `x @ weight[:vocab].T` against targets, without fp32 logits.

    x: (N, C) final hidden states; weight: (V_padded, C) output matrix; targets: (N,) ids,
    `IGNORE_INDEX` (-100) for positions that carry no loss. The matmul runs in autocast's dtype
    when autocast is on (as `F.linear` would), else in x's dtype. reduction: "mean" over
    the scored tokens, "sum", or "none" (per-token, 0 where ignored)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    with torch.autocast(device_type, enabled=False):
        losses = _LinearCrossEntropy.apply(x, weight, targets, vocab)  # (N,) fp32
    return reduce_losses(losses, targets, reduction)


def reduce_losses(losses: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-token losses (0 where the target is IGNORE_INDEX) -> "none" (flat), "sum", or "mean"
    over the scored tokens."""
    if reduction == "none":
        return losses.flatten()
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / (targets != IGNORE_INDEX).sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
