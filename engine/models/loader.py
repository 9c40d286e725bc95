"""Load a model: the embedded default, the oracle, or a Hugging Face checkpoint directory.

Only safetensors weights are read; pickle checkpoints are refused and no remote code runs.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .llama import LlamaForCausalLM, rope_inv_freq

_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_PART = re.compile(r"^(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")


def load_checkpoint(path: str, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Build the model described by ``path/config.json`` and fill it from its safetensors."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model={path!r} is not a directory (expected a checkpoint directory "
                         f"with config.json and *.safetensors, None, or 'oracle')")
    cfg = ModelConfig.from_dir(root)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        detail = f"; found pickle files {pickles}, which are refused" if pickles else ""
        raise ValueError(f"model={path!r} has no *.safetensors weights{detail}")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict(_read_state_dict(files, cfg, dtype), strict=True, assign=False)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # float32, whatever the weights' dtype
    return model.eval()


def _read_state_dict(files: list[Path], cfg: ModelConfig, dtype: torch.dtype) -> dict:
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, list] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                key = name.removeprefix("model.")
                if cfg.tie_word_embeddings and key == "lm_head.weight":
                    continue
                tensor = f.get_tensor(name).to(dtype)
                m = _PART.match(key)
                if m is None:
                    state[key] = tensor
                    continue
                fused, index = _FUSED[m.group(2)]
                slots = parts.setdefault(f"{m.group(1)}.{fused}.{m.group(3)}", [None] * 3)
                slots[index] = tensor
    for key, slots in parts.items():
        present = [t for t in slots if t is not None]
        expected = 3 if "qkv_proj" in key else 2
        if len(present) != expected:
            raise ValueError(f"checkpoint is missing part of {key} "
                             f"({len(present)} of {expected} projections)")
        state[key] = torch.cat(present, dim=0)
    return state


def load_tokenizer(path: str | None):
    """The checkpoint's tokenizer when it ships one, else None (prompts must be token ids)."""
    if path is None or path == "oracle":
        return None
    root = Path(path)
    if not (root / "tokenizer.json").exists() and not (root / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
