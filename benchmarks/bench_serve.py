"""Serving speed: continuous batching at 1, 4 and 16 concurrent streaming clients.

The model has the `local` preset's shape (6 layers, 384 wide, 6 query heads, 2 key/value
heads, a 256-token window) with a 4,096-token BPE trained on Tiny Shakespeare; unless
--checkpoint is given it is made by a 1-step `llmctl pretrain` (speed does not depend on the
weights). The same requests — 16 prompts cut from Tiny Shakespeare (their lengths vary),
greedy, --new-tokens each — are served:

- engine: `llmctl.batching.BatchGenerator` in this process, by 1, 4 and 16 client threads
  that each take the next request once their last one is done (1 client = one at a time);
- http: the same against a live `llmctl serve` subprocess, POST /v1/completions with
  "stream": true (server-sent events read with the standard library's http.client);
- single-stream references: `llmctl.complete` (what `llmctl generate` runs) and transformers'
  `generate` (greedy, its own KV cache) on the `llmctl export --format hf` folder.

Per setting: aggregate generated tokens/s (all tokens / wall time), time to first token (to
the first non-empty text delta a client sees) and request latency, p50 and p95. The ratios
printed: 16-client aggregate / one at a time (the batching gain), and single-stream llmctl /
transformers. Greedy decoding makes the texts of every setting the same; that is checked.

    python benchmarks/bench_serve.py [--checkpoint CKPT] [--new-tokens 128] [--requests 16]
                                     [--hf-requests 4] [--engine-only] [--threads 0] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
TEXT = Path(os.environ.get("LLMCTL_SHARED_DATA", REPO.parent / "shared" / "data")) / "tinyshakespeare" / "input.txt"
LEVELS = (1, 4, 16)


def llmctl_cli(*args: str, env: dict[str, str], timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def build_checkpoint(workdir: Path, env: dict[str, str]) -> Path:
    """A 1-step pretrain of the local preset's shape on Tiny Shakespeare with a 4,096-token BPE."""
    sets = {"data.datasets": f'["text:{TEXT}"]', "data.tokenizer": "train:4096",
            "pretrain.max_steps": "1", "pretrain.batch_size": "4", "pretrain.micro_batch_size": "4",
            "pretrain.warmup_steps": "0", "pretrain.eval_every": "1000", "pretrain.save_every": "1000",
            "eval.max_tokens": "1024", "run.device": "cpu", "run.dtype": "float32",
            "run.output_dir": str(workdir / "runs")}
    args = ["pretrain", "--preset", "local", "--run-name", "bench-serve"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    done = llmctl_cli(*args, env=env)
    if done.returncode != 0:
        raise SystemExit(f"pretrain failed:\n{done.stderr[-3000:]}")
    return workdir / "runs" / "bench-serve"


def export_hf(checkpoint: Path, out: Path, env: dict[str, str]) -> Path:
    done = llmctl_cli("export", str(out), "--checkpoint", str(checkpoint), "--format", "hf", "--force", env=env)
    if done.returncode != 0:
        raise SystemExit(f"export failed:\n{done.stderr[-3000:]}")
    return out


def make_prompts(count: int) -> list[str]:
    """`count` passages of Tiny Shakespeare, 120-400 characters, each starting at a line."""
    lines = TEXT.read_text(encoding="utf-8").splitlines(keepends=True)
    prompts, i = [], 0
    for k in range(count):
        i = (i + 997) % (len(lines) - 40)
        want = 120 + (k * 53) % 280
        text = ""
        j = i
        while len(text) < want:
            text += lines[j]
            j += 1
        prompts.append(text[:want])
    return prompts


# --------------------------------------------------------------------------- clients

def run_clients(clients: int, prompts: list[str], one: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """`clients` threads serve `prompts` in order, each taking the next when its last is done."""
    todo: queue.Queue = queue.Queue()
    for i, prompt in enumerate(prompts):
        todo.put((i, prompt))
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            try:
                i, prompt = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = one(prompt)
            except BaseException as e:  # noqa: BLE001 (reported after the others finish)
                errors.append(e)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return summarize(clients, wall, results)


def summarize(clients: int, wall: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in results)
    ttft = np.array([r["ttft"] for r in results])
    latency = np.array([r["latency"] for r in results])
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p95_s": float(np.percentile(ttft, 95)), "latency_p50_s": float(np.percentile(latency, 50)),
            "latency_p95_s": float(np.percentile(latency, 95)), "texts": [r["text"] for r in results]}


def engine_request(engine: Any, loaded: Any, new_tokens: int) -> Callable[[str], dict[str, Any]]:
    from llmctl.generate import Sampling, chat_prompt

    sampling = Sampling(max_new_tokens=new_tokens, temperature=0)

    def one(prompt: str) -> dict[str, Any]:
        ids, template = chat_prompt(loaded, prompt)
        start = time.perf_counter()
        first = None
        parts = []
        stream = engine.submit(ids, sampling, template=template)
        for delta in stream:
            if first is None and delta:
                first = time.perf_counter()
            parts.append(delta)
        end = time.perf_counter()
        return {"tokens": stream.completion_tokens, "ttft": (first or end) - start, "latency": end - start,
                "text": "".join(parts)}

    return one


def http_request(host: str, port: int, new_tokens: int) -> Callable[[str], dict[str, Any]]:
    def one(prompt: str) -> dict[str, Any]:
        body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection(host, port, timeout=600)
        start = time.perf_counter()
        first = None
        parts: list[str] = []
        tokens = None
        try:
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
            while True:
                line = response.readline()
                if not line:
                    break
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        if first is None:
                            first = time.perf_counter()
                        parts.append(choice["text"])
        finally:
            conn.close()
        end = time.perf_counter()
        if tokens is None:
            raise RuntimeError("the stream ended without its usage chunk")
        return {"tokens": tokens, "ttft": (first or end) - start, "latency": end - start, "text": "".join(parts)}

    return one


# --------------------------------------------------------------------------- single-stream references

def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on a fresh thread, as the engine's decode thread runs the model. (On a busy
    2-core machine, OpenMP's spin-waiting made 2-thread matmuls in the main thread ~10x slower
    than in another thread; running every side off the main thread keeps the comparison fair.)"""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


def complete_reference(loaded: Any, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    from llmctl.generate import complete

    complete(loaded, prompts[0], max_new_tokens=8, temperature=0)  # warm up
    results = []
    start = time.perf_counter()
    for prompt in prompts:
        first: list[float] = []
        t0 = time.perf_counter()
        out = complete(loaded, prompt, max_new_tokens=new_tokens, temperature=0,
                       on_text=lambda text: first.append(time.perf_counter()) if not first else None)
        t1 = time.perf_counter()
        results.append({"tokens": out.tokens, "ttft": (first[0] if first else t1) - t0, "latency": t1 - t0,
                        "text": out.text})
    return summarize(1, time.perf_counter() - start, results)


def transformers_reference(folder: Path, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def generate(ids: torch.Tensor, new: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)

    generate(tokenizer(prompts[0], return_tensors="pt").input_ids, 8)  # warm up
    results = []
    start = time.perf_counter()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        t0 = time.perf_counter()
        out = generate(ids, new_tokens)
        t1 = time.perf_counter()
        new = out[0, ids.size(1):].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        results.append({"tokens": len(new), "ttft": float("nan"), "latency": t1 - t0,
                        "text": tokenizer.decode(new)})
    return summarize(1, time.perf_counter() - start, results)


# --------------------------------------------------------------------------- server

class Server:
    """`llmctl serve` on a free port, until closed."""

    def __init__(self, checkpoint: Path, env: dict[str, str], max_batch: int):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmctl", "serve", "--checkpoint", str(checkpoint), "--port", "0",
             "--device", "cpu", "--dtype", "float32", "--max-batch", str(max_batch)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = self.process.stdout.readline().strip()  # printed once it listens
        if not url.startswith("http://"):
            self.process.kill()
            raise SystemExit(f"llmctl serve did not start:\n{self.process.stderr.read()[-3000:]}")
        self.host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
        self.port = int(port.split("/")[0])

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --------------------------------------------------------------------------- main

def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    head = (f"{'setting':<40} {'clients':>7} {'tokens':>6} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} "
            f"{'lat p50':>8} {'lat p95':>8}")
    lines = [head, "-" * len(head)]
    for name, r in rows:
        ttft = ["-" if np.isnan(r[key]) else f"{r[key]:.3f}" for key in ("ttft_p50_s", "ttft_p95_s")]
        lines.append(f"{name:<40} {r['clients']:>7} {r['tokens']:>6} {r['tokens_per_s']:>7.1f} "
                     f"{ttft[0]:>9} {ttft[1]:>9} {r['latency_p50_s']:>8.2f} {r['latency_p95_s']:>8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an llmctl checkpoint or run directory (default: build one)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--hf-requests", type=int, default=4, help="requests for the single-stream references")
    parser.add_argument("--engine-only", action="store_true", help="skip the HTTP server")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if args.threads:
        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    from llmctl.batching import BatchGenerator
    from llmctl.loading import load_model

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        env["LLMCTL_CACHE"] = str(workdir / "cache")
        status = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
        if args.checkpoint is None:
            status("building a local-preset checkpoint (1 pretrain step)...")
        checkpoint = args.checkpoint or build_checkpoint(workdir, env)
        status("exporting it for transformers...")
        hf_folder = export_hf(checkpoint, workdir / "hf", env)
        loaded = load_model(checkpoint, device="cpu", dtype="float32")
        prompts = make_prompts(args.requests)
        few = prompts[: args.hf_requests]
        rows: list[tuple[str, dict[str, Any]]] = []

        with BatchGenerator(loaded, max_batch=max(LEVELS)) as engine:
            engine_request(engine, loaded, 8)(prompts[0])  # warm up
            for clients in LEVELS:
                status(f"engine, {clients} clients...")
                rows.append((f"engine, {clients} client{'s' * (clients > 1)}",
                             run_clients(clients, prompts, engine_request(engine, loaded, args.new_tokens))))
        if not args.engine_only:
            server = Server(checkpoint, env, max(LEVELS))
            try:
                one = http_request(server.host, server.port, args.new_tokens)
                one(prompts[0])  # warm up
                for clients in LEVELS:
                    status(f"http, {clients} clients...")
                    rows.append((f"llmctl serve, {clients} client{'s' * (clients > 1)}",
                                 run_clients(clients, prompts, one)))
            finally:
                server.close()
        status("single-stream references...")
        rows.append(("llmctl complete (generate), 1 stream",
                     in_thread(complete_reference, loaded, few, args.new_tokens)))
        rows.append(("transformers generate, 1 stream",
                     in_thread(transformers_reference, hf_folder, few, args.new_tokens)))

    by_name = dict(rows)
    texts = [r["texts"] for name, r in rows if "client" in name]
    same = all(t == texts[0] for t in texts)
    same_reference = by_name["llmctl complete (generate), 1 stream"]["texts"] == texts[0][: len(few)]
    kind = "llmctl serve" if not args.engine_only else "engine"
    one_at_a_time = by_name[f"{kind}, 1 client"]["tokens_per_s"]
    ratios = {
        "16 clients / one at a time": by_name[f"{kind}, 16 clients"]["tokens_per_s"] / one_at_a_time,
        f"single stream ({kind}) / transformers": one_at_a_time / by_name["transformers generate, 1 stream"]["tokens_per_s"],
        "single stream (engine) / transformers": by_name["engine, 1 client"]["tokens_per_s"]
        / by_name["transformers generate, 1 stream"]["tokens_per_s"],
    }
    if args.json:
        print(json.dumps({"rows": {n: {k: v for k, v in r.items() if k != "texts"} for n, r in rows},
                          "ratios": ratios, "same_texts": same, "same_as_complete": same_reference,
                          "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}, indent=1))
        return
    print(f"local-preset shape (6 x 384, 4,096-token BPE), float32, {torch.get_num_threads()} torch threads, "
          f"greedy, {args.new_tokens} new tokens per request; {args.requests} requests per client setting, "
          f"{len(few)} per single-stream reference")
    print(table(rows))
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    print(f"every client setting wrote the same texts: {same}; they equal llmctl complete's: {same_reference}")


if __name__ == "__main__":
    main()
