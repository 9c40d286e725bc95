"""Lockstep's engine: a compact paged-KV LLM engine with sync and async scheduling."""
from .config import EngineConfig
from .core import EngineBrokenError
from .llm import LLM
from .request import RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "EngineConfig", "EngineBrokenError"]
