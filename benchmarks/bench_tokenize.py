"""GPT-2 encoding speed: llmctl.data.fastbpe's piece cache against well-kept libraries.

The corpus is real text from ../shared/data: the documents of WikiText-2 (validation) and the
TinyStories sample (1.15 MB), split as `text:FILE` splits them (blank-line blocks), repeated
to `--mb` megabytes; `--more-text` adds Tiny Shakespeare and Dolly (3.6 MB distinct). Every encoder gets the same documents in the batches the token store
hands its tokenizer (`llmctl.data.shards._batches`) and must give the same ids as the
`tokenizers` library; the benchmark fails if any id differs.

- fastbpe: `plan()` once (timed apart, as `setup`), then `FastEncoder.encode_batch` per
  batch, as a store worker calls it.
- tokenizers: the GPT-2 `tokenizer.json` loaded with `Tokenizer.from_str`, then
  `encode_batch_fast(batch, add_special_tokens=False)` per batch, as a store worker calls it.
- tiktoken: its `gpt2` encoding, built here from the same `vocab.json` and `merges.txt`
  (tiktoken's own loader downloads them, which fails offline), then
  `encode_batch(batch, num_threads=1, allowed_special="all")` (GPT-2's `<|endoftext|>` in
  the text is the special token, as in the other two). Skipped with a message when
  tiktoken is not installed.

One thread each: the store runs one encoder per core, each in its own worker process with
the tokenizer's thread pool off, so the rate per core is what decides preparation time.
`TOKENIZERS_PARALLELISM=false` and `RAYON_NUM_THREADS=1` are set before any import. The
cores are shared, so rates are tokens per CPU-second of this process (the steadier clock for
one-thread work); the wall-clock rate of all passes is printed beside them.

Both caches matter: fastbpe keeps ids per regex piece, `tokenizers` keeps a word cache of
its own. Each round builds every encoder afresh, so its first pass over the distinct text
starts cold (`cold`); the passes after it read text the caches have seen (`warm`, the
state a long preparation approaches on Zipfian text, an upper bound for any cache). The
encoders run interleaved, `--rounds` times; the figures are medians.

    python benchmarks/bench_tokenize.py [--mb 4] [--rounds 3] [--more-text] [--json]
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files, write no cache

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("LLMCTL_SHARED_DATA", REPO.parent / "shared" / "data"))
GPT2 = SHARED / "tokenizers" / "gpt2"
TEXTS = [f"text:{SHARED / 'wikitext-2-raw' / 'wiki.valid.raw'}", f"text:{SHARED / 'tinystories' / 'tinystories_sample.txt'}"]
# --more-text: 2.5 MB more of other genres, so that a longer first pass runs on text never seen
MORE_TEXTS = [f"text:{SHARED / 'tinyshakespeare' / 'input.txt'}", f"jsonl:{SHARED / 'sft' / 'dolly_open_qa.jsonl'}"]

Encode = Callable[[list[str]], list[list[int]]]


def documents(specs: list[str]) -> list[str]:
    from llmctl.data.sources import iter_documents, parse_spec

    return [d for spec in specs for d in iter_documents(parse_spec(spec))]


def make_fastbpe(tokenizer_json: str) -> tuple[Encode, float] | str:
    from tokenizers import Tokenizer

    from llmctl.data.fastbpe import FastEncoder, plan

    backend = Tokenizer.from_str(tokenizer_json)
    start = time.perf_counter()
    planned = plan(tokenizer_json, backend)
    setup = time.perf_counter() - start
    if planned is None:
        return "fastbpe refused this tokenizer (plan() is None)"
    return FastEncoder(backend, planned).encode_batch, setup


def make_tokenizers(tokenizer_json: str) -> tuple[Encode, float]:
    from tokenizers import Tokenizer

    start = time.perf_counter()
    backend = Tokenizer.from_str(tokenizer_json)
    setup = time.perf_counter() - start

    def encode(batch: list[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]
    return encode, setup


def make_tiktoken(tokenizer_json: str) -> tuple[Encode, float] | str:
    try:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        return "tiktoken is not installed (pip install tiktoken)"
    start = time.perf_counter()
    ranks = data_gym_to_mergeable_bpe_ranks(str(GPT2 / "merges.txt"), str(GPT2 / "vocab.json"))
    enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    setup = time.perf_counter() - start

    def encode(batch: list[str]) -> list[list[int]]:
        return enc.encode_batch(batch, num_threads=1, allowed_special="all")
    return encode, setup


MAKERS = {"fastbpe": make_fastbpe, "tokenizers": make_tokenizers, "tiktoken": make_tiktoken}


def one_round(name: str, tokenizer_json: str, batches: list[list[str]], first_pass: int,
              reference: list[list[int]] | None) -> dict | str:
    made = MAKERS[name](tokenizer_json)
    if isinstance(made, str):
        return made
    encode, setup = made
    ids: list[list[int]] = []
    times = []  # (wall, CPU) seconds of the cold pass, then of the warm passes
    gc.disable()  # the ids kept for the check would make later collections ever slower
    try:
        for part in (batches[:first_pass], batches[first_pass:]):
            wall, cpu = time.perf_counter(), time.process_time()
            for batch in part:
                ids += encode(batch)
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
    finally:
        gc.enable()
    if reference is not None and ids != reference:
        bad = next(i for i, (a, b) in enumerate(zip(ids, reference)) if a != b)
        raise SystemExit(f"{name}: ids differ from tokenizers' at document {bad}")
    return {"setup": setup, "cold": times[0], "warm": times[1], "ids": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="megabytes of text (the real text, repeated)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the figures are medians")
    parser.add_argument("--more-text", action="store_true",
                        help="add Tiny Shakespeare and Dolly: 3.6 MB of distinct text in the first (cold) pass")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    from llmctl.data.shards import _batches

    docs = documents(TEXTS + (MORE_TEXTS if args.more_text else []))
    once = sum(len(d.encode()) for d in docs)
    repeats = max(2, round(args.mb * 1e6 / once))  # at least one warm pass
    first_pass = len(list(_batches(docs)))
    batches = list(_batches(docs)) * repeats
    tokenizer_json = (GPT2 / "tokenizer.json").read_text()

    runs: dict[str, list[dict]] = {"tokenizers": [], "fastbpe": [], "tiktoken": []}
    skipped: dict[str, str] = {}
    reference = None
    for _ in range(args.rounds):
        for name in runs:
            if name in skipped:
                continue
            result = one_round(name, tokenizer_json, batches, first_pass, reference)
            if isinstance(result, str):
                skipped[name] = result
                continue
            if reference is None:
                reference = result["ids"]
            runs[name].append(result)

    tokens = sum(map(len, reference))
    cold_tokens = sum(map(len, reference[:len(docs)]))
    figures = {}
    for name, results in runs.items():
        if not results:
            continue
        f: dict[str, float] = {"setup_s": statistics.median(r["setup"] for r in results)}
        for clock, c in (("cpu", 1), ("wall", 0)):
            cold = statistics.median(r["cold"][c] for r in results)
            warm = statistics.median(r["warm"][c] for r in results)
            f[f"cold_tokens_per_{clock}_s"] = cold_tokens / cold
            f[f"warm_tokens_per_{clock}_s"] = (tokens - cold_tokens) / warm
            f[f"all_tokens_per_{clock}_s"] = tokens / (cold + warm)
        figures[name] = f
    base = figures["tokenizers"]
    for f in figures.values():
        for k in ("cold", "warm", "all"):
            f[f"{k}_vs_tokenizers"] = f[f"{k}_tokens_per_cpu_s"] / base[f"{k}_tokens_per_cpu_s"]
    report = {"bytes": once * repeats, "distinct_bytes": once, "documents": len(docs) * repeats,
              "tokens": tokens, "threads": 1, "rounds": args.rounds, "ids_identical": True,
              "encoders": figures, "skipped": skipped}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{once * repeats / 1e6:.1f} MB ({once / 1e6:.2f} MB of distinct text x {repeats}), "
          f"{tokens:,} tokens, 1 thread each, median of {args.rounds} rounds; ids identical in every encoder")
    print("tokens per CPU-second (the cores are shared: CPU time is the steadier clock), all passes also per "
          "wall second; ratios on CPU time")
    print(f"{'encoder':<11} {'setup s':>8} {'cold':>11} {'warm':>11} {'all':>11} {'all, wall':>11}   "
          f"ratio to tokenizers (cold / warm / all)")
    for name, f in figures.items():
        print(f"{name:<11} {f['setup_s']:>8.2f} {f['cold_tokens_per_cpu_s']:>11,.0f} "
              f"{f['warm_tokens_per_cpu_s']:>11,.0f} {f['all_tokens_per_cpu_s']:>11,.0f} "
              f"{f['all_tokens_per_wall_s']:>11,.0f}   {f['cold_vs_tokenizers']:.2f}x / "
              f"{f['warm_vs_tokenizers']:.2f}x / {f['all_vs_tokenizers']:.2f}x")
    for name, why in skipped.items():
        print(f"{name}: skipped: {why}")


if __name__ == "__main__":
    main()
