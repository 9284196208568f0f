"""The output layer and its cross-entropy as one autograd function, a chunk of rows at a time.

The usual `F.cross_entropy(F.linear(x, W).float(), y)` materialises the (N, V) logits three
times over: bf16 from the matmul, an fp32 copy, and fp32 log-probabilities kept for backward,
then a zero-filled fp32 gradient of the same size. At the `gpu` preset (N = 32 x 1,024
tokens, V = 50,257) each is 3 to 6 GB; on a CPU those passes over memory also cost more than
the matmul. Here no (N, V) tensor exists at any time:

- The rows of x go through the output matmul a chunk at a time: (R, C) @ (C, V) -> (R, V)
  logits in the matmul's dtype. R is set so a chunk is ~2^25 elements on a CPU (64-128 MB,
  about 650 rows at V = 50,257: fewer rows and the matmul's throughput drops, as every chunk
  rereads all of W) and ~2^26 on an accelerator (few launches). Only the fp32 log-sum-exp and
  the target's logit (R,) are kept.
- Inside a chunk the fp32 work (log-sum-exp, softmax - one_hot) runs a block of rows at a
  time, ~4 MB of fp32 on a CPU so it stays in cache, the whole chunk on an accelerator.
- Gradients. For "sum" and "mean" the loss is a scalar, so every token's gradient weight is
  known in forward (1 where scored, 0 where ignored) up to the one scalar that backward brings:
  forward turns each chunk's logits into softmax - one_hot in place and accumulates grad_x
  (N, C) and grad_W (V, C) right away, and backward only scales them (as Liger-Kernel's fused
  linear cross-entropy does). That is the three matmuls of the unfused layer and nothing is
  recomputed. For "none" the upstream gradient per token is only known in backward, which
  recomputes each chunk's logits from x and W (one extra matmul) instead of keeping them.

The loss is the one of the usual formula in fp32 (the fp32 view of bf16 logits is exact);
under autocast the gradients differ from it by bf16 rounding of the (R, V) gradient before
its matmuls, as they would under autocast anyway. grad_W is accumulated over chunks in fp32.
Rows of W past `vocab` (padding) are never scored and get zero gradient.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _rows_per_chunk(vocab: int, device: torch.device) -> int:
    # (R, V) logits per matmul: ~2^25 elements on a CPU, ~2^26 on an accelerator.
    elements = 2**25 if device.type == "cpu" else 2**26
    return max(1, elements // vocab)


def _rows_per_block(vocab: int, device: torch.device) -> int:
    # (r, V) fp32 per elementwise pass: ~4 MB on a CPU (cache-sized), a whole chunk elsewhere.
    elements = 2**20 if device.type == "cpu" else 2**26
    return max(1, elements // vocab)


def _chunk_loss_(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None,
                 lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: logits (R, V) in the matmul's dtype, targets (R,) in [0, V), scale (R,) fp32.

    Returns the fp32 log-sum-exp (R,) (computed unless given) and target logit (R,). When
    scale is given, overwrites logits in place with scale * (softmax - one_hot), the chunk's
    gradient of the per-token losses."""
    R = logits.size(0)
    rows = _rows_per_block(logits.size(1), logits.device)
    lse_out = torch.empty(R, dtype=torch.float32, device=logits.device) if lse is None else lse
    target_logit = logits.gather(1, targets[:, None]).squeeze(1).float()  # (R,)
    for r in range(0, R, rows):
        block = logits[r: r + rows]  # (r, V)
        f = block.float()  # the block itself when fp32, else an fp32 copy
        if lse is None:
            lse_out[r: r + rows] = torch.logsumexp(f, dim=-1)
        if scale is not None:
            probs = f.sub_(lse_out[r: r + rows, None]).exp_()  # softmax (r, V)
            probs[torch.arange(probs.size(0), device=probs.device), targets[r: r + rows]] -= 1.0
            probs.mul_(scale[r: r + rows, None])
            if probs.data_ptr() != block.data_ptr():
                block.copy_(probs)
    return lse_out, target_logit


def _add_grads(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, grad_x: torch.Tensor | None,
               grad_w: torch.Tensor | None) -> None:
    # grad (R, V) d loss / d logits of x's rows (R, C); grad_x (R, C) written, grad_w (V, C) fp32 summed into
    if grad_x is not None:
        torch.mm(grad, w, out=grad_x)
    if grad_w is not None:
        if grad.dtype == grad_w.dtype:
            grad_w.addmm_(grad.t(), x)
        else:
            grad_w += grad.t() @ x  # bf16 product, summed over chunks in fp32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int,
                summed: bool) -> torch.Tensor:
        # x (N, C) in the compute dtype, weight (V_padded, C), targets (N,)
        # -> summed: the loss summed over tokens (); else per-token losses (N,) fp32, 0 where ignored
        N = x.size(0)
        w = weight[:vocab].to(x.dtype)  # (V, C): padded rows are never scored
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        needs_x, needs_w = ctx.needs_input_grad[:2]
        grads_now = summed and (needs_x or needs_w)
        scale = valid.float() if grads_now else None  # (N,) each token's weight in the sum
        grad_x = torch.empty_like(x) if grads_now and needs_x else None  # (N, C)
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if grads_now and needs_w else None)  # (V_padded, C)
        lse = torch.empty(N, dtype=torch.float32, device=x.device)  # (N,) log-sum-exp of each row
        target_logit = torch.empty(N, dtype=torch.float32, device=x.device)  # (N,)
        rows = _rows_per_chunk(vocab, x.device)
        for r in range(0, N, rows):
            logits = x[r: r + rows] @ w.t()  # (R, V), becomes its gradient when grads_now
            lse[r: r + rows], target_logit[r: r + rows] = _chunk_loss_(
                logits, safe_targets[r: r + rows], None if scale is None else scale[r: r + rows])
            if grads_now:
                _add_grads(logits, x[r: r + rows], w, None if grad_x is None else grad_x[r: r + rows],
                           None if grad_w is None else grad_w[:vocab])
            del logits
        losses = (lse - target_logit) * valid  # (N,)
        ctx.vocab, ctx.summed, ctx.weight_dtype = vocab, summed, weight.dtype
        if grads_now:
            ctx.save_for_backward(grad_x, grad_w)
        elif needs_x or needs_w:
            ctx.save_for_backward(x, weight, lse, safe_targets, valid)
        return losses.sum() if summed else losses

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.summed:  # the gradients were made in forward for a unit upstream gradient
            grad_x, grad_w = ctx.saved_tensors
            grad_x = None if grad_x is None else grad_x * grad_out.to(grad_x.dtype)
            grad_w = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
            return grad_x, grad_w, None, None, None
        x, weight, lse, safe_targets, valid = ctx.saved_tensors
        vocab = ctx.vocab
        N = x.size(0)
        w = weight[:vocab].to(x.dtype)  # (V, C)
        scale = grad_out.float() * valid  # (N,): d loss / d (per-token loss), 0 where ignored
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if ctx.needs_input_grad[1] else None)  # (V_padded, C)
        rows = _rows_per_chunk(vocab, x.device)
        for r in range(0, N, rows):
            logits = x[r: r + rows] @ w.t()  # (R, V) recomputed, then turned into its gradient
            _chunk_loss_(logits, safe_targets[r: r + rows], scale[r: r + rows], lse=lse[r: r + rows])
            _add_grads(logits, x[r: r + rows], w, None if grad_x is None else grad_x[r: r + rows],
                       None if grad_w is None else grad_w[:vocab])
            del logits
        if grad_w is not None:
            grad_w = grad_w.to(ctx.weight_dtype)
        return grad_x, grad_w, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `x @ weight[:vocab].T` against targets, without an (N, vocab) tensor.

    x: (N, C) final hidden states; weight: (V_padded, C) output matrix; targets: (N,) ids,
    `IGNORE_INDEX` (-100) for positions that carry no loss. The matmul runs in autocast's dtype
    when autocast is on (as `F.linear` would), else in x's dtype. reduction: "mean" over
    the scored tokens, "sum", or "none" (per-token, 0 where ignored)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    summed = reduction != "none"
    with torch.autocast(device_type, enabled=False):
        loss = _LinearCrossEntropy.apply(x, weight, targets, vocab, summed)  # () or (N,) fp32
    if reduction == "mean":
        return loss / (targets != IGNORE_INDEX).sum()
    return loss if summed else reduce_losses(loss, targets, reduction)


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
