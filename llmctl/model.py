"""The decoder-only transformer: RoPE, RMSNorm, SwiGLU, grouped-query attention, tied embeddings.

Reads top to bottom: RMSNorm -> rotary embeddings -> attention -> SwiGLU MLP -> block ->
model. Shapes use B (batch), T (time), C (d_model), H (query heads), K (key/value heads),
D (head size), V (vocabulary). The maths matches transformers' `LlamaForCausalLM`
(rotate-half RoPE, no biases); q/k/v and gate/up are stored fused for speed
(`llmctl.export.llama_state_dict` splits them into Llama's tensors).

References: RoPE (Su et al., 2021), RMSNorm (Zhang & Sennrich, 2019), SwiGLU (Shazeer, 2020),
GQA (Ainslie et al., 2023), attention sinks as a learned softmax logit (Xiao et al., 2023;
as in gpt-oss).

Two options leave Llama's shape: `model.attention_block` makes attention read only its own
block of positions, and `model.copy_pointer` adds a second output head that predicts by
pointing at earlier positions (`llmctl/pointer.py`). The pointer is trained, so it is part of
the network: the loss path here mixes it in, and `llmctl.inference` composes it with the
vocabulary head at evaluation and generation, along with anything else mixed in there.

Generation passes a `llmctl.inference.KVCache` to `forward`: the prompt is run once
(prefill), then each new token attends to the cached keys and values of all earlier ones.
`llmctl.inference.BatchKVCache` does the same for many generations decoded together, each
row at its own position (per-row RoPE and a (B, 1, 1, S) mask). Training never passes one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmctl.config import ModelConfig
from llmctl.cross_entropy import IGNORE_INDEX, linear_cross_entropy, reduce_losses
from llmctl.dropout import dropout
from llmctl.pointer import CopyPointer

if TYPE_CHECKING:
    from llmctl.inference import KVCache


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Embedding rows rounded up so the output matmul has friendly shapes (ids past vocab are never used)."""
    return ((vocab_size + multiple - 1) // multiple) * multiple


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """SwiGLU keeps the MLP's parameter count near a 4x GELU MLP: 2/3 * 4 * d, rounded up to 64."""
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    return ((int(8 * cfg.d_model / 3) + 63) // 64) * 64


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim), halves repeated (the rotate-half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D). Rotates each (i, i + D/2) pair by its position's angle."""
    half = x.size(-1) // 2
    # The tables are fp32; multiplying bf16 activations by them would promote every product
    # to fp32 and cast back (two extra passes over q and k under autocast).
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_at(start: int, end: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for positions start..end-1, (end - start, head_dim); angles in float64 so
    positions far past max_seq_len (a long generation) stay exact."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(start, end, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # index into a KVCache
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        # q, k and v come from one matmul (rows: H·D of q, then K·D of k, then K·D of v):
        # one larger GEMM and one weight cast instead of three.
        self.wqkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        # One learned logit per head that competes in the softmax but attends to nothing:
        # heads can "park" attention there instead of on the first token.
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if cfg.use_attention_sinks else None
        self.dropout = cfg.dropout  # on attention probabilities and the block's output, in training
        self.block = cfg.attention_block if 0 < cfg.attention_block < cfg.max_seq_len else 0

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.block and cache is None and T > self.block:
            y = self._attend_in_blocks(q, k, v)
        else:
            y = self._attend(q, k, v, cache)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return dropout(self.wo(y), self.dropout, self.training)

    def _attend_in_blocks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention within each block of `self.block` positions; q (B, H, T, D), k, v
        (B, K, T, D) -> (B, H, T, D). The blocks become batch entries (T padded up to a whole
        block at the end, which no earlier position sees), so each costs what a short context does."""
        B, _, T, D = q.shape
        N = self.block
        pad = (-T) % N
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        n = (T + pad) // N

        def as_blocks(t: torch.Tensor) -> torch.Tensor:  # (B, X, n·N, D) -> (B·n, X, N, D)
            return t.view(B, t.size(1), n, N, D).transpose(1, 2).reshape(B * n, t.size(1), N, D)

        y = self._attend(as_blocks(q), as_blocks(k), as_blocks(v), None)  # (B·n, H, N, D)
        return y.reshape(B, n, -1, N, D).transpose(1, 2).reshape(B, -1, n * N, D)[:, :, :T]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """q (B, H, T, D), k, v (B, K, T, D) after RoPE -> (B, H, T, D): causal, or with a cache
        over the cached keys too."""
        T = q.size(2)
        mask = None
        if cache is not None:  # generation: also attend to earlier tokens' keys and values
            k, v, mask = cache.update(self.layer, k, v)  # (B, K, S, D), mask (T, S) or None
        if self.sinks is None and cache is None and _explicit_attention_wins(q):
            y = self._attend_causal_explicit(q, k, v)
        elif self.sinks is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=cache is None,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            if cache is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            y = self._attend_with_sinks(q, k, v, mask)
        return y

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, H, T, D), k and v (B, K, T, D), before RoPE."""
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * D, K * D, K * D], dim=-1)
        return (q.view(B, T, H, D).transpose(1, 2), k.view(B, T, K, D).transpose(1, 2),
                v.view(B, T, K, D).transpose(1, 2))

    def _attend_causal_explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention as two batched GEMMs around a softmax; q (B, H, T, D), k, v
        (B, K, T, D) -> (B, H, T, D). Same maths as SDPA (scores in the activation dtype, the
        softmax accumulates in fp32 inside the kernel), see `_explicit_attention_wins` for when."""
        B, H, T, D = q.shape
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        causal = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # (T, T)
        scores = torch.baddbmm(causal.expand(B * H, T, T), q.reshape(B * H, T, D),
                               k.reshape(B * H, T, D).transpose(1, 2), alpha=1.0 / math.sqrt(D))
        probs = dropout(scores.softmax(dim=-1), self.dropout, self.training)  # (B·H, T, T)
        return torch.bmm(probs, v.reshape(B * H, T, D)).view(B, H, T, D)

    def _attend_with_sinks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
        """Explicit attention with a sink column appended to the softmax; q (B, H, T, D),
        k, v (B, K, S, D), mask (T, S) of allowed pairs or None for all; returns (B, H, T, D)."""
        group = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(group, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(group, dim=1)
        T, S = q.size(2), k.size(2)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        sink = self.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(q.size(0), -1, T, 1)
        probs = torch.cat([scores, sink], dim=-1).float().softmax(dim=-1)[..., :S]  # drop the sink
        probs = dropout(probs, self.dropout, self.training)
        return probs.to(v.dtype) @ v


def _explicit_attention_wins(q: torch.Tensor) -> bool:
    """On a CPU in bf16, PyTorch's flash-attention kernel is slow for short sequences, where
    two GEMMs around a softmax win (benchmarks/RESULTS.md); past 512 tokens the (T, T) score
    matrix costs more than it saves. Everywhere else SDPA's fused kernels win and use less memory."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.size(2) <= 512


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.hidden = hidden
        self.w13 = nn.Linear(cfg.d_model, 2 * hidden, bias=False)  # gate rows, then up rows: one GEMM
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)  # down
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)  # (B, T, hidden) each
        return dropout(self.w2(F.silu(gate) * up), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be resolved from the tokenizer first")
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.tok_emb = nn.Embedding(padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_multiple), cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # The output projection reuses the embedding matrix (tied weights, Press & Wolf, 2017).
        self.pointer = CopyPointer(cfg.d_model) if cfg.copy_pointer else None  # a second output head
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2 or name.startswith("pointer.sentinel"):
                continue  # norm gains stay 1, sinks stay 0, the pointer's sentinel keeps its start
            # Residual-branch outputs are scaled down with depth (GPT-2) so the stream's
            # variance does not grow with the number of blocks.
            scale = 1.0 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """idx: (B, T) token ids. Returns the vocabulary head's logits (B, T, V), of the last
        position only with `last_only` (all a sampler needs); or, with targets (B, T), the
        network's cross-entropy (targets of -100 are ignored; `reduction="sum"` for exact
        totals, "none" for one loss per position, (B·T,)). With a `cache`, idx holds the
        tokens that follow those the cache has seen."""
        h = self.hidden(idx, cache)  # (B, T, C)
        if targets is not None:
            return self.loss(h, idx, targets, reduction)
        return self.logits(h[:, -1:] if last_only else h)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C), after the last norm: what the output heads read."""
        T = idx.size(1)
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cache.begin(T, idx.device)
            cos, sin = cache.rope(self, T)  # (T, D), or (B, 1, 1, D) where rows sit at different positions
        x = dropout(self.tok_emb(idx), self.cfg.dropout, self.training)  # (B, T, C)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The vocabulary head: h (B, Q, C) -> (B, Q, V). The matmul runs on the padded
        vocabulary; the padding columns are dropped so ids that do not exist get no probability."""
        return F.linear(h, self.tok_emb.weight)[..., : self.vocab_size]

    def loss(self, h: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """Cross-entropy of targets (B, T) under the network's distribution, from the final
        hidden states h (B, T, C) of the inputs idx (B, T): the output layer fused with its
        loss (no fp32 logits), and with a copy pointer its mixture with the vocabulary."""
        if self.pointer is None:
            return linear_cross_entropy(h.flatten(0, 1), self.tok_emb.weight, targets.flatten(),
                                        self.vocab_size, reduction)
        vocab_log_probs = -linear_cross_entropy(h.flatten(0, 1), self.tok_emb.weight, targets.flatten(),
                                                self.vocab_size, "none").view_as(targets)  # (B, T)
        log_probs = self.pointer.target_log_probs(h, idx, targets, vocab_log_probs)
        return reduce_losses(-log_probs.masked_fill(targets == IGNORE_INDEX, 0.0), targets, reduction)

    def _rope(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for positions start..end-1: the precomputed ones, or fresh past max_seq_len."""
        if end <= self.rope_cos.size(0):
            return self.rope_cos[start:end], self.rope_sin[start:end]
        cos, sin = rope_at(start, end, self.rope_cos.size(1), self.cfg.rope_theta)
        return cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
