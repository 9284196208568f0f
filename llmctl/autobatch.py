"""`micro_batch_size = "auto"`: the largest micro-batch that fits, with the global batch unchanged.

`batch_size` (sequences per optimizer step) is part of the recipe; the micro-batch is only
how that step is cut into forward passes, so "auto" picks it per machine: the candidates are
the divisors of the per-process batch (batch_size / processes), and accumulation makes up
the rest. On CUDA each candidate is tried for real — one forward and backward of the model
on `max_seq_len` tokens, in the training dtype — from a binary search over the divisors; it
fits when that succeeds and its peak memory plus AdamW's two fp32 moments per parameter
stays within 90% of the GPU. Elsewhere there is no out-of-memory signal worth trusting (a
CPU swaps, MPS shares system memory), so "auto" takes the largest divisor whose micro-batch
holds at most CPU_TOKENS_PER_MICRO_BATCH tokens.

Under torchrun every process probes its own GPU and all take the smallest answer (they must
accumulate alike). The probe runs before FSDP shards the model, so with `run.distributed =
"fsdp"` it errs small. A resumed run keeps the micro-batch it started with (its checkpoints'
config records the number), so the data order, which depends on it, continues exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from llmctl.config import AUTO, Config
from llmctl.errors import LlmctlError
from llmctl.runtime import DistInfo, autocast

HEADROOM = 0.9  # of the GPU's memory: allocator fragmentation and the compiled graph's workspace
# CPU tokens/s is flat up to 16 x 256 tokens a micro-batch and falls beyond, while memory grows
# throughout (benchmarks/RESULTS.md).
CPU_TOKENS_PER_MICRO_BATCH = 4096
ADAM_BYTES_PER_PARAM = 8  # exp_avg and exp_avg_sq in fp32


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def largest_that_fits(candidates: list[int], fits: Callable[[int], bool]) -> int | None:
    """The largest candidate for which `fits` holds, assuming that fitting is monotone (a
    smaller micro-batch never needs more memory). Binary search: O(log n) tries."""
    ordered = sorted(candidates)
    lo, hi, best = 0, len(ordered) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(ordered[mid]):
            best, lo = ordered[mid], mid + 1
        else:
            hi = mid - 1
    return best


def cuda_fits(model: torch.nn.Module, seq_len: int, vocab_size: int, device: torch.device,
              dtype: torch.dtype) -> Callable[[int], bool]:
    """`fits(m)`: does a training step of micro-batch m fit this GPU, optimizer state included?"""
    params = sum(p.numel() for p in model.parameters())
    total = torch.cuda.get_device_properties(device).total_memory
    budget = HEADROOM * total - ADAM_BYTES_PER_PARAM * params

    def fits(micro: int) -> bool:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        loss = idx = None
        try:
            # The probe must not move the training run's random streams (dropout, data order).
            with torch.random.fork_rng(devices=[device]):
                idx = torch.randint(0, vocab_size, (micro, seq_len), device=device)
                with autocast(device, dtype):
                    loss = model(idx, idx)
                loss.backward()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        except torch.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            loss = idx = None
            torch.cuda.empty_cache()
        return peak <= budget
    return fits


def resolve_micro_batch(setting: int | str, batch_size: int, world_size: int, model: torch.nn.Module,
                        seq_len: int, device: torch.device, dtype: torch.dtype, section: str,
                        resumed_with: int | None = None) -> int:
    """The micro-batch to train with: `setting` itself when it is a number, else (for "auto")
    the one the resumed run used, else the largest that fits this device."""
    if setting != AUTO:
        return int(setting)
    if resumed_with is not None:
        return resumed_with
    if batch_size % world_size:
        raise LlmctlError(f"{section}.batch_size ({batch_size}) must be divisible by the {world_size} processes")
    per_rank = batch_size // world_size
    candidates = divisors_descending(per_rank)
    if device.type != "cuda":
        return next(d for d in candidates if d * seq_len <= CPU_TOKENS_PER_MICRO_BATCH or d == 1)
    was_training = model.training
    model.train()
    try:
        best = largest_that_fits(candidates, cuda_fits(model, seq_len, model.vocab_size, device, dtype))
    finally:
        model.train(was_training)
    if best is None:
        raise LlmctlError(f"{section}.micro_batch_size=\"auto\": not even one sequence of {seq_len} tokens fits "
                          f"on {torch.cuda.get_device_name(device)} with AdamW's state; lower {section}.seq_len, "
                          f"set model.gradient_checkpointing=true, or use a smaller model")
    return best


def with_micro_batch(cfg: Config, stage: str, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                     dist: DistInfo, resumed_config: dict[str, Any] | None) -> Config:
    """`cfg` with `<stage>.micro_batch_size` a number: resolved here when it is "auto" (see
    `resolve_micro_batch`). `resumed_config` is the checkpoint's config when resuming."""
    train = getattr(cfg, stage)
    if train.micro_batch_size != AUTO:
        return cfg
    saved = (resumed_config or {}).get(stage, {}).get("micro_batch_size")
    micro = resolve_micro_batch(AUTO, train.batch_size, dist.world_size, model, cfg.train_seq_len(stage), device,
                                dtype, stage, resumed_with=saved if isinstance(saved, int) else None)
    if dist.enabled:  # every rank must accumulate the same number of micro-batches: the smallest wins
        found = torch.tensor([micro], device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MIN)
        micro = int(found.item())
    return dataclasses.replace(cfg, **{stage: dataclasses.replace(train, micro_batch_size=micro)})
