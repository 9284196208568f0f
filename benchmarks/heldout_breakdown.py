"""Where a checkpoint's held-out loss goes: tokens the training text never had, had rarely, or often.

    python benchmarks/heldout_breakdown.py RUN_OR_CHECKPOINT --train train.txt --heldout heldout.txt

Tokenizes both texts with the checkpoint's tokenizer, scores the held-out text as one stream of
disjoint windows of the model's context (as `llmctl eval` does, without document boundaries),
and prints, for tokens never seen in training, seen 1-4 times and seen 5+ times, their share of
the tokens and of the loss and their mean loss; the mean loss by position in the window (how
much the context helps); and the bits per byte if never-seen tokens cost what rarely seen ones
do. On 1 MB of text this shows how much of the score is vocabulary the text cannot teach.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from llmctl.loading import load_model

RARE = 5  # "seen rarely" means fewer than this many times


def token_losses(model: torch.nn.Module, ids: list[int], context: int) -> np.ndarray:
    """Loss (nats) of every token after the first, disjoint windows of `context` inputs."""
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, context):
            window = torch.tensor([ids[start: start + context + 1]])  # (1, <= context + 1)
            losses.append(model(window[:, :-1], window[:, 1:], reduction="none").float().view(-1))  # (T,)
    return torch.cat(losses).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run directory or checkpoint file")
    parser.add_argument("--train", type=Path, required=True, help="the text the model was trained on")
    parser.add_argument("--heldout", type=Path, required=True, help="the unseen text to score")
    a = parser.parse_args()
    loaded = load_model(a.checkpoint, device="cpu")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    seen = Counter(tokenizer.encode(a.train.read_text(encoding="utf-8")))
    text = a.heldout.read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    losses = token_losses(model, ids, loaded.context_length)
    targets = np.array(ids[1:])
    counts = np.array([seen[t] for t in targets])
    total, n_bytes = losses.sum(), len(text.encode("utf-8"))
    print(f"{a.checkpoint}: {len(losses):,} held-out tokens, {total / math.log(2) / n_bytes:.4f} bits per byte")
    groups = {"never seen": counts == 0, f"seen 1-{RARE - 1}x": (counts > 0) & (counts < RARE),
              f"seen {RARE}x or more": counts >= RARE}
    for name, mask in groups.items():
        if mask.any():
            print(f"  {name:15s} {mask.mean():6.1%} of tokens  {losses[mask].sum() / total:6.1%} of the loss  "
                  f"mean {losses[mask].mean():.2f} nats")
    position = np.arange(len(losses)) % loaded.context_length
    edges = [e for e in (0, 8, 32, 128, 512, 2048, 8192) if e < loaded.context_length] + [loaded.context_length]
    buckets = [f"{lo}-{hi - 1} {losses[(position >= lo) & (position < hi)].mean():.2f}"
               for lo, hi in zip(edges, edges[1:])]
    print("  mean loss by position in the window: " + ", ".join(buckets))
    never, rare = groups["never seen"], groups[f"seen 1-{RARE - 1}x"]
    if never.any() and rare.any():
        capped = np.where(never, losses[rare].mean(), losses)
        print(f"  if never-seen tokens cost what rarely seen ones do: {capped.sum() / math.log(2) / n_bytes:.4f} bits per byte")


if __name__ == "__main__":
    main()
