"""How repetitive are samples: distinct-n of sampled text with and without the counted n-grams.

A checkpoint whose config mixes counts into its predictions (`model.ngram_order`,
`model.cache_weight`) can sample from the network alone, from the network mixed with the
training text's n-grams, or with those and the window cache (`llmctl generate --counts
off|ngram|all`). This samples `--samples` continuations of `--tokens` tokens for each, at
`llmctl generate`'s defaults otherwise (temperature 0.8, top-p 0.95, no repetition penalty),
from prompts cut out of held-out text (32 tokens each, evenly spaced), with the same seeds.

Distinct-n = distinct n-grams / n-grams within one sample, averaged over samples (Li et al.,
2016): a sample that loops scores low. The held-out text itself, cut into pieces of the same
length, is the reference a fluent sample should come near.

    python benchmarks/bench_samples.py --checkpoint experiments/runs/cpu-10m
    python benchmarks/bench_samples.py --checkpoint RUN --heldout heldout.txt --samples 20 --tokens 200

Without --heldout the prompts come from the last articles of WikiText-2's validation file
(the articles benchmarks/sweep_local.py holds out of training).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep_local import split  # noqa: E402

from llmctl.generate import complete  # noqa: E402
from llmctl.loading import load_model  # noqa: E402

PROMPT_TOKENS = 32
ORDERS = (1, 2, 3, 4)


def distinct(ids: list[int], n: int) -> float:
    grams = [tuple(ids[i: i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_distinct(samples: list[list[int]]) -> dict[int, float]:
    return {n: sum(distinct(s, n) for s in samples) / len(samples) for n in ORDERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="an llmctl checkpoint or run directory")
    parser.add_argument("--heldout", help="text the model did not train on (default: sweep_local's held-out articles)")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--dtype", default="float32")
    a = parser.parse_args()

    loaded = load_model(a.checkpoint, device="cpu", dtype=a.dtype)
    if a.heldout:
        text = Path(a.heldout).read_text(encoding="utf-8")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            text = split(Path(tmp))[1].read_text(encoding="utf-8")
    ids = loaded.tokenizer.encode(text)
    span = PROMPT_TOKENS + a.tokens
    if len(ids) < a.samples * span:
        raise SystemExit(f"{len(ids)} held-out tokens: too few for {a.samples} prompts of {span}")
    starts = [i * (len(ids) - span) // max(a.samples - 1, 1) for i in range(a.samples)]
    prompts = [loaded.tokenizer.decode(ids[s: s + PROMPT_TOKENS]) for s in starts]
    reference = [ids[s + PROMPT_TOKENS: s + span] for s in starts]

    modes = ["off"] + (["ngram", "all"] if loaded.counts is not None else [])
    print(f"{a.checkpoint}: {a.samples} samples of {a.tokens} tokens, temperature 0.8, top-p 0.95, "
          f"prompts of {PROMPT_TOKENS} held-out tokens")
    header = "  ".join(f"distinct-{n}" for n in ORDERS)
    print(f"{'sampled from':34s}  {header}  tokens/s")
    rows = {}
    for mode in modes:
        start, produced, samples = time.perf_counter(), 0, []
        for i, prompt in enumerate(prompts):
            result = complete(loaded, prompt, max_new_tokens=a.tokens, seed=i, counts=mode)
            samples.append(result.token_ids)
            produced += result.tokens
        rows[mode] = mean_distinct(samples)
        name = {"off": "network (--counts off)", "ngram": "network + n-grams (--counts ngram)",
                "all": "network + n-grams + cache (all)"}[mode]
        cells = "  ".join(f"{rows[mode][n]:10.3f}" for n in ORDERS)
        print(f"{name:34s}  {cells}  {produced / (time.perf_counter() - start):8.1f}")
    cells = "  ".join(f"{v:10.3f}" for v in mean_distinct(reference).values())
    print(f"{'held-out text itself':34s}  {cells}")
    print("sample 0 of each:")
    for mode in modes:
        result = complete(loaded, prompts[0], max_new_tokens=a.tokens, seed=0, counts=mode)
        print(f"--- {mode}: {prompts[0]!r} ->\n{result.text[:600]}")


if __name__ == "__main__":
    main()
