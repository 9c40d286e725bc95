"""Llama / Qwen2 / Qwen3 decoder (GQA, RoPE, RMSNorm, SwiGLU, optional q/k-norm) on a paged cache."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMetadata, paged_attention, write_kv
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama 3 long-context scaling when the checkpoint asks for it."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling is None:
        return inv
    s = cfg.rope_scaling
    factor, old_len = s["factor"], s["original_max_position_embeddings"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``[T, H, D]``; ``signed_sin`` is ``sin`` with its first half negated.

    ``rotate_half(x) * sin == roll(x, D/2) * signed_sin``: three kernels instead of five.
    """
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = self.heads * self.dim, self.kv_heads * self.dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.splits = (q_size, kv_size, kv_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata, mask: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        num_qk = self.heads + self.kv_heads
        v = qkv[:, num_qk * self.dim:].view(-1, self.kv_heads, self.dim)
        if self.q_norm is None:  # one rotation for q and k together: fewer kernels per layer
            qk = apply_rope(qkv[:, :num_qk * self.dim].view(-1, num_qk, self.dim), cos, sin)
            q, k = qk.split((self.heads, self.kv_heads), dim=1)
        else:
            q, k, _ = qkv.split(self.splits, dim=-1)
            q = apply_rope(self.q_norm(q.view(-1, self.heads, self.dim)), cos, sin)
            k = apply_rope(self.k_norm(k.view(-1, self.kv_heads, self.dim)), cos, sin)
        write_kv(cache, k, v, meta.slot_mapping)
        out = paged_attention(q, cache, meta, mask, self.dim ** -0.5)
        return self.o_proj(out.reshape(-1, self.heads * self.dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, meta, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, meta, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """The decoder stack plus LM head; ``forward`` returns hidden states of every new token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        cfg = self.config
        return (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        x = self.embed_tokens(input_ids)
        half = freqs.shape[-1]
        sin = emb.sin()
        sin[..., :half].neg_()
        cos, sin = emb.cos().to(x.dtype), sin.to(x.dtype)
        mask = meta.visible()
        for layer, cache in zip(self.layers, kv_cache):
            x = layer(x, cos, sin, cache, meta, mask)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
