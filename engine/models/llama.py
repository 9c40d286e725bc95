"""Llama / Qwen2 / Qwen3 decoder (GQA, RoPE, RMSNorm, SwiGLU, optional q/k-norm) on a paged cache."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.rms_norm import add_rms_norm
from ..kernels.decode_attention import decode_attention
from ..kernels.rope_kv import rope_and_cache
from ..kernels.silu_mul import silu_mul
from .attention import AttentionMetadata, takes_decode_kernel, torch_paged_attention
from .config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm of the residual stream plus ``residual`` (added first, when given).

    Returns the normed tensor and the new residual stream (``x + residual``).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, self.weight, self.eps)


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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = self.heads * self.dim, self.kv_heads * self.dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        norms = {} if self.q_norm is None else dict(
            q_norm=self.q_norm.weight, k_norm=self.k_norm.weight, eps=self.q_norm.eps)
        qkv, scale = self.qkv_proj(x), self.dim ** -0.5
        if takes_decode_kernel(qkv, meta):
            out = decode_attention(qkv, cos, sin, cache, meta.slot_mapping, meta.block_tables,
                                   meta.query_positions, self.heads, self.kv_heads, self.dim,
                                   scale, **norms)
        else:
            q = rope_and_cache(qkv, cos, sin, cache, meta.slot_mapping, self.heads,
                               self.kv_heads, self.dim, **norms)
            out = torch_paged_attention(q, cache, meta, scale)
        return self.o_proj(out.reshape(-1, self.heads * self.dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, cos, sin, cache, meta):
        """Sublayer output ``x`` of the previous layer and the residual stream before it."""
        h, residual = self.input_layernorm(x, residual)
        x = self.self_attn(h, cos, sin, cache, meta)
        h, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(h), residual


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
        cos, sin = freqs.cos(), freqs.sin()
        x, residual = self.embed_tokens(input_ids), None
        for layer, cache in zip(self.layers, kv_cache):
            x, residual = layer(x, residual, cos, sin, cache, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
