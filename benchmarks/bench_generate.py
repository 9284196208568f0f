"""Generation and evaluation speed: llmctl's KV cache against no cache and against transformers.

The model has the `local` preset's shape — 6 layers, 384 wide, 6 query heads, 2 key/value
heads — with the GPT-2 vocabulary (50,257, unpadded so the weights map one to one onto
transformers' LlamaForCausalLM) and a 1,024-token context, so a 512-token prompt plus the new
tokens fits without sliding. Weights are random: speed does not depend on them.

Generation, greedy, `--new-tokens` new tokens after a prompt of each `--prompts` length:
- llmctl KV cache: `llmctl.generate.token_stream` (prefill once, then one token per step).
- llmctl no cache: the same with `use_cache=False` (re-runs the whole sequence every token,
  logits for the last position only).
- transformers: LlamaForCausalLM holding the same tensors, `generate(do_sample=False)` with
  its own cache. The three outputs are checked to be the same tokens.
Evaluation: `evaluate_tokens` (the scorer of `llmctl eval`) over `--eval-tokens` tokens,
for llmctl's model and for the Llama copy behind `TransformersLM`; their losses must agree.

The machine's speed drifts, so the sides run interleaved (A B C A B C ...) and the figures
are medians; compare ratios, not absolute numbers, across machines.

    python benchmarks/bench_generate.py [--rounds 3] [--new-tokens 64] [--prompts 64,512]
                                        [--device auto] [--dtype float32] [--threads 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from llmctl.config import ModelConfig
from llmctl.evaluate import evaluate_tokens
from llmctl.generate import Sampling, token_stream
from llmctl.loading import TransformersLM
from llmctl.export import llama_state_dict
from llmctl.model import Transformer
from llmctl.runtime import autocast, resolve_device, resolve_dtype

SHAPE = dict(vocab_size=50257, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=1024,
             pad_vocab_multiple=1)


def build_models(device: torch.device) -> tuple[Transformer, torch.nn.Module]:
    """llmctl's Transformer and a LlamaForCausalLM holding the very same tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPE)
    ours = Transformer(cfg).eval()
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                         intermediate_size=ours.blocks[0].mlp.hidden, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                         max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                         tie_word_embeddings=True, attn_implementation="sdpa")
    hf = LlamaForCausalLM(config).eval()
    hf.load_state_dict(llama_state_dict(ours), strict=False)
    hf.tie_weights()
    return ours.to(device), hf.to(device)


def time_generation(fn, rounds_out: list[float]) -> list[int]:
    start = time.perf_counter()
    out = fn()
    rounds_out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", default="64,512", help="prompt lengths, comma separated")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default); 1 is steadier on a shared machine")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    ours, hf = build_models(device)
    wrapped = TransformersLM(hf)
    rng = np.random.default_rng(0)
    greedy = Sampling(max_new_tokens=args.new_tokens, temperature=0)
    N = args.new_tokens

    generation = {}
    for P in [int(p) for p in args.prompts.split(",")]:
        prompt = rng.integers(0, SHAPE["vocab_size"], P).tolist()

        def cached() -> list[int]:
            return list(token_stream(ours, prompt, greedy, torch.Generator(), context_length=SHAPE["max_seq_len"],
                                     dtype=dtype))

        def uncached() -> list[int]:
            return list(token_stream(ours, prompt, greedy, torch.Generator(), context_length=SHAPE["max_seq_len"],
                                     dtype=dtype, use_cache=False))

        def transformers_generate() -> list[int]:
            ids = torch.tensor([prompt], device=device)
            with torch.no_grad(), autocast(device, dtype):
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                                  do_sample=False, pad_token_id=0)
            return out[0, P:].tolist()

        times: dict[str, list[float]] = {"cache": [], "no_cache": [], "transformers": []}
        cached()  # warm-up: allocator, first-call kernels
        outputs = {}
        for _ in range(args.rounds):
            outputs["cache"] = time_generation(cached, times["cache"])
            outputs["no_cache"] = time_generation(uncached, times["no_cache"])
            outputs["transformers"] = time_generation(transformers_generate, times["transformers"])
        tps = {k: N / statistics.median(v) for k, v in times.items()}
        generation[P] = {
            "tokens_per_sec": tps,
            "cache_vs_no_cache": tps["cache"] / tps["no_cache"],
            "cache_vs_transformers": tps["cache"] / tps["transformers"],
            "same_tokens": outputs["cache"] == outputs["no_cache"] == outputs["transformers"],
            "rounds_seconds": times,
        }

    tokens = rng.integers(0, SHAPE["vocab_size"], args.eval_tokens + 1).astype(np.uint16)
    seq = SHAPE["max_seq_len"]
    evals: dict[str, list[dict]] = {"llmctl": [], "transformers": []}
    for _ in range(args.rounds):
        for name, model in (("llmctl", ours), ("transformers", wrapped)):
            evals[name].append(evaluate_tokens(model, tokens, seq, args.eval_batch, device, autocast(device, dtype)))
    evaluation = {name: {"tokens_per_sec": statistics.median(r["tokens"] / r["seconds"] for r in runs),
                         "loss": runs[0]["loss"]} for name, runs in evals.items()}

    result = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "shape": SHAPE, "new_tokens": N, "generation": generation, "eval": evaluation,
              "eval_tokens": args.eval_tokens, "eval_batch": args.eval_batch}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{device} {result['dtype']}, {result['threads']} threads; shape {SHAPE}; {N} new tokens, greedy")
    for P, g in generation.items():
        t = g["tokens_per_sec"]
        print(f"prompt {P:4d}: KV cache {t['cache']:8,.1f} tok/s | no cache {t['no_cache']:8,.1f} tok/s | "
              f"transformers generate {t['transformers']:8,.1f} tok/s | cache/no-cache {g['cache_vs_no_cache']:5.1f}x "
              f"| cache/transformers {g['cache_vs_transformers']:4.2f}x | same tokens: {g['same_tokens']}")
    for name, e in evaluation.items():
        print(f"eval {name:12s} {e['tokens_per_sec']:10,.0f} tokens/s (context {seq}, batch {args.eval_batch}), "
              f"loss {e['loss']:.5f}")


if __name__ == "__main__":
    main()
