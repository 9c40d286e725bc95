"""Transformers' continuous batching on the same traffic (``lockstep bench --traffic``'s peer).

Its documented serving API: ``model.init_continuous_batching(...)`` returns a manager whose
background thread generates; the client thread sends requests as they arrive
(``add_request(..., streaming=True)``) and reads the streamed results (``get_result``), timing
them as :func:`~lockstep.ci.traffic.serve` does; ``max_requests_per_batch`` is the mix's
``max_num_seqs``. Its own async
mode (``use_async_batching``: batch N+1 prepared while batch N runs) where the version has it.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .traffic import Arrivals, Mix, ServeResult, Timing, TrafficRequest


def load_peer(path: str, device: str):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if device == "cuda"
                                                 else torch.float32, attn_implementation="sdpa")
    return model.to(device).eval()


def async_supported() -> bool:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    return "use_async_batching" in {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}


def peer_serve(model, mix: Mix, requests: list[TrafficRequest], use_async: bool,
               block_size: int = 16) -> ServeResult:
    """One run of the stream through a fresh manager (started and stopped here)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    page = "page_size" if "page_size" in fields else "block_size"
    longest = max(len(r.prompt) + r.max_tokens for r in requests)
    cb = {page: block_size, "num_blocks": mix.max_num_seqs * (-(-longest // block_size) + 1),
          "max_batch_tokens": mix.max_num_batched_tokens,
          "max_requests_per_batch": mix.max_num_seqs}
    if "use_async_batching" in fields:
        cb["use_async_batching"] = use_async
    generation = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(
        generation_config=generation, continuous_batching_config=ContinuousBatchingConfig(**cb))
    manager.start()
    arrivals, result, unfinished = Arrivals(requests), ServeResult(), len(requests)
    try:
        while unfinished:
            for req in arrivals.due():
                result.timings[req.request_id] = Timing(arrivals.start + req.arrival_s)
                manager.add_request(list(req.prompt), request_id=req.request_id,
                                    max_new_tokens=req.max_tokens, streaming=True)
            out = manager.get_result(timeout=0.0005)
            if out is None:
                running = getattr(manager, "is_running", lambda: True)()
                if not running:
                    raise RuntimeError("transformers' generation thread stopped")
                continue
            if out.error:
                raise RuntimeError(f"transformers request {out.request_id}: {out.error}")
            timing, now = result.timings[out.request_id], time.perf_counter()
            if out.generated_tokens and timing.first is None:
                timing.first = now
            if out.is_finished() and timing.last is None:
                timing.last, timing.tokens = now, len(out.generated_tokens)
                unfinished -= 1
        result.wall_s = time.perf_counter() - arrivals.start
    finally:
        manager.stop(block=True, timeout=60)
    return result
