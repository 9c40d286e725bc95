"""``lockstep bench``: decode time per output token, sync vs async, against the HBM floor.

One run measures, on a model of Llama-3.2-1B's shape with random bf16 weights:
* the HBM floor: weight bytes over the device-to-device copy bandwidth measured in the same run
  (a copy of N bytes moves 2N: read plus write);
* per batch size, the decode time per output token (TPOT) of the sync and the async engine, from
  the difference of two generation lengths so that prefill and start-up cancel out, and the
  fraction of the long run's wall time during which the GPU was busy;
* transformers ``generate`` on the same weights as a baseline.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from lockstep.engine import LLM, SamplingParams
from lockstep.engine.models.default import random_llama_weights, write_checkpoint

LLAMA_3_2_1B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
TINY = dict(LLAMA_3_2_1B, vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def copy_bandwidth(device: str, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prompts(batch: int, length: int = 32, vocab: int = 512) -> list[list[int]]:
    return [[(97 * b + 31 * i) % (vocab - 10) + 10 for i in range(length)] for b in range(batch)]


def engine_tpot(llm: LLM, batch: int, short: int, long: int) -> tuple[float, float]:
    """(s per output token, GPU busy fraction, mean host ms per phase) of the long run."""
    def run(n: int) -> tuple[float, int, int]:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter_ns()
        llm.generate(prompts(batch), params)
        return (time.perf_counter_ns() - start) / 1e9, start, time.perf_counter_ns()

    run(short)  # warm-up
    t_short, _, _ = run(short)
    t_long, start_ns, end_ns = run(long)
    timeline = llm.engine.timeline
    host: dict[str, list[int]] = {}
    for span in timeline.host_spans:
        if start_ns <= span.start_ns < end_ns:
            host.setdefault(span.name, []).append(span.end_ns - span.start_ns)
    host_ms = {name: sum(d) / len(d) / 1e6 for name, d in host.items()}
    return (t_long - t_short) / (long - short), timeline.busy_fraction(start_ns, end_ns), host_ms


def transformers_tpot(path: str, device: str, batch: int, short: int, long: int) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor(prompts(batch), device=device)

    def run(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - start

    run(short)
    return (run(long) - run(short)) / (long - short)


def run_bench(device: str = "cuda", batch_sizes: tuple[int, ...] = (1, 8, 64),
              shape: str = "llama-3.2-1b", short: int = 32, long: int = 160,
              out: str | None = None, hf_baseline: bool = True) -> dict:
    config = LLAMA_3_2_1B if shape == "llama-3.2-1b" else TINY
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    workdir = Path(tempfile.mkdtemp(prefix="lockstep-bench-"))
    write_checkpoint(workdir, config, random_llama_weights(config, 0, std=0.02, device=device,
                                                           dtype=dtype))
    weight_bytes = (workdir / "model.safetensors").stat().st_size
    bandwidth = copy_bandwidth(device)
    floor_s = weight_bytes / bandwidth
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "shape": shape, "dtype": str(dtype)[6:],
               "weight_bytes": weight_bytes,
               "copy_bandwidth_GBps": bandwidth / 1e9, "hbm_floor_ms": floor_s * 1e3, "rows": []}
    print(f"weights {weight_bytes / 1e9:.2f} GB, copy bandwidth {bandwidth / 1e9:.0f} GB/s "
          f"(read+write), HBM floor {floor_s * 1e3:.3f} ms/token")
    engines = {mode: LLM(model=str(workdir), device=device, dtype=dtype,
                         async_scheduling=mode == "async", max_num_seqs=max(batch_sizes),
                         max_model_len=1024, max_num_batched_tokens=4096,
                         cuda_graph_sizes=batch_sizes if device == "cuda" else None)
               for mode in ("sync", "async")}
    for batch in batch_sizes:
        row = {"batch": batch}
        for mode, llm in engines.items():
            tpot, busy, host_ms = engine_tpot(llm, batch, short, long)
            row[f"{mode}_tpot_ms"], row[f"{mode}_gpu_busy"] = tpot * 1e3, busy
            row[f"{mode}_host_ms"] = host_ms
        if hf_baseline:
            row["transformers_tpot_ms"] = transformers_tpot(str(workdir), device, batch, short,
                                                            long) * 1e3
        row["async_speedup"] = row["sync_tpot_ms"] / row["async_tpot_ms"]
        row["async_over_floor"] = row["async_tpot_ms"] / (floor_s * 1e3)
        results["rows"].append(row)
        print(json.dumps(row))
    _print_table(results)
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    return results


def _print_table(r: dict) -> None:
    print(f"\n{r['date']} {r['device']} ({r['shape']}, {r['dtype']} random weights); "
          f"HBM floor {r['hbm_floor_ms']:.3f} ms")
    print("| batch | sync TPOT ms | async TPOT ms | async speed-up | async / floor "
          "| GPU busy sync | GPU busy async | transformers TPOT ms |")
    print("|---|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        hf = row.get("transformers_tpot_ms")
        print(f"| {row['batch']} | {row['sync_tpot_ms']:.3f} | {row['async_tpot_ms']:.3f} "
              f"| {row['async_speedup']:.2f}x | {row['async_over_floor']:.2f}x "
              f"| {row['sync_gpu_busy']:.0%} | {row['async_gpu_busy']:.0%} "
              f"| {'-' if hf is None else f'{hf:.3f}'} |")
