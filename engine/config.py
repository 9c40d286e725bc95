"""Engine configuration, validated before any work; errors name the field and value."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICES = ("cpu", "cuda", "sim")
SIM_POLICIES = ("eager", "lazy", "threaded", "skewed")
COLLECTS = ("lazy", "eager")
OUTPUT_WAITS = ("block", "poll")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EngineConfig:
    """Everything the engine needs besides the model weights."""

    model: str | None = None
    device: str = "cpu"
    dtype: torch.dtype | None = None
    async_scheduling: bool = False
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    sim_policy: str | None = None  # device="sim" only; None there means "eager"
    kv_cache_memory_fraction: float = 0.5
    cuda_graph_sizes: tuple[int, ...] | None = None
    timeline_steps: int = 1024  # the step timeline keeps the last this many steps; 0: none
    # async: "lazy" collects a step when the queue is full; "eager" also collects, before
    # scheduling, every step in flight whose outputs have already reached the host
    collect: str = "lazy"
    # how the collect waits for a step's outputs: "block" on the event, or "poll" it with
    # back-off (the host idles between polls; the device goes on)
    output_wait: str = "block"

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"model must be None, 'oracle' or a checkpoint directory, "
                             f"got {self.model!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.sim_policy is not None and self.device != "sim":
            raise ValueError(f"sim_policy={self.sim_policy!r} applies only to device='sim', "
                             f"not device={self.device!r}")
        if self.device == "sim":
            self.sim_policy = self.sim_policy or "eager"
            if self.sim_policy not in SIM_POLICIES:
                raise ValueError(f"sim_policy must be one of {SIM_POLICIES}, "
                                 f"got {self.sim_policy!r}")
        for name, allowed in (("collect", COLLECTS), ("output_wait", OUTPUT_WAITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self.dtype = _parse_dtype(self.dtype)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _positive_int(name, getattr(self, name))
        for name in ("num_kv_blocks", "max_model_len"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if isinstance(self.timeline_steps, bool) or not isinstance(self.timeline_steps, int) \
                or not 0 <= self.timeline_steps <= 1_000_000:
            raise ValueError(f"timeline_steps must be an int in [0, 1000000], "
                             f"got {self.timeline_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.cuda_graph_sizes is not None:
            sizes = tuple(self.cuda_graph_sizes)
            if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or
                                not 0 < b <= self.max_num_seqs for b in sizes):
                raise ValueError(f"cuda_graph_sizes must be ints in [1, max_num_seqs="
                                 f"{self.max_num_seqs}], got {self.cuda_graph_sizes!r}")
            self.cuda_graph_sizes = tuple(sorted(set(sizes)))
        for name in ("async_scheduling", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not 0.0 < self.kv_cache_memory_fraction <= 0.95:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 0.95], "
                             f"got {self.kv_cache_memory_fraction!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available")

    @property
    def queue_depth(self) -> int:
        """Steps in flight at most: 2 with async scheduling (one launched, one collected)."""
        return 2 if self.async_scheduling else 1

    @property
    def num_slots(self) -> int:
        """Rows of the per-slot device state (penalty counts, last sampled id). A retiring
        request (its last token in flight) holds its slot until that step is collected but no
        admission capacity, so up to ``max_num_seqs`` requests per step in flight hold one."""
        return self.max_num_seqs * self.queue_depth

    def resolve_max_model_len(self, model_max_len: int) -> int:
        """Fix ``max_model_len`` against the model's limit; returns the value in force."""
        if self.max_model_len is None:
            self.max_model_len = model_max_len
        elif self.max_model_len > model_max_len:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={model_max_len}")
        return self.max_model_len


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _parse_dtype(dtype: object) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be None or one of {tuple(DTYPES)}, got {dtype!r}")
