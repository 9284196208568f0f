"""`llmctl bench`: how fast does this preset train on this machine?

Runs real optimizer steps of the shared Trainer (same model, autocast, accumulation,
clipping and AdamW as `pretrain`) on synthetic tokens, after a warm-up that absorbs
compilation and allocator growth, and reports tokens/s, achieved FLOP/s, model FLOPs
utilisation (MFU) and peak memory.

FLOPs per token follow the PaLM appendix: 6·N for the matmuls of forward and backward
(N = all parameters; with tied embeddings the output projection is the only use of the
embedding matrix that costs FLOPs) plus 12·L·d·T for attention scores and values.
MFU divides achieved FLOP/s by the device's peak for the dtype in use: a table of
datasheet dense peaks for common NVIDIA GPUs, and on CPU a matmul peak measured on the
spot (there is no datasheet number worth trusting for a laptop's sustained throughput).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from llmctl.autobatch import with_micro_batch
from llmctl.config import Config
from llmctl.errors import ConfigError
from llmctl.model import Transformer
from llmctl.runtime import autocast, init_distributed, resolve_compile, resolve_dtype, seed_everything
from llmctl.trainer import Trainer

# Dense (no sparsity) peak TFLOP/s from NVIDIA datasheets: (bf16/fp16, tf32, fp32).
GPU_PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (989.0, 494.0, 67.0),
    "H100 SXM": (989.0, 494.0, 67.0),
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100": (989.0, 494.0, 67.0),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.0, 183.0, 91.6),
    "L4": (121.0, 60.0, 30.3),
    "A10": (125.0, 62.5, 31.2),
    "RTX 4090": (165.2, 82.6, 82.6),
    "RTX 3090": (71.0, 35.6, 35.6),
    "V100": (125.0, 15.7, 15.7),
    "T4": (65.0, 8.1, 8.1),
}


def flops_per_token(model: Transformer, seq_len: int = 0) -> float:
    """PaLM's count: 6 per parameter plus attention's scores and mixing over the span each
    token's attention reads (a block with model.attention_block, else the training sequence
    of seq_len tokens, default the model's window). The copy pointer's one
    64-wide head over the window is left out: under 1% of a 6 x 384 model's count."""
    cfg = model.cfg
    span = cfg.attention_block or seq_len or cfg.max_seq_len
    return 6.0 * model.num_parameters() + 12.0 * cfg.n_layers * cfg.d_model * span


def measure_cpu_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 1.5) -> float:
    """Sustained FLOP/s of a large square matmul in `dtype` on this CPU's threads."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(2):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2.0 * size**3 * n / (time.perf_counter() - start)


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s, where the number came from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32, fp32) in GPU_PEAK_TFLOPS.items():
            if key.replace(" ", "").lower() in name.replace(" ", "").lower():
                tflops = half if dtype in (torch.bfloat16, torch.float16) else (
                    tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32)
                return tflops * 1e12, f"{key} datasheet"
        return None, f"unknown GPU '{name}'"
    if device.type == "cpu":
        return measure_cpu_peak(dtype), "measured matmul peak"
    return None, f"no peak known for {device.type}"


class SyntheticBatches:
    """Uniform random token windows: the data path costs nothing, so the step is what is timed."""

    def __init__(self, vocab_size: int, micro_batch: int, seq_len: int, seed: int):
        self.vocab_size, self.shape = vocab_size, (micro_batch, seq_len + 1)
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randint(0, self.vocab_size, self.shape, generator=self.generator)
        return w[:, :-1], w[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS: the process's resident high-water mark.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


REFERENCE = ("transformers LlamaForCausalLM (sdpa attention), eager, same dtype, "
             "torch.optim.AdamW defaults, clip_grad_norm_")


def reference_step(model: Transformer, cfg: Config, device: torch.device, dtype: torch.dtype
                   ) -> Callable[[], torch.Tensor]:
    """One optimizer step of the same model written the way a user writes it by hand: a
    transformers `LlamaForCausalLM` holding `model`'s current weights (export's exact mapping;
    no dropout or attention sinks), the same micro-batch, accumulation, autocast dtype, clipping
    and AdamW hyper-parameters, but none of llmctl's speed work. Returns a function that runs
    one step and gives its mean loss."""
    from transformers import LlamaForCausalLM

    from llmctl.export import _quiet_transformers, hf_config, hf_state_dict

    _quiet_transformers()
    config = hf_config(model, eos_id=0, arch="llama")
    config._attn_implementation = "sdpa"
    reference = LlamaForCausalLM(config).to(device)
    reference.load_state_dict(hf_state_dict(model, "llama"), strict=False)  # lm_head is tied to the embedding
    reference.train()
    t = cfg.pretrain
    matrices = [p for p in reference.parameters() if p.dim() >= 2]
    others = [p for p in reference.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": t.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=t.lr, betas=tuple(t.betas))
    batches = SyntheticBatches(cfg.model.vocab_size, t.micro_batch_size, cfg.train_seq_len(), cfg.run.seed)
    accumulation = t.batch_size // t.micro_batch_size

    def step() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for _ in range(accumulation):
            x, y = (b.to(device) for b in batches.next_batch())
            with autocast(device, dtype):
                logits = reference(input_ids=x).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / accumulation
            loss.backward()
            total += loss.detach()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total  # the step's mean loss
    return step


def _timed(step: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of `step`, the device drained at both ends."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)  # wait for the device before stopping the clock
    _sync(device)
    return time.perf_counter() - start


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3, reference: bool = False,
              rounds: int = 1) -> dict[str, Any]:
    """Time `steps` optimizer steps of llmctl's Trainer after `warmup` untimed ones. With
    `reference`, also time the plain transformers loop of `reference_step` on the same shape,
    interleaved over `rounds` rounds (A B A B ...: the machine's speed drifts, so only
    interleaved figures compare), and report medians and their ratio."""
    if steps < 1 or warmup < 0 or rounds < 1:
        raise ConfigError(f"--steps and --rounds must be >= 1 and --warmup >= 0, got {steps}, {rounds} "
                          f"and {warmup}")
    if cfg.model.vocab_size == 0:
        from llmctl.data.tokenizer import planned_vocab_size
        from llmctl.pretrain import resolve_vocab

        # Synthetic tokens: train:V needs only V, not a trained tokenizer.
        cfg = resolve_vocab(cfg, planned_vocab_size(cfg.data))
    dist, device = init_distributed(cfg.run.device, cfg.run.distributed)  # under torchrun: DDP or FSDP2
    if reference and dist.enabled:
        raise ConfigError("--reference times a single-process loop; run it without torchrun")
    dtype = resolve_dtype(cfg.run.dtype, device)
    seed_everything(cfg.run.seed)
    model = Transformer(cfg.model).to(device)
    cfg = with_micro_batch(cfg, "pretrain", model, device, dtype, dist, None)
    seq_len = cfg.train_seq_len()
    batches = SyntheticBatches(cfg.model.vocab_size, cfg.pretrain.micro_batch_size, seq_len, cfg.run.seed)
    trainer = Trainer(model, cfg.pretrain, batches=batches, evaluate=None, device=device, dtype=dtype,
                      seq_len=seq_len, compile=resolve_compile(cfg.run.compile, device), dist=dist)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def ours() -> torch.Tensor:
        return trainer.train_step()[0]
    for _ in range(warmup):
        ours()
    tokens = steps * cfg.pretrain.batch_size * seq_len
    ours_rates = [tokens / _timed(ours, steps, device)]
    peak_memory = peak_memory_mb(device)  # before a reference model shares the process
    theirs_rates: list[float] = []
    if reference:
        theirs = reference_step(model, cfg, device, dtype)
        for _ in range(warmup):
            theirs()
        for r in range(rounds):
            if r:
                ours_rates.append(tokens / _timed(ours, steps, device))
            theirs_rates.append(tokens / _timed(theirs, steps, device))
    else:
        for _ in range(rounds - 1):
            ours_rates.append(tokens / _timed(ours, steps, device))
    tokens_per_sec = statistics.median(ours_rates)
    seconds = statistics.mean(tokens / rate for rate in ours_rates)  # per round of `steps` steps
    achieved = tokens_per_sec * flops_per_token(model, seq_len) / dist.world_size  # per device
    peak, peak_source = device_peak(device, dtype)
    comparison = {}
    if reference:
        theirs_rate = statistics.median(theirs_rates)
        comparison = {"reference": REFERENCE, "reference_tokens_per_sec": theirs_rate,
                      "speedup": tokens_per_sec / theirs_rate,
                      "rounds_tokens_per_sec": ours_rates, "reference_rounds_tokens_per_sec": theirs_rates}
    return {
        "device": _device_name(device), "dtype": str(dtype).removeprefix("torch."),
        "processes": dist.world_size, "distributed": dist.strategy if dist.enabled else None,
        "compiled": hasattr(trainer.forward_model, "_orig_mod"), "rank": dist.rank,
        "params": model.num_parameters(), "tokens_per_step": cfg.pretrain.batch_size * seq_len,
        "micro_batch_size": cfg.pretrain.micro_batch_size, "accumulation": trainer.accumulation,
        "steps": steps, "seconds": seconds, "tokens_per_sec": tokens_per_sec,
        "flops_per_token": flops_per_token(model, seq_len), "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak / 1e12 if peak else None, "peak_source": peak_source,
        "mfu": achieved / peak if peak else None, "peak_memory_mb": peak_memory, **comparison,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"
    return device.type
