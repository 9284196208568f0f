"""Peak memory and time of one training step's output layer + loss: plain, fused, chunked.

One step is forward and backward of `x @ W.T` (x: N x d_model, W: vocab x d_model) and its
mean cross-entropy against N targets, with grads for x and W, in fp32 and under bf16
autocast (fp32 W, as a master weight is). Three implementations:
- plain: `F.cross_entropy(F.linear(x, W).float(), y)`, what a user writes by hand.
- fused (before): llmctl's previous `_LinearCrossEntropy`, copied below as the baseline: the
  (N, V) logits kept once in the matmul's dtype, an (N, V) gradient in backward.
- chunked (now): `llmctl.cross_entropy.linear_cross_entropy`, no (N, V) tensor; and the same
  with reduction="none" then a mean (the path of the pointer and n-gram mixtures), whose
  backward recomputes the logits.

Each (implementation, dtype) runs in a fresh subprocess: peak memory is the process's
high-water RSS (`ru_maxrss`) minus its RSS once torch is loaded and the inputs exist, so it
counts everything the step allocates, the gradients of x and W included (the "grads alone"
line is that floor). Time is the fastest of `--steps` steps after one warm-up step, over
`--rounds` rounds that run the implementations interleaved (A B C A B C ...): on a shared
machine other processes only ever slow a step down, so the fastest is the least disturbed;
compare ratios. `--tokens 16384` is the size the design aims at (the plain fp32 step then
needs ~10 GB); the default is smaller to finish in about two minutes on two cores.

    python benchmarks/bench_cross_entropy.py [--tokens 4096] [--d-model 768] [--vocab 50257]
                                            [--dtypes float32,bfloat16] [--rounds 1] [--steps 1]
                                            [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VARIANTS = ("plain", "fused", "chunked", "chunked_none")
LABELS = {"plain": "plain F.linear + F.cross_entropy", "fused": "fused, before (full logits)",
          "chunked": "chunked, now", "chunked_none": "chunked, now, reduction='none'"}


# --- The previous implementation, kept as the measured baseline. ---

def _old_rows_per_block(vocab: int, device: torch.device) -> int:
    elements = 2**20 if device.type == "cpu" else 2**26
    return max(1, elements // vocab)


class _OldLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, vocab):
        w = weight[:vocab].to(x.dtype)
        logits = x @ w.t()  # (N, V), kept for backward
        N = logits.size(0)
        rows = _old_rows_per_block(vocab, logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        for r in range(0, N, rows):
            lse[r: r + rows] = torch.logsumexp(logits[r: r + rows].float(), dim=-1)
        valid = targets != -100
        safe_targets = targets.clamp(min=0)
        target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
        ctx.vocab = vocab
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(x, weight, logits, lse, safe_targets, valid)
        return (lse - target_logit) * valid

    @staticmethod
    def backward(ctx, grad_losses):
        x, weight, logits, lse, safe_targets, valid = ctx.saved_tensors
        N = logits.size(0)
        scale = grad_losses.float() * valid
        grad_logits = torch.empty_like(logits)  # (N, V)
        rows = _old_rows_per_block(ctx.vocab, logits.device)
        for r in range(0, N, rows):
            probs = logits[r: r + rows].to(torch.float32, copy=True).sub_(lse[r: r + rows, None]).exp_()
            n = probs.size(0)
            probs[torch.arange(n, device=probs.device), safe_targets[r: r + rows]] -= 1.0
            grad_logits[r: r + rows] = probs.mul_(scale[r: r + rows, None])
        w = weight[: ctx.vocab].to(x.dtype)
        grad_x = grad_logits @ w if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            grad_weight[: ctx.vocab] = grad_logits.t() @ x
        return grad_x, grad_weight, None, None


def _old_linear_cross_entropy(x, weight, targets, vocab):
    if torch.is_autocast_enabled("cpu"):
        x = x.to(torch.get_autocast_dtype("cpu"))
    with torch.autocast("cpu", enabled=False):
        losses = _OldLinearCrossEntropy.apply(x, weight, targets, vocab)
    return losses.sum() / (targets != -100).sum()


# --- One measurement, in a fresh process. ---

def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # not Linux: the high-water mark so far stands in
        return _maxrss_mb()


def _maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10  # bytes on macOS, KiB elsewhere


def measure(variant: str, dtype: str, tokens: int, d_model: int, vocab: int, steps: int,
            device: str = "cpu") -> dict:
    from llmctl.cross_entropy import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_model, generator=g).to(device).requires_grad_()
    weight = (torch.randn(vocab, d_model, generator=g) * d_model**-0.5).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    cuda = device.startswith("cuda")
    loss_fn = {"plain": lambda: F.cross_entropy(F.linear(x, weight).float(), targets),
               "fused": lambda: _old_linear_cross_entropy(x, weight, targets, vocab),
               "chunked": lambda: linear_cross_entropy(x, weight, targets, vocab),
               "chunked_none": lambda: linear_cross_entropy(x, weight, targets, vocab, "none").mean()}[variant]
    if cuda:  # the allocator's own high-water mark, over what the inputs already hold
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = _rss_mb()
    times, loss = [], None
    for _ in range(steps + 1):
        x.grad = weight.grad = None  # a step after zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast(x.device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = loss_fn()
        loss.backward()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _maxrss_mb()
    return {"variant": variant, "dtype": dtype, "loss": loss.item(), "peak_mb": peak - before,
            "step_s": min(times[1:]), "grad_x_norm": x.grad.norm().item(),
            "grad_w_norm": weight.grad.norm().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="N, tokens in the micro-batch")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per implementation, interleaved")
    parser.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step, per process")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (peak = the allocator's high-water mark)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = dict(tokens=args.tokens, d_model=args.d_model, vocab=args.vocab, steps=args.steps, device=args.device)
    if args.child:
        print(json.dumps(measure(*args.child, **shape)))
        return

    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for dtype in args.dtypes.split(","):
            for variant in args.variants.split(","):
                cmd = [sys.executable, __file__, "--child", variant, dtype, "--tokens", str(args.tokens),
                       "--d-model", str(args.d_model), "--vocab", str(args.vocab), "--steps", str(args.steps),
                       "--device", args.device]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs.setdefault((dtype, variant), []).append(json.loads(out.splitlines()[-1]))
    rows = [dict(same[0], peak_mb=min(r["peak_mb"] for r in same), step_s=min(r["step_s"] for r in same))
            for same in runs.values()]
    if args.json:
        print(json.dumps(rows))
        return
    N, C, V = args.tokens, args.d_model, args.vocab
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; N = {N:,} tokens, d_model {C}, "
          f"vocab {V:,}; one step = forward + backward, grads for x and W; "
          f"best of {args.rounds} x {args.steps}")
    print(f"(N, V) fp32 = {N * V * 4 / 2**20:,.0f} MB; grads alone (x and W, fp32) = {(N + V) * C * 4 / 2**20:,.0f} MB")
    print(f"{'dtype':9} {'implementation':34} {'peak MB':>8} {'step s':>7} {'mem/fused':>9} {'mem/plain':>9} "
          f"{'time/fused':>10} {'time/plain':>10}  loss")
    for row in rows:
        same = {r["variant"]: r for r in rows if r["dtype"] == row["dtype"]}
        ratios = []
        for base in ("fused", "plain"):
            ratios.append(f"{row['peak_mb'] / same[base]['peak_mb']:.2f}" if base in same else "-")
        for base in ("fused", "plain"):
            ratios.append(f"{row['step_s'] / same[base]['step_s']:.2f}" if base in same else "-")
        print(f"{row['dtype']:9} {LABELS[row['variant']]:34} {row['peak_mb']:8,.0f} {row['step_s']:7.2f} "
              f"{ratios[0]:>9} {ratios[1]:>9} {ratios[2]:>10} {ratios[3]:>10}  {row['loss']:.5f}")


if __name__ == "__main__":
    main()
