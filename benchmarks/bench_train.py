"""Training throughput: llmctl's Trainer step against a plain transformers LlamaForCausalLM loop.

The shape is the nanoGPT reference of ../shared/design/PERFORMANCE.md: 6 layers, 6 heads,
384 wide, 256 context, vocabulary 8192, micro-batch 8 (13.8M parameters), bf16 autocast with
fp32 master weights where the CPU has native bf16, else fp32. Both sides start from the same
weights and take the same optimizer steps (AdamW, clipping at 1.0); the reference is what a
user writes by hand (`llmctl.bench.reference_step`). The machine's speed drifts by ±20% over
minutes, so the two run interleaved (A B A B ...) and the figure that matters is the ratio of
medians. This is the same measurement as

    llmctl bench --preset local --set model.vocab_size=8192 --set model.n_kv_heads=6 \\
        --set pretrain.batch_size=8 --set pretrain.micro_batch_size=8 --reference

    python benchmarks/bench_train.py [--rounds 4] [--steps 4] [--dtype auto|float32|bfloat16] [--compile] [--json]
"""

from __future__ import annotations

import argparse
import json

from llmctl.bench import run_bench
from llmctl.config import load_config

SHAPE = {"model.vocab_size": 8192, "model.d_model": 384, "model.n_layers": 6, "model.n_heads": 6,
         "model.n_kv_heads": 6, "model.max_seq_len": 256, "pretrain.batch_size": 8, "pretrain.micro_batch_size": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile llmctl's model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    overrides = [f"{k}={v}" for k, v in SHAPE.items()]
    overrides += [f'run.dtype="{args.dtype}"', f"run.compile={str(args.compile).lower()}", 'run.device="cpu"']
    cfg = load_config("local", overrides, run_name="bench")
    result = run_bench(cfg, steps=args.steps, warmup=2, reference=True, rounds=args.rounds)
    if args.json:
        print(json.dumps(result))
        return
    rounds = ", ".join(f"{x:,.0f}" for x in result["rounds_tokens_per_sec"])
    ref_rounds = ", ".join(f"{x:,.0f}" for x in result["reference_rounds_tokens_per_sec"])
    print(f"{result['device']}, {result['dtype']}{', compiled' if result['compiled'] else ''}, "
          f"{result['params']:,} parameters, micro-batch 8 x 256")
    print(f"llmctl Trainer step      {result['tokens_per_sec']:8,.0f} tokens/s  (rounds: {rounds})")
    print(f"transformers Llama loop  {result['reference_tokens_per_sec']:8,.0f} tokens/s  (rounds: {ref_rounds})")
    print(f"ratio llmctl / reference  {result['speedup']:.2f}x")
    print(f"llmctl MFU {result['mfu']:.1%} of the measured matmul peak ({result['peak_tflops'] * 1000:,.0f} GFLOP/s); "
          f"peak memory {result['peak_memory_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
