"""nanoGPT's recipe on the same text, budget and scoring as sweep_local.py: the baseline cpu-10m must beat.

cpu-10m is measured against nanoGPT's recipe trained for the same 10 minutes on the same
machine. To place that baseline on exactly the same held-out articles and scoring, this
script trains a plain GPT-2-style model the way nanoGPT's `train.py` does on a CPU, written
out here in ~150 lines so it runs without a nanoGPT checkout:

- model: token + learned position embeddings, pre-LayerNorm blocks (no biases), GELU MLP of
  4x width, tied output layer, N(0, 0.02) init with residual projections scaled by
  1/sqrt(2 n_layer), dropout on embeddings, attention and residuals (nanoGPT's model.py);
- training: float32 (nanoGPT runs a CPU in fp32: its autocast is CUDA-only), random windows
  of `block` tokens, AdamW (betas 0.9/0.99, weight decay 0.1 on matrices only), linear warmup
  then cosine decay to lr/10 over the planned iterations, gradient clipping at 1.0, and the
  checkpoint with the best validation loss kept (config/train_shakespeare_char.py's choices);
- the planned iteration count fills the time budget: nanoGPT has no time limit, so a user picks
  max_iters to fit; here the first iterations are timed and max_iters set from them;
- data: the train text (sweep_local.split: wiki.valid.raw minus its last 5 articles) as one
  token stream with GPT-2's tokenizer (nanoGPT's openwebtext/shakespeare prepare) or as UTF-8
  bytes (its char-level recipe, with bytes so every text is covered); 2% held back for its
  validation loss, as cpu-10m does;
- score: the held-out articles through llmctl's own `evaluate_tokens` (disjoint windows of the
  model's context, fp32) and bits per byte over the same UTF-8 bytes `llmctl eval` counts.

    python benchmarks/nanogpt_reference.py --list
    python benchmarks/nanogpt_reference.py --budget 10m gpt2-cpu bytes-baby

Results are appended to benchmarks/sweep_local_results.jsonl with "reference": "nanogpt".
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_local import GPT2, HELD_OUT, record, split_text  # noqa: E402  (the same text, split and results file)

from llmctl.config import parse_duration  # noqa: E402
from llmctl.data.sources import iter_documents, parse_spec  # noqa: E402
from llmctl.data.tokenizer import load_tokenizer  # noqa: E402
from llmctl.evaluate import ByteCount, bits_per_byte, document_tokens, evaluate_tokens  # noqa: E402


@dataclass
class Recipe:
    tokenizer: str  # "gpt2" or "bytes"
    n_layer: int
    n_head: int
    n_embd: int
    block: int
    batch: int
    dropout: float
    lr: float = 1e-3
    warmup: int = 100


RECIPES = {
    # nanoGPT README's CPU command (config/train_shakespeare_char.py with --block_size=64
    # --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0), GPT-2 tokens.
    "gpt2-cpu": Recipe("gpt2", 4, 4, 128, 64, 12, 0.0),
    # A wider model with GPT-2's tokens and a longer context: fewer, slower steps.
    "gpt2-256": Recipe("gpt2", 4, 4, 256, 128, 12, 0.1),
    "gpt2-384": Recipe("gpt2", 6, 6, 384, 128, 12, 0.2),
    # Its best size at cpu-10m's lower peak LR, so that nanoGPT's side gets the same LR tuning.
    "gpt2-256-lr6e-4": Recipe("gpt2", 4, 4, 256, 128, 12, 0.1, lr=6e-4),
    # The same CPU command on bytes (nanoGPT's char-level recipe), and the "baby GPT" itself
    # (6 x 384, 256 context, batch 64, dropout 0.2) at a CPU-sized batch.
    "bytes-cpu": Recipe("bytes", 4, 4, 128, 64, 12, 0.0),
    "bytes-baby": Recipe("bytes", 6, 6, 384, 256, 12, 0.2),
    "bytes-256": Recipe("bytes", 4, 4, 256, 128, 12, 0.1),
}


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text 256: the byte-level vocabulary."""
    eos_id = 256
    vocab_size = 257

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]


# --------------------------------------------------------------------------- nanoGPT's model

class SelfAttention(nn.Module):
    def __init__(self, r: Recipe) -> None:
        super().__init__()
        self.qkv = nn.Linear(r.n_embd, 3 * r.n_embd, bias=False)
        self.proj = nn.Linear(r.n_embd, r.n_embd, bias=False)
        self.n_head, self.dropout = r.n_head, r.dropout
        self.resid_drop = nn.Dropout(r.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # (B, H, T, D)
                   for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, r: Recipe) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(r.n_embd, bias=False), nn.LayerNorm(r.n_embd, bias=False)
        self.attn = SelfAttention(r)
        self.fc, self.proj = nn.Linear(r.n_embd, 4 * r.n_embd, bias=False), nn.Linear(4 * r.n_embd, r.n_embd, bias=False)
        self.drop = nn.Dropout(r.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.proj(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(self, r: Recipe, vocab_size: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, r.n_embd), nn.Embedding(r.block, r.n_embd)
        self.drop = nn.Dropout(r.dropout)
        self.blocks = nn.ModuleList(Block(r) for _ in range(r.n_layer))
        self.ln_f = nn.LayerNorm(r.n_embd, bias=False)
        self.head = nn.Linear(r.n_embd, vocab_size, bias=False)
        self.wte.weight = self.head.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * r.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)
        h = self.drop(self.wte(x) + self.wpe(pos))
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.ln_f(h))  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction=reduction)


# --------------------------------------------------------------------------- training

def token_stream(text_file: Path, tokenizer) -> np.ndarray:
    docs = iter_documents(parse_spec(f"text:{text_file}"), "train")
    return np.concatenate(list(document_tokens(docs, tokenizer, ByteCount())))


def train(r: Recipe, vocab_size: int, data: np.ndarray, budget_s: float, seed: int = 1337) -> tuple[GPT, dict]:
    torch.manual_seed(seed)
    cut = int(len(data) * 0.98)
    train_ids, val_ids = torch.from_numpy(data[:cut]), torch.from_numpy(data[cut:])
    model = GPT(r, vocab_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=r.lr, betas=(0.9, 0.99))

    def batch(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(ids) - r.block - 1, (r.batch,))
        x = torch.stack([ids[i: i + r.block] for i in ix])
        return x, torch.stack([ids[i + 1: i + 1 + r.block] for i in ix])

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        g = torch.Generator().manual_seed(0)  # the same 20 windows every time
        ix = torch.randint(len(val_ids) - r.block - 1, (20,), generator=g)
        loss = sum(float(model(val_ids[i: i + r.block][None], val_ids[i + 1: i + 1 + r.block][None])) for i in ix)
        model.train()
        return loss / len(ix)

    def lr_at(it: int, max_iters: int) -> float:
        if it < r.warmup:
            return r.lr * (it + 1) / (r.warmup + 1)
        ratio = min(1.0, (it - r.warmup) / max(1, max_iters - r.warmup))
        return r.lr / 10 + 0.5 * (1 + math.cos(math.pi * ratio)) * (r.lr - r.lr / 10)

    start = time.perf_counter()
    max_iters, probe, it = 10**9, 20, 0
    best, best_state, evals = float("inf"), None, 0
    while it < max_iters and time.perf_counter() - start < budget_s:
        if it == probe:  # plan max_iters from the measured speed (~5% of the budget goes to evaluation)
            max_iters = max(probe + 1, int(0.95 * budget_s / ((time.perf_counter() - start) / probe)))
        for group in opt.param_groups:
            group["lr"] = lr_at(it, max_iters if max_iters < 10**9 else 10 * r.warmup)
        x, y = batch(train_ids)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        it += 1
        if max_iters < 10**9 and (it % max(1, max_iters // 10) == 0 or it == max_iters):
            v = val_loss()
            evals += 1
            if v < best:
                best, best_state = v, {k: t.clone() for k, t in model.state_dict().items()}
    if best_state is None or val_loss() > best:  # nanoGPT saves only on a new best validation loss
        if best_state is not None:
            model.load_state_dict(best_state)
    return model, {"steps": it, "planned_steps": max_iters, "tokens": it * r.batch * r.block,
                   "train_seconds": round(time.perf_counter() - start, 1), "best_val_loss": best}


def run(name: str, budget_s: float, train_file: Path, heldout: Path) -> dict:
    r = RECIPES[name]
    tokenizer = load_tokenizer(GPT2) if r.tokenizer == "gpt2" else ByteTokenizer()
    vocab_size = tokenizer.vocab_size
    data = token_stream(train_file, tokenizer)
    model, info = train(r, vocab_size, data, budget_s)
    count = ByteCount()
    docs = iter_documents(parse_spec(f"text:{heldout}"), "train")
    scored = evaluate_tokens(model, document_tokens(docs, tokenizer, count), r.block, 16, torch.device("cpu"))
    return {"candidate": f"nanogpt-{name}", "reference": "nanogpt", "recipe": r.__dict__,
            "budget_s": budget_s, **info, "params": sum(p.numel() for p in model.parameters()),
            "heldout_bpb": bits_per_byte(scored["loss_sum"], count.bytes),
            "heldout_ppl": scored["perplexity"], "heldout_loss": scored["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="recipe names (see --list)")
    parser.add_argument("--budget", default="10m", help="training time per recipe, e.g. 10m")
    parser.add_argument("--workdir", default="", help="where the text split goes (default: a temporary folder)")
    parser.add_argument("--list", action="store_true")
    a = parser.parse_args()
    if a.list or not a.recipes:
        for name, r in RECIPES.items():
            print(f"{name:12s} {r}")
        return
    unknown = [n for n in a.recipes if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipes: {', '.join(unknown)}; see --list")
    budget_s = parse_duration(a.budget)
    with split_text(a.workdir) as (_, train_file, heldout):
        for name in a.recipes:
            result = run(name, budget_s, train_file, heldout)
            record(result)
            print(f"nanogpt-{name:10s} bpb {result['heldout_bpb']:.4f}  ppl {result['heldout_ppl']:.1f}  "
                  f"steps {result['steps']}  tokens {result['tokens']:,}  ({HELD_OUT} held-out articles)",
                  flush=True)


if __name__ == "__main__":
    main()
