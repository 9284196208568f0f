"""The output layer and its cross-entropy as one autograd function, a chunk of rows at a time.

The usual `F.cross_entropy(F.linear(x, W).float(), y)` materialises the (N, V) logits three
times over: bf16 from the matmul, an fp32 copy, and fp32 log-probabilities kept for backward,
then a zero-filled fp32 gradient of the same size. At the `gpu` preset (N = 32 x 1,024
tokens, V = 50,257) each is 3 to 6 GB; on a CPU those passes over memory also cost more than
the matmul. Here no (N, V) tensor exists at any time:

- The rows of x go through the output matmul a chunk at a time, (R, C) @ (C, V) -> (R, V)
  logits in the matmul's dtype, written into one reused buffer. Only each row's fp32
  log-sum-exp and target logit (N,) are kept. A chunk is 2^26 logits (128 MB in bf16, R =
  1,335 at V = 50,257): every chunk rereads all of W, and with fewer rows the matmuls,
  grad_W's above all (its inner dimension is R), run well below the CPU's peak.
- Inside a chunk the fp32 work (log-sum-exp, softmax - one_hot) runs a block of rows at a
  time, ~4 MB of fp32 on a CPU so that it stays in cache, the whole chunk on an accelerator.
- Gradients. For "sum" and "mean" the loss is a scalar, so every token's gradient weight is
  known in forward (1 where scored, 0 where ignored) up to the one scalar that backward
  brings: forward turns each chunk's logits into softmax - one_hot in place and adds it into
  grad_x (N, C) and grad_W (V, C) right away, and backward only scales them (the design of
  Liger-Kernel's fused linear cross-entropy). That is the three matmuls of the unfused layer;
  nothing is recomputed. For "none" each token's upstream gradient is only known in
  backward, which recomputes each chunk's logits from x and W: one extra matmul.

The loss is the usual formula's in fp32 (the fp32 view of bf16 logits is exact). Under
autocast the gradients differ from it by the bf16 rounding of each (R, V) gradient chunk
before its matmuls, as they would under autocast anyway; grad_W's chunks are summed in fp32.
Rows of W past `vocab` (padding) are never scored and get zero gradient.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _rows_per_chunk(vocab: int) -> int:
    # (R, V) logits per matmul: 2^26 elements, 128 MB in bf16; R = 1,335 at V = 50,257.
    return max(1, 2**26 // vocab)


def _rows_per_block(vocab: int, device: torch.device) -> int:
    # (r, V) fp32 per elementwise pass: ~4 MB on a CPU (cache-sized), a whole chunk elsewhere.
    elements = 2**20 if device.type == "cpu" else 2**26
    return max(1, elements // vocab)


def _chunk_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, target_logit: torch.Tensor | None,
            scale: torch.Tensor | None) -> None:
    """One chunk: logits (R, V) in the matmul's dtype, targets (R,) in [0, V).

    Fills target_logit (R,) and lse (R,) in fp32, unless target_logit is None: then lse is
    known. When scale (R,) is given, overwrites logits in place with scale * (softmax - one_hot),
    the chunk's gradient of scale-weighted per-token losses."""
    if target_logit is not None:
        target_logit.copy_(logits.gather(1, targets[:, None]).squeeze(1))
    rows = _rows_per_block(logits.size(1), logits.device)
    for r in range(0, logits.size(0), rows):
        block = logits[r: r + rows]  # (r, V)
        f = block.float()  # the block itself when fp32, else an fp32 copy
        if target_logit is not None:
            lse[r: r + rows] = torch.logsumexp(f, dim=-1)
        if scale is not None:
            probs = f.sub_(lse[r: r + rows, None]).exp_()  # softmax (r, V)
            probs[torch.arange(probs.size(0), device=probs.device), targets[r: r + rows]] -= 1.0
            probs.mul_(scale[r: r + rows, None])
            if probs.data_ptr() != block.data_ptr():
                block.copy_(probs)


def _chunked(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
             target_logit: torch.Tensor | None, scale: torch.Tensor | None, grad_x: torch.Tensor | None,
             grad_w: torch.Tensor | None) -> None:
    """x (N, C), w (V, C) in the matmul's dtype, targets (N,) in [0, V): the loop over chunks of rows.

    Fills lse and target_logit (N,) as `_chunk_` does; when scale (N,) is given, writes
    grad_x (N, C) and adds into grad_w (V, C) fp32 the gradients of sum(scale * losses)."""
    N, V = x.size(0), w.size(0)
    rows = max(1, min(N, _rows_per_chunk(V)))
    buffer = x.new_empty(rows, V)  # one (R, V) logits buffer for all chunks: no allocation per chunk
    product = w.new_empty(w.shape) if grad_w is not None and grad_w.dtype != w.dtype else None  # (V, C)
    for r in range(0, N, rows):
        xc = x[r: r + rows]  # (R, C)
        logits = torch.mm(xc, w.t(), out=buffer[: xc.size(0)])  # (R, V)
        _chunk_(logits, targets[r: r + rows], lse[r: r + rows],
                None if target_logit is None else target_logit[r: r + rows],
                None if scale is None else scale[r: r + rows])
        if scale is None:
            continue
        if grad_x is not None:
            torch.mm(logits, w, out=grad_x[r: r + rows])
        if product is not None:  # a bf16 product per chunk, summed in fp32
            grad_w.add_(torch.mm(logits.t(), xc, out=product))
        elif grad_w is not None:
            grad_w.addmm_(logits.t(), xc)


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
        grad_x = torch.empty_like(x) if grads_now and needs_x else None  # (N, C)
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if grads_now and needs_w else None)  # (V_padded, C)
        lse = torch.empty(N, dtype=torch.float32, device=x.device)  # (N,) log-sum-exp of each row
        target_logit = torch.empty(N, dtype=torch.float32, device=x.device)  # (N,)
        _chunked(x, w, safe_targets, lse, target_logit, valid.float() if grads_now else None, grad_x,
                 None if grad_w is None else grad_w[:vocab])
        losses = (lse - target_logit) * valid  # (N,)
        ctx.vocab, ctx.summed, ctx.weight_dtype = vocab, summed, weight.dtype
        if grads_now:  # made for a unit upstream gradient; backward scales them
            ctx.save_for_backward(grad_x, grad_w)
        elif needs_x or needs_w:
            ctx.save_for_backward(x, weight, lse, safe_targets, valid)
        return losses.sum() if summed else losses

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.summed:
            grad_x, grad_w = ctx.saved_tensors
            grad_x = None if grad_x is None else grad_x * grad_out.to(grad_x.dtype)
            grad_w = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
            return grad_x, grad_w, None, None, None
        x, weight, lse, safe_targets, valid = ctx.saved_tensors  # recompute each chunk's logits
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if ctx.needs_input_grad[1] else None)  # (V_padded, C)
        scale = grad_out.float() * valid  # (N,): d loss / d (per-token loss), 0 where ignored
        _chunked(x, weight[: ctx.vocab].to(x.dtype), safe_targets, lse, None, scale, grad_x,
                 None if grad_w is None else grad_w[: ctx.vocab])
        return grad_x, None if grad_w is None else grad_w.to(ctx.weight_dtype), None, None, None


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
