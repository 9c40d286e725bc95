"""The embedded default model: a small Llama with deterministic random weights from a seed.

It is written once per machine as an ordinary checkpoint directory (config.json + safetensors)
and then loaded through the same path as any real checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
DEFAULT_SEED = 1234


def random_llama_weights(config: dict, seed: int, std: float = 0.08, device: str = "cpu",
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Hugging Face-named Llama tensors drawn from ``seed`` (norm weights are ones)."""
    gen = torch.Generator(device).manual_seed(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    dim = config.get("head_dim") or h // heads

    def normal(*shape: int, scale: float = std) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    weights = {"model.embed_tokens.weight": normal(vocab, h, scale=1.0),
               "model.norm.weight": ones(h)}
    if not config.get("tie_word_embeddings"):
        weights["lm_head.weight"] = normal(vocab, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": normal(heads * dim, h),
            p + "self_attn.k_proj.weight": normal(kv_heads * dim, h),
            p + "self_attn.v_proj.weight": normal(kv_heads * dim, h),
            p + "self_attn.o_proj.weight": normal(h, heads * dim),
            p + "mlp.gate_proj.weight": normal(inter, h),
            p + "mlp.up_proj.weight": normal(inter, h),
            p + "mlp.down_proj.weight": normal(h, inter),
            p + "input_layernorm.weight": ones(h),
            p + "post_attention_layernorm.weight": ones(h),
        })
    return weights


def write_checkpoint(directory: Path, config: dict, weights: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous().cpu() for k, v in weights.items()},
              str(directory / "model.safetensors"))


def default_checkpoint() -> str:
    """Path of the default checkpoint, writing it on first use (atomically, safe across workers)."""
    digest = hashlib.sha256(json.dumps([DEFAULT_CONFIG, DEFAULT_SEED], sort_keys=True).encode())
    target = Path(tempfile.gettempdir()) / f"lockstep-default-{digest.hexdigest()[:12]}"
    if (target / "model.safetensors").exists():
        return str(target)
    staging = Path(tempfile.mkdtemp(prefix="lockstep-default-tmp-"))
    write_checkpoint(staging, DEFAULT_CONFIG, random_llama_weights(DEFAULT_CONFIG, DEFAULT_SEED))
    try:
        os.rename(staging, target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
