"""``lockstep bench``: decode time per output token, sync vs async, against the HBM floor.

One run measures, on a model of Llama-3.2-1B's shape with random bf16 weights:
* on CUDA, the HBM floor: weight bytes over the device-to-device copy bandwidth measured in the
  same run (a copy of N bytes moves 2N: read plus write);
* per batch size, the decode time per output token (TPOT) of the sync and the async engine:
  ``repeats`` alternated repetitions (sync first in even ones, async first in odd ones), each
  the difference of the medians of three runs of two generation lengths, so that prefill and
  start-up cancel out; reported as the median and the spread (max - min over the median); and,
  on CUDA, the fraction of a long run's wall time during which the GPU was busy;
* the peers on the same weights: transformers ``generate`` eager, and with a static cache, for
  which generate compiles the forward (the documented fast path).

Every argument is checked before any work; the checkpoint is written to a temporary folder and
removed at the end. The JSON records torch, Triton and CUDA versions and the git commit.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lockstep.engine import LLM, SamplingParams
from lockstep.engine.models.default import random_llama_weights, write_checkpoint
from .host import describe, host_info

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
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            bos_token_id=1, eos_token_id=2)
SHAPES = {"llama-3.2-1b": LLAMA_3_2_1B, "tiny": TINY}
PEERS = ("transformers_eager", "transformers_static")


class BenchUsageError(ValueError):
    """A bad argument, or a device this machine does not have (exit status 2)."""


@dataclass(frozen=True)
class BenchOptions:
    device: str = "cuda"
    batch_sizes: tuple[int, ...] = (1, 8, 64)
    shape: str = "llama-3.2-1b"
    short: int = 32
    long: int = 160
    repeats: int = 5
    out: str | None = None
    plot: str | None = None
    peers: tuple[str, ...] = PEERS

    def validate(self) -> None:
        """Raise BenchUsageError naming the option, before any work."""
        if self.device not in ("cpu", "cuda"):
            raise BenchUsageError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BenchUsageError("--device cuda but no CUDA device is available")
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                       for b in self.batch_sizes):
            raise BenchUsageError(f"--batch-sizes must be positive ints, got {self.batch_sizes}")
        if self.shape not in SHAPES:
            raise BenchUsageError(f"--shape must be one of {tuple(SHAPES)}, got {self.shape!r}")
        if not 1 <= self.short < self.long:
            raise BenchUsageError(f"--short must be at least 1 and below --long, got "
                                  f"--short {self.short} --long {self.long}")
        if self.repeats < 1:
            raise BenchUsageError(f"--repeats must be at least 1, got {self.repeats}")
        check_outputs(self.out, self.plot)
        unknown = set(self.peers) - set(PEERS)
        if unknown:
            raise BenchUsageError(f"unknown peers {sorted(unknown)}; known: {PEERS}")


def check_outputs(out: str | None, plot: str | None) -> None:
    """BenchUsageError naming ``--out`` or ``--plot`` when its folder is missing, or ``--plot``
    without matplotlib."""
    for name, path in (("--out", out), ("--plot", plot)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise BenchUsageError(f"{name} {path}: the folder {Path(path).parent} does not exist")
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchUsageError("--plot needs matplotlib (pip install matplotlib)") from None


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise BenchUsageError(f"--batch-sizes must be comma-separated positive ints, "
                              f"got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise BenchUsageError(f"--batch-sizes must be comma-separated positive ints, got {text!r}")
    return sizes


@contextmanager
def random_checkpoint(config: dict, device: str, dtype: torch.dtype,
                      prefix: str = "lockstep-bench-") -> Iterator[Path]:
    """A checkpoint of random weights in a temporary folder, removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        write_checkpoint(workdir, config, random_llama_weights(config, 0, std=0.02, device=device,
                                                               dtype=dtype))
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def versions() -> dict:
    """torch, Triton, CUDA and the git commit (``LOCKSTEP_COMMIT`` overrides it)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("LOCKSTEP_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "commit": commit or "unknown"}


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


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


class NoisyMeasurement(RuntimeError):
    """The long run was not slower than the short one: noise exceeded the signal."""


def timed_generate(llm: LLM, batch: int, n: int) -> tuple[float, int, int]:
    """Seconds for a greedy generation of ``n`` tokens per prompt, and its start and end (ns)."""
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    start = time.perf_counter_ns()
    llm.generate(prompts(batch), params)
    end = time.perf_counter_ns()
    return (end - start) / 1e9, start, end


def tpot_of(run: Callable[[int], float], short: int, long: int, what: str) -> float:
    """Seconds per output token from ``run(n)`` (seconds for n tokens): the difference of the
    medians of three short and three long runs, alternated. Never negative: NoisyMeasurement
    when the long runs were not the slower."""
    shorts, longs = [], []
    for _ in range(3):
        shorts.append(run(short))
        longs.append(run(long))
    tpot = (statistics.median(longs) - statistics.median(shorts)) / (long - short)
    if tpot <= 0:
        raise NoisyMeasurement(f"{what}: {long} tokens took no longer than {short} (medians "
                               f"{statistics.median(longs):.4f} s vs "
                               f"{statistics.median(shorts):.4f} s): raise --long")
    return tpot


def engine_tpot(llm: LLM, batch: int, short: int, long: int) -> tuple[float, float, dict]:
    """(s per output token, GPU busy fraction, mean host ms per phase) of one measurement
    (:func:`tpot_of` after a warm-up); busy and host times are those of the last long run."""
    window: list[int] = []

    def run(n: int) -> float:
        seconds, start_ns, end_ns = timed_generate(llm, batch, n)
        window[:] = [start_ns, end_ns]
        return seconds

    run(short)  # warm-up
    tpot = tpot_of(run, short, long, f"batch {batch}")
    start_ns, end_ns = window
    timeline = llm.engine.timeline
    host: dict[str, list[int]] = {}
    for span in timeline.host_spans:
        if start_ns <= span.start_ns < end_ns:
            host.setdefault(span.name, []).append(span.end_ns - span.start_ns)
    host_ms = {name: sum(d) / len(d) / 1e6 for name, d in host.items()}
    return tpot, timeline.busy_fraction(start_ns, end_ns), host_ms


def summary(samples: list[float]) -> dict:
    """Median and spread (max - min over the median) of positive samples, in ms."""
    median = statistics.median(samples)
    return {"median_ms": median * 1e3, "spread": (max(samples) - min(samples)) / median,
            "samples_ms": [x * 1e3 for x in samples]}


def transformers_tpot(path: str, device: str, batch: int, short: int, long: int,
                      static: bool) -> float:
    """TPOT of transformers ``generate`` (eager, or with a static cache: compiled forward)."""
    from transformers import AutoModelForCausalLM
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts(batch), device=device)
    extra = {"cache_implementation": "static"} if static else {}

    def run(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)
        _sync(device)
        return time.perf_counter() - start

    run(short)  # warm-up (and, with a static cache, compilation)
    run(long)
    return tpot_of(run, short, long, f"transformers batch {batch}")


def run_bench(opts: BenchOptions) -> dict:
    opts.validate()
    dtype = torch.bfloat16 if opts.device == "cuda" else torch.float32
    results = {"device": torch.cuda.get_device_name() if opts.device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "shape": opts.shape, "dtype": str(dtype)[6:],
               "repeats": opts.repeats, "short": opts.short, "long": opts.long, **versions(),
               "host": host_info(), "rows": []}
    progress(f"writing a random {opts.shape} checkpoint")
    with random_checkpoint(SHAPES[opts.shape], opts.device, dtype) as workdir:
        results["weight_bytes"] = (workdir / "model.safetensors").stat().st_size
        if opts.device == "cuda":
            bandwidth = copy_bandwidth(opts.device)
            results["copy_bandwidth_GBps"] = bandwidth / 1e9
            results["hbm_floor_ms"] = results["weight_bytes"] / bandwidth * 1e3
            progress(f"weights {results['weight_bytes'] / 1e9:.2f} GB, copy bandwidth "
                     f"{bandwidth / 1e9:.0f} GB/s (read+write), HBM floor "
                     f"{results['hbm_floor_ms']:.3f} ms/token")
        engines = {mode: LLM(model=str(workdir), device=opts.device, dtype=dtype,
                             async_scheduling=mode == "async",
                             max_num_seqs=max(opts.batch_sizes), max_model_len=1024,
                             max_num_batched_tokens=4096,
                             cuda_graph_sizes=opts.batch_sizes if opts.device == "cuda" else None)
                   for mode in ("sync", "async")}
        for batch in opts.batch_sizes:
            results["rows"].append(_bench_batch(opts, engines, str(workdir), batch, results))
            print(json.dumps(results["rows"][-1]), flush=True)
    _print_table(results)
    if opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=2))
    if opts.plot:
        plot(results, opts.plot)
    return results


def _bench_batch(opts: BenchOptions, engines: dict, path: str, batch: int, results: dict) -> dict:
    row: dict = {"batch": batch}
    samples: dict[str, list[float]] = {"sync": [], "async": []}
    for rep in range(opts.repeats):
        order = ("sync", "async") if rep % 2 == 0 else ("async", "sync")
        for mode in order:
            progress(f"batch {batch}: {mode} repetition {rep + 1}/{opts.repeats}")
            tpot, busy, host_ms = engine_tpot(engines[mode], batch, opts.short, opts.long)
            samples[mode].append(tpot)
            row[f"{mode}_host_ms"] = host_ms
            if opts.device == "cuda":
                row.setdefault(f"{mode}_gpu_busy_samples", []).append(busy)
    for mode in ("sync", "async"):
        stats = summary(samples[mode])
        row[f"{mode}_tpot_ms"], row[f"{mode}_spread"] = stats["median_ms"], stats["spread"]
        row[f"{mode}_samples_ms"] = stats["samples_ms"]
        if opts.device == "cuda":
            row[f"{mode}_gpu_busy"] = statistics.median(row.pop(f"{mode}_gpu_busy_samples"))
    row["async_speedup"] = row["sync_tpot_ms"] / row["async_tpot_ms"]
    if "hbm_floor_ms" in results:
        row["async_over_floor"] = row["async_tpot_ms"] / results["hbm_floor_ms"]
    for peer in opts.peers:
        progress(f"batch {batch}: {peer}")
        row[f"{peer}_tpot_ms"] = transformers_tpot(path, opts.device, batch, opts.short,
                                                   opts.long, static=peer.endswith("static")) * 1e3
    return row


def _print_table(r: dict) -> None:
    cuda = "hbm_floor_ms" in r
    floor = f"; HBM floor {r['hbm_floor_ms']:.3f} ms" if cuda else ""
    print(f"\n{r['date']} {r['device']} ({r['shape']}, {r['dtype']} random weights, commit "
          f"{r['commit']}, median of {r['repeats']} alternated repetitions ± spread){floor}")
    if "host" in r:
        print(describe(r["host"]))
    peers = [p for p in PEERS if f"{p}_tpot_ms" in (r["rows"][0] if r["rows"] else {})]
    head = ["batch", "sync TPOT ms", "async TPOT ms", "async speed-up"]
    head += ["async / floor", "GPU busy sync", "GPU busy async"] if cuda else []
    head += [p.replace("_", " ") + " ms" for p in peers]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in r["rows"]:
        cells = [str(row["batch"]), f"{row['sync_tpot_ms']:.3f} ± {row['sync_spread']:.0%}",
                 f"{row['async_tpot_ms']:.3f} ± {row['async_spread']:.0%}",
                 f"{row['async_speedup']:.2f}x"]
        if cuda:
            cells += [f"{row['async_over_floor']:.2f}x", f"{row['sync_gpu_busy']:.0%}",
                      f"{row['async_gpu_busy']:.0%}"]
        cells += [f"{row[f'{p}_tpot_ms']:.3f}" for p in peers]
        print("| " + " | ".join(cells) + " |")


def plot(r: dict, path: str) -> None:
    """TPOT against batch size: sync, async, the floor and the peers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = [row["batch"] for row in r["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("sync_tpot_ms", "sync"), ("async_tpot_ms", "async"),
                       *((f"{p}_tpot_ms", p.replace("_", " ")) for p in PEERS)):
        if r["rows"] and key in r["rows"][0]:
            ax.plot(batches, [row[key] for row in r["rows"]], marker="o", label=label)
    if "hbm_floor_ms" in r:
        ax.axhline(r["hbm_floor_ms"], color="gray", linestyle="--", label="HBM floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode time per output token (ms)")
    ax.set_title(f"{r['device']}, {r['shape']}, {r['date']}, {r['commit']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
