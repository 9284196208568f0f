"""Data preparation: llmctl's sharded token store against `datasets.map(tokenize, batched=True)`.

The corpus is real text repeated to size: the documents of WikiText-2 (validation), Tiny
Shakespeare and Dolly from ../shared/data, joined by blank lines, written again and again
into one file of `--mb` megabytes in a temporary folder (and a second file a tenth of that,
to see whether memory grows with the corpus). Both sides use the same GPT-2 tokenizer and
pack the same documents the same way (ids, then EOS), so their token counts must agree.

- llmctl: `prepare_store` on `text:FILE` (worker processes, shards, manifest), as
  `llmctl data prepare` runs it.
- baseline: what a user writes by hand: `load_dataset("text", sample_by="paragraph")`,
  `.map(tokenize, batched=True)` with the transformers fast tokenizer (its Rust thread pool
  on), then `np.concatenate` of every row into one array.

A caveat on the corpus: repetition keeps llmctl's piece cache (llmctl.data.fastbpe) warmer
than fresh text would; on distinct text the cache alone is worth ~1.7x per core instead of
~2.8x, and large real corpora (Zipfian words) sit in between.

Each side runs in a fresh interpreter; the clock covers the work only (not imports), and
peak RSS is sampled every 50 ms from /proc over the process and all its children (the
workers), summed. The machine is shared and drifts, so the two sides run interleaved when
`--rounds` > 1 and the figure that matters is the ratio of medians.

    python benchmarks/bench_data.py [--mb 200] [--rounds 1] [--workers 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LLMCTL_SHARED_DATA", REPO.parent / "shared" / "data"))
GPT2 = SHARED / "tokenizers" / "gpt2"

LLMCTL_SIDE = """
import json, resource, sys, time
from llmctl.config import DataConfig
from llmctl.data.store import prepare_store
from llmctl.data.tokenizer import load_tokenizer
corpus, cache, gpt2, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = load_tokenizer(gpt2)
def cpu():
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
cpu0, start = cpu(), time.perf_counter()
store = prepare_store(DataConfig(datasets=[f"text:{corpus}"], cache_dir=cache, num_workers=workers), tok)
seconds = time.perf_counter() - start
print(json.dumps({"tokens": sum(store.meta["tokens"].values()), "seconds": seconds, "cpu_seconds": cpu() - cpu0,
                  "shards": len(store.meta["shards"])}))
"""

BASELINE_SIDE = """
import json, resource, sys, time
import numpy as np
import datasets
from transformers import AutoTokenizer
corpus, cache, gpt2 = sys.argv[1], sys.argv[2], sys.argv[3]
datasets.disable_progress_bars()
tok = AutoTokenizer.from_pretrained(gpt2)
eos = tok.eos_token_id
def tokenize(batch):
    out = tok(batch["text"])
    return {"ids": [ids + [eos] for ids in out["input_ids"]]}
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
cpu0, start = cpu(), time.perf_counter()
ds = datasets.load_dataset("text", data_files=corpus, sample_by="paragraph", split="train", cache_dir=cache)
ds = ds.map(tokenize, batched=True, remove_columns=["text"])
ids = np.concatenate([np.asarray(row, dtype=np.uint16) for row in ds["ids"]])
seconds = time.perf_counter() - start
print(json.dumps({"tokens": int(ids.size), "seconds": seconds, "cpu_seconds": cpu() - cpu0}))
"""


def documents() -> list[str]:
    from llmctl.data.sources import iter_documents, parse_spec

    specs = [f"text:{SHARED / 'wikitext-2-raw' / 'wiki.valid.raw'}", f"text:{SHARED / 'tinyshakespeare' / 'input.txt'}",
             f"jsonl:{SHARED / 'sft' / 'dolly_open_qa.jsonl'}"]
    # Documents without blank or whitespace-only lines: `sample_by="paragraph"` (split at "\n\n")
    # and llmctl's text reader (split at whitespace-only lines) then see exactly the same ones.
    return [d for s in specs for d in iter_documents(parse_spec(s)) if all(line.strip() for line in d.split("\n"))]


def write_corpus(path: Path, docs: list[str], megabytes: float) -> int:
    block = "\n\n".join(docs) + "\n\n"
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            f.write(block)
            written += len(block.encode())
    return written


def tree_rss_mb(root: int) -> float:
    """Resident memory of `root` and all its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run_side(code: str, args: list[str]) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_mb(proc.pid))
            time.sleep(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark side failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(peak, 1)
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result["tokens_per_cpu_s"] = result["tokens"] / result["cpu_seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=200, help="corpus size in MB (the small one is a tenth)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of llmctl and baseline")
    parser.add_argument("--workers", type=int, default=0, help="llmctl worker processes (0 = one per core)")
    parser.add_argument("--skip-baseline", action="store_true", help="measure llmctl only")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not GPT2.is_dir():
        raise SystemExit(f"shared data missing: {GPT2}")

    load = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp_path = Path(tmp)
        docs = documents()
        big, small = tmp_path / "big.txt", tmp_path / "small.txt"
        big_bytes = write_corpus(big, docs, args.mb)
        small_bytes = write_corpus(small, docs, args.mb / 10)
        results: dict[str, list[dict]] = {"llmctl": [], "baseline": []}
        small_run = run_side(LLMCTL_SIDE, [str(small), str(tmp_path / "cache-small"), str(GPT2), str(args.workers)])
        for r in range(args.rounds):
            results["llmctl"].append(run_side(LLMCTL_SIDE, [str(big), str(tmp_path / f"cache-l{r}"), str(GPT2),
                                                            str(args.workers)]))
            if not args.skip_baseline:
                results["baseline"].append(run_side(BASELINE_SIDE, [str(big), str(tmp_path / f"hf-{r}"), str(GPT2)]))

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side]) if results[side] else float("nan")

    summary = {
        "machine": {"cores": cores, "load_average_before": [round(x, 2) for x in load]},
        "corpus_mb": round(big_bytes / 1e6, 1), "small_corpus_mb": round(small_bytes / 1e6, 1),
        "llmctl": results["llmctl"], "baseline": results["baseline"], "llmctl_small": small_run,
        "tokens_per_s_ratio": median("llmctl", "tokens_per_s") / median("baseline", "tokens_per_s"),
        "tokens_per_cpu_s_ratio": median("llmctl", "tokens_per_cpu_s") / median("baseline", "tokens_per_cpu_s"),
        "rss_growth_10x_corpus": median("llmctl", "peak_rss_mb") / small_run["peak_rss_mb"],
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"machine: {cores} cores, load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (shared)")
    print(f"corpus: {summary['corpus_mb']} MB (and {summary['small_corpus_mb']} MB), GPT-2 tokenizer")
    print(f"{'side':<16}{'MB':>8}{'tokens':>14}{'seconds':>10}{'tokens/s':>12}{'CPU s':>9}{'tok/CPU-s':>12}"
          f"{'peak RSS MB':>13}")
    rows = [("llmctl (1/10)", small_run, summary["small_corpus_mb"])]
    rows += [("llmctl", r, summary["corpus_mb"]) for r in results["llmctl"]]
    rows += [("baseline", r, summary["corpus_mb"]) for r in results["baseline"]]
    for name, r, mb in rows:
        print(f"{name:<16}{mb:>8}{r['tokens']:>14,}{r['seconds']:>10.1f}{r['tokens_per_s']:>12,.0f}"
              f"{r['cpu_seconds']:>9.1f}{r['tokens_per_cpu_s']:>12,.0f}{r['peak_rss_mb']:>13,.0f}")
    if results["baseline"]:
        print(f"tokens/s ratio llmctl / baseline: {summary['tokens_per_s_ratio']:.2f}x (target >= 2x); "
              f"per CPU-second {summary['tokens_per_cpu_s_ratio']:.2f}x (what is left when other work shares the cores)")
        if median("llmctl", "tokens") != median("baseline", "tokens"):
            print("note: the two sides counted different token totals")
    print(f"llmctl peak RSS at 10x the corpus: {summary['rss_growth_10x_corpus']:.2f}x the small run's "
          f"(target: under 1 GB and flat)")


if __name__ == "__main__":
    main()
