"""Training throughput: llmctl's Trainer step against a plain transformers LlamaForCausalLM loop.

Same shape on both sides — the nanoGPT reference of PERFORMANCE.md: 6 layers, 6 heads, 384
wide, 256 context, vocabulary 8192, micro-batch 8 — same dtype (bf16 autocast with fp32
master weights where the CPU has native bf16, else fp32), same optimizer maths (AdamW,
clipping at 1.0). The reference is what a user would write by hand: eager model, default
AdamW, `loss.backward()`, `clip_grad_norm_`, `step`, `zero_grad`.

The machine's speed drifts by ±20% over minutes, so the two run interleaved (A B A B ...)
and the figure that matters is the ratio of medians.

    python benchmarks/bench_train.py [--rounds 4] [--steps 6] [--dtype auto|float32|bfloat16] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from llmctl.bench import flops_per_token, measure_cpu_peak, peak_memory_mb
from llmctl.config import ModelConfig, TrainConfig
from llmctl.model import Transformer
from llmctl.runtime import autocast, resolve_dtype
from llmctl.trainer import Trainer
from llmctl.bench import SyntheticBatches

SHAPE = dict(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, max_seq_len=256)
MICRO = 8


def llmctl_runner(dtype: torch.dtype, compile: bool):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE))
    cfg = TrainConfig(lr=3e-4, batch_size=MICRO, micro_batch_size=MICRO, warmup_steps=0, max_steps=10**9)
    trainer = Trainer(model, cfg, batches=SyntheticBatches(SHAPE["vocab_size"], MICRO, SHAPE["max_seq_len"], 0),
                      evaluate=None, device=torch.device("cpu"), dtype=dtype, seq_len=SHAPE["max_seq_len"],
                      compile=compile)

    def step() -> float:
        loss, _ = trainer.train_step()
        return float(loss)
    return step, flops_per_token(model)


def reference_runner(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["d_model"],
                         intermediate_size=1024, num_hidden_layers=SHAPE["n_layers"],
                         num_attention_heads=SHAPE["n_heads"], num_key_value_heads=SHAPE["n_kv_heads"],
                         max_position_embeddings=SHAPE["max_seq_len"], tie_word_embeddings=True,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    batches = SyntheticBatches(SHAPE["vocab_size"], MICRO, SHAPE["max_seq_len"], 0)
    ctx = autocast(torch.device("cpu"), dtype)

    def step() -> float:
        x, y = batches.next_batch()
        with ctx:
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)
    return step


def tokens_per_sec(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * MICRO * SHAPE["max_seq_len"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile llmctl's model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    ours, fpt = llmctl_runner(dtype, args.compile)
    ref = reference_runner(dtype)
    for fn in (ours, ref):  # warm-up: allocator, oneDNN primitive caches, compilation
        for _ in range(2):
            fn()
    a, b = [], []
    for _ in range(args.rounds):
        a.append(tokens_per_sec(ours, args.steps))
        b.append(tokens_per_sec(ref, args.steps))
    peak = measure_cpu_peak(dtype)
    result = {
        "shape": SHAPE, "micro_batch": MICRO, "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "llmctl_tokens_per_sec": statistics.median(a), "reference_tokens_per_sec": statistics.median(b),
        "ratio": statistics.median(a) / statistics.median(b),
        "llmctl_rounds": a, "reference_rounds": b,
        "measured_peak_gflops": peak / 1e9,
        "llmctl_mfu": statistics.median(a) * fpt / peak,
        "peak_memory_mb": peak_memory_mb(torch.device("cpu")),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"shape {SHAPE}, micro-batch {MICRO}, {result['dtype']}, {result['threads']} threads")
    print(f"llmctl Trainer step     {result['llmctl_tokens_per_sec']:8,.0f} tokens/s  "
          f"(rounds: {', '.join(f'{x:,.0f}' for x in a)})")
    print(f"transformers Llama loop {result['reference_tokens_per_sec']:8,.0f} tokens/s  "
          f"(rounds: {', '.join(f'{x:,.0f}' for x in b)})")
    print(f"ratio llmctl / reference  {result['ratio']:.2f}x")
    print(f"llmctl MFU {result['llmctl_mfu']:.1%} of the measured {result['dtype']} matmul peak "
          f"({result['measured_peak_gflops']:,.0f} GFLOP/s); peak RSS {result['peak_memory_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
