"""The decoder-only transformer: RoPE, RMSNorm, SwiGLU, grouped-query attention, tied embeddings.

Reads top to bottom: RMSNorm -> rotary embeddings -> KV cache -> attention -> SwiGLU MLP ->
block -> model. Shapes use B (batch), T (time), C (d_model), H (query heads), K (key/value heads),
D (head size). The maths matches transformers' `LlamaForCausalLM` (rotate-half RoPE, no
biases); q/k/v and gate/up are stored fused for speed, and `llama_state_dict` splits them
into Llama's tensors one for one.

References: RoPE (Su et al., 2021), RMSNorm (Zhang & Sennrich, 2019), SwiGLU (Shazeer, 2020),
GQA (Ainslie et al., 2023), attention sinks as a learned softmax logit (Xiao et al., 2023;
as in gpt-oss).

Three options leave Llama's shape (and so transformers' export): `model.copy_pointer` mixes a
pointer over the window into the output (`llmctl/pointer.py`), `model.attention_block`
makes attention read only its own block of positions, so the pointer's window can be long
while attention costs what a short context does, and `model.ngram_order` / `model.cache_weight`
mix counted n-grams of the training text and of the window into the predictions at inference
(`llmctl/ngram.py`).

Generation passes a `KVCache` to `forward`: the prompt is run once (prefill), then each new
token attends to the cached keys and values of all earlier ones. Training never passes one,
so its path is the plain causal forward below.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmctl.config import ModelConfig
from llmctl.cross_entropy import IGNORE_INDEX, linear_cross_entropy, reduce_losses
from llmctl.dropout import dropout
from llmctl.ngram import CountMixture, WindowView
from llmctl.pointer import CopyPointer, earlier_positions, offered_tokens


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


class KVCache:
    """Keys and values of every token a generation has seen: per layer a ring of L = max_seq_len
    slots, (B, K, L, D), filled by `Transformer.forward(..., cache=cache)`.

    Keys are stored after RoPE at their absolute positions. RoPE makes a score depend only on
    the distance between query and key, so once the ring is full and each new token overwrites
    the oldest, every query still sees its last L tokens at distances 0..L-1 — the distances
    seen in training — and nothing is re-rotated (a sliding window, as in Mistral). A model
    trained with attention sinks keeps them: the sink logit joins every softmax whatever the
    ring holds. (StreamingLLM's alternative, keeping the first tokens as sinks, needs positions
    re-assigned inside the cache; models without learned sinks simply slide.)

    While the ring is filling, one forward may take up to `room()` tokens (a prefill); once it
    slides, one token at a time.
    """

    def __init__(self, cfg: ModelConfig):
        self.size = cfg.max_seq_len
        self.keys: list[torch.Tensor | None] = [None] * cfg.n_layers  # allocated on first use,
        self.values: list[torch.Tensor | None] = [None] * cfg.n_layers  # in the dtype autocast gives
        self.pos = 0  # tokens seen so far = absolute position of the next token
        self._mask: torch.Tensor | None = None  # (T, S) for the step in progress; None = attend to all
        # Each slot's absolute position (-1 = empty), set by `begin`. With block-local attention
        # a token attends only to its own block of `block` positions (absolute position // block).
        self.block = cfg.attention_block if 0 < cfg.attention_block < cfg.max_seq_len else 0
        self.slot_pos: torch.Tensor | None = None  # (L,)
        # Each slot's input id, kept when the output reads the window (a copy pointer, a cache of
        # n-grams), and a copy pointer's keys: each slot's final hidden state, in the same ring.
        self.ids: torch.Tensor | None = None  # (B, L)
        self.pointer_h: torch.Tensor | None = None  # (B, L, C)

    def room(self) -> int:
        return self.size - self.pos if self.pos < self.size else 1

    def begin(self, T: int, device: torch.device) -> None:
        """Prepare a step of T new tokens: new token i sees the cached tokens and new tokens 0..i."""
        if T < 1 or T > self.room():
            raise ValueError(f"a cached step takes 1..{self.room()} tokens now, got {T}")
        S = self.pos + T
        if self.slot_pos is None:
            self.slot_pos = torch.full((self.size,), -1, dtype=torch.long, device=device)
        query_pos = torch.arange(self.pos, S, device=device)  # (T,)
        self.slot_pos[query_pos % self.size] = query_pos
        if not self.block:
            self._mask = None if T == 1 else (
                torch.arange(S, device=device)[None, :] <= torch.arange(self.pos, S, device=device)[:, None])
            return
        key_pos = self.slot_pos[:S] if S <= self.size else self.slot_pos  # the keys `update` will return
        self._mask = ((key_pos[None, :] >= 0) & (key_pos[None, :] <= query_pos[:, None])
                      & (key_pos[None, :] // self.block == query_pos[:, None] // self.block))  # (T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this step's k, v (B, K, T, D); return all visible keys, values (B, K, S, D) and the mask."""
        if self.keys[layer] is None:
            shape = (k.size(0), k.size(1), self.size, k.size(3))
            self.keys[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        keys, values = self.keys[layer], self.values[layer]
        T = k.size(2)
        if self.pos + T <= self.size:  # filling: slot = position, in order
            keys[:, :, self.pos: self.pos + T] = k
            values[:, :, self.pos: self.pos + T] = v
            return keys[:, :, : self.pos + T], values[:, :, : self.pos + T], self._mask
        slot = self.pos % self.size  # full: overwrite the oldest token; order no longer matters
        keys[:, :, slot] = k[:, :, 0]
        values[:, :, slot] = v[:, :, 0]
        return keys, values, self._mask  # None unless attention is block-local

    def _slots(self, T: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.pos, self.pos + T, device=device) % self.size  # distinct: T <= room()

    def store_ids(self, idx: torch.Tensor) -> None:
        """Keep this step's inputs idx (B, T) in their slots (after `begin`, before `advance`)."""
        if self.ids is None:
            self.ids = torch.zeros(idx.size(0), self.size, dtype=torch.long, device=idx.device)
        self.ids[:, self._slots(idx.size(1), idx.device)] = idx

    def window(self, query_pos: torch.Tensor) -> WindowView:
        """The ring's ids as seen by queries at absolute positions query_pos (Q,)."""
        return WindowView(self.ids, self.slot_pos, query_pos, self.size)

    def pointer_update(self, h: torch.Tensor, query_pos: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store this step's final hidden states h (B, T, C) (after `store_ids`, before
        `advance`); return the pointer's keys (B, L, C), the token each offers (B, L) and which
        ones each query at absolute positions `query_pos` (Q,) may point at (Q, L).

        Key j offers x_{j+1}: the input one slot later, if that slot holds position j + 1. A
        query at t sees keys t - L < j < t, as a training window of L tokens would."""
        if self.pointer_h is None:
            B, _, C = h.shape
            self.pointer_h = torch.zeros(B, self.size, C, dtype=h.dtype, device=h.device)
        self.pointer_h[:, self._slots(h.size(1), h.device)] = h.to(self.pointer_h.dtype)
        view = self.window(query_pos)  # slot positions include this step's, set by `begin`
        offered, known = view.offered()  # (B, L), (L,)
        return self.pointer_h, offered, view.earlier() & known  # visible: (Q, L)

    def advance(self, T: int) -> None:
        self.pos += T


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
    """On a CPU in bf16, PyTorch's flash-attention kernel is slow for short sequences: measured
    on an AVX-512 BF16 CPU (torch 2.13, forward + backward, 6 heads of 64), explicit
    GEMM-softmax-GEMM attention took 0.3x its time at 128 tokens, 0.55x at 256 and 0.85x at
    512, but 1.4x at 1,024 (the (T, T) score matrix grows quadratically) and was never faster
    in fp32. Everywhere else SDPA's fused kernels win and use less memory."""
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
        self.pointer = CopyPointer(cfg.d_model) if cfg.copy_pointer else None
        # Counted n-grams mixed in at inference; pretrain fills them (`counts.fit`) from its text.
        self.counts = (CountMixture(cfg.vocab_size, cfg.ngram_order, cfg.ngram_weight, cfg.cache_weight)
                       if cfg.ngram_order or cfg.cache_weight else None)
        # The output projection reuses the embedding matrix (tied weights, Press & Wolf, 2017).
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean", cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """idx: (B, T) token ids. Returns logits (B, T, vocab) or, with targets (B, T), the
        cross-entropy (targets of -100 are ignored; `reduction="sum"` for exact totals).

        With a `cache`, idx holds the tokens that follow those the cache has seen; their keys
        and values are added to it. `last_only` computes logits for the last position only,
        all a sampler needs."""
        B, T = idx.shape
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cache.begin(T, idx.device)
            if self.pointer is not None or self.counts is not None:
                cache.store_ids(idx)
            cos, sin = self._rope(cache.pos, cache.pos + T)
        x = dropout(self.tok_emb(idx), self.cfg.dropout, self.training)  # (B, T, C)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache)
        h = self.norm(x)  # (B, T, C)
        queries = h[:, -1:] if last_only and targets is None else h  # (B, Q, C)
        Q = queries.size(1)
        if cache is not None:
            query_pos = torch.arange(cache.pos + T - Q, cache.pos + T, device=idx.device)  # (Q,)
        mixing = self.counts is not None and not self.training  # counts join at inference only
        if targets is not None and self.pointer is None and not mixing:
            # The output layer fused with its loss: no fp32 logits.
            return linear_cross_entropy(h.flatten(0, 1), self.tok_emb.weight, targets.flatten(),
                                        self.vocab_size, reduction)
        if targets is not None:
            log_probs = -linear_cross_entropy(h.flatten(0, 1), self.tok_emb.weight, targets.flatten(),
                                              self.vocab_size, "none").view(B, T)  # (B, T)
            if self.pointer is not None:
                log_probs = self.pointer.target_log_probs(h, idx, targets, log_probs)
            if mixing:
                log_probs = self.counts.mix_targets(log_probs, WindowView.of_sequence(idx, T, self.cfg.max_seq_len),
                                                    targets)
            return reduce_losses(-log_probs.masked_fill(targets == IGNORE_INDEX, 0.0), targets, reduction)
        # The matmul runs on the padded shape; the padding columns are dropped before the
        # softmax so ids that do not exist get no probability.
        logits = F.linear(queries, self.tok_emb.weight)[..., : self.vocab_size]  # (B, Q, vocab)
        if self.pointer is not None:
            if cache is not None:
                keys, offered, visible = cache.pointer_update(h, query_pos)
            else:
                keys, offered = h, offered_tokens(idx)
                visible = earlier_positions(T, idx.device)[T - Q:]  # (Q, T)
            logits = self.pointer.mix(queries, keys, offered, visible, logits)  # log-probabilities
        if mixing:
            view = cache.window(query_pos) if cache is not None else WindowView.of_sequence(idx, Q, self.cfg.max_seq_len)
            logits = self.counts.mix_log_probs(logits, view)
        if cache is not None:
            cache.advance(T)
        return logits

    def _rope(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for positions start..end-1: the precomputed ones, or fresh past max_seq_len."""
        if end <= self.rope_cos.size(0):
            return self.rope_cos[start:end], self.rope_sin[start:end]
        cos, sin = rope_at(start, end, self.rope_cos.size(1), self.cfg.rope_theta)
        return cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)


def llama_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under transformers `LlamaForCausalLM` names (fused q/k/v and
    gate/up split back); `lm_head.weight` is the tied embedding, without vocabulary padding."""
    cfg, V = model.cfg, model.vocab_size
    out = {"model.embed_tokens.weight": model.tok_emb.weight[:V], "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.tok_emb.weight[:V]}
    for i, block in enumerate(model.blocks):
        a, prefix = block.attn, f"model.layers.{i}."
        H, K, D = a.n_heads, a.n_kv_heads, a.head_dim
        q, k, v = a.wqkv.weight.split([H * D, K * D, K * D], dim=0)
        gate, up = block.mlp.w13.weight.split(block.mlp.hidden, dim=0)
        out.update({
            prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.v_proj.weight": v, prefix + "self_attn.o_proj.weight": a.wo.weight,
            prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up,
            prefix + "mlp.down_proj.weight": block.mlp.w2.weight,
            prefix + "input_layernorm.weight": block.attn_norm.weight,
            prefix + "post_attention_layernorm.weight": block.mlp_norm.weight,
        })
    return {name: t.detach().contiguous().clone() for name, t in out.items()}
