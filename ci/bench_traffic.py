"""``lockstep bench --traffic``: serving traffic, sync vs async, before and after the
admission fix, and transformers' continuous batching on the same stream.

Per mix (:data:`~lockstep.ci.traffic.MIXES`), on one random checkpoint of the bench's shape:
a warm-up (the whole stream once per engine: Triton compiles a kernel per shape class), then
``repeats`` rounds; each round runs, in an order rotated from round to round,
the sync engine, the async engine, and the async engine *before the fix* (the zoo's
``admission_counts_retiring_requests``: a request whose last token is in flight still holds its
place among ``max_num_seqs``), each on the same seeded stream. Reported per variant: output
tokens/s, median TPOT and TTFT (ms, from the client's side), device steps and tokens per step,
as the median over rounds with the spread (max - min over the median); and the async over sync
ratio of tokens/s, round by round. The transformers peer (sync, and async where the version
has it) runs ``peer_repeats`` times on the same stream and weights.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lockstep.engine import LLM

from .bench import (SHAPES, BenchUsageError, check_outputs, progress, random_checkpoint,
                    versions)
from .host import describe, host_info
from .traffic import MIXES, Mix, requests_of, serve

VARIANTS = ("sync", "async", "async before the fix")
PEER = "transformers_cb"


@dataclass(frozen=True)
class TrafficOptions:
    device: str = "cuda"
    shape: str = "llama-3.2-1b"
    mixes: tuple[str, ...] = ("long", "short")
    repeats: int = 3
    peers: tuple[str, ...] = (PEER,)
    peer_repeats: int = 1
    out: str | None = None
    plot: str | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise BenchUsageError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BenchUsageError("--device cuda but no CUDA device is available")
        if self.shape not in SHAPES:
            raise BenchUsageError(f"--shape must be one of {tuple(SHAPES)}, got {self.shape!r}")
        unknown = [m for m in self.mixes if m not in MIXES]
        if not self.mixes or unknown:
            raise BenchUsageError(f"--mixes must name some of {tuple(MIXES)}, got "
                                  f"{','.join(self.mixes)!r}")
        if self.repeats < 1 or self.peer_repeats < 0:
            raise BenchUsageError(f"--repeats must be at least 1 (got {self.repeats}) and "
                                  f"--peer-repeats at least 0 (got {self.peer_repeats})")
        if set(self.peers) - {PEER}:
            raise BenchUsageError(f"--peers for --traffic: {PEER} or none, got {self.peers}")
        check_outputs(self.out, self.plot)


def _engine(path: str, opts: TrafficOptions, mix: Mix, async_scheduling: bool) -> LLM:
    longest = mix.prompt[1] + mix.output[1]
    return LLM(model=path, device=opts.device, async_scheduling=async_scheduling,
               dtype=torch.bfloat16 if opts.device == "cuda" else torch.float32,
               max_num_seqs=mix.max_num_seqs, max_num_batched_tokens=mix.max_num_batched_tokens,
               max_model_len=longest + 16,
               num_kv_blocks=2 * mix.max_num_seqs * (-(-longest // 16) + 1),
               timeline_steps=0)


def _before_the_fix():
    from .zoo import INJECTIONS, Patcher
    patch = Patcher()
    INJECTIONS["admission_counts_retiring_requests"].apply(patch)
    return patch


def _run_variant(variant: str, engines: dict, stream, mix: Mix) -> dict:
    patch = _before_the_fix() if variant == "async before the fix" else None
    try:
        core = engines["sync" if variant == "sync" else "async"].engine
        return serve(core, stream).metrics()
    finally:
        if patch is not None:
            patch.undo()


def bench_mix(path: str, opts: TrafficOptions, mix: Mix, vocab: int) -> dict:
    stream = requests_of(mix, vocab, opts.seed)
    engines = {"sync": _engine(path, opts, mix, False), "async": _engine(path, opts, mix, True)}
    for llm in engines.values():   # the whole stream once: every kernel shape compiled
        serve(llm.engine, stream)
    warm = stream[:mix.max_num_seqs]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(opts.repeats):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for variant in order:
            runs[variant].append(_run_variant(variant, engines, stream, mix))
            progress(f"{mix.name} round {r + 1}: {variant}: "
                     f"{runs[variant][-1]['output_tok_s']:.0f} tok/s")
    del engines
    if opts.device == "cuda":
        torch.cuda.empty_cache()
    if PEER in opts.peers and opts.peer_repeats:
        from .traffic_peer import async_supported, load_peer, peer_serve
        model = load_peer(path, opts.device)
        modes = [False] + ([True] if async_supported() and opts.device == "cuda" else [])
        for use_async in modes:
            name = f"{PEER} {'async' if use_async else 'sync'}"
            peer_serve(model, mix, stream[:len(warm)], use_async)   # its warm-up
            runs[name] = [peer_serve(model, mix, stream, use_async).metrics()
                          for _ in range(opts.peer_repeats)]
            progress(f"{mix.name}: {name}: {runs[name][-1]['output_tok_s']:.0f} tok/s")
        del model
    ratios = [a["output_tok_s"] / s["output_tok_s"] for a, s in zip(runs["async"], runs["sync"])]
    before = [a["output_tok_s"] / s["output_tok_s"]
              for a, s in zip(runs["async before the fix"], runs["sync"])]
    return {"mix": vars(mix) | {"prompt": list(mix.prompt), "output": list(mix.output)},
            "variants": {v: _summary(rs) for v, rs in runs.items()},
            "async_over_sync": _spread(ratios), "async_before_fix_over_sync": _spread(before)}


def _spread(values: list[float]) -> dict:
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median if median else 0.0
    return {"median": median, "spread": spread, "all": values}


def _summary(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = _spread(values) if values else None
    return out


def run_traffic_bench(opts: TrafficOptions) -> dict:
    opts.validate()
    if opts.device == "cpu":
        torch.set_num_threads(1)   # a tiny model: more threads only contend
    results = {"device": torch.cuda.get_device_name() if opts.device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "shape": opts.shape,
               "repeats": opts.repeats, **versions(), "host": host_info(), "mixes": []}
    progress(describe(results["host"]))
    config = SHAPES[opts.shape]
    dtype = torch.bfloat16 if opts.device == "cuda" else torch.float32
    with random_checkpoint(config, opts.device, dtype, prefix="lockstep-traffic-") as workdir:
        for name in opts.mixes:
            results["mixes"].append(bench_mix(str(workdir), opts, MIXES[name],
                                              config["vocab_size"]))
            print(json.dumps(results["mixes"][-1]["async_over_sync"]), flush=True)
    print_table(results)
    if opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=2))
    if opts.plot:
        plot(results, opts.plot)
    return results


def print_table(r: dict) -> None:
    print(f"\nlockstep bench --traffic: {r['device']}, {r['shape']}, commit {r['commit']}, "
          f"{r['repeats']} rounds; {describe(r['host'])}")
    print("| mix | variant | output tok/s | TPOT ms (median) | TTFT ms (median) | steps | "
          "tokens/step |\n|---|---|---|---|---|---|---|")
    for m in r["mixes"]:
        for variant, s in m["variants"].items():
            tpot, steps, per = s["tpot_ms_median"], s["steps"], s["tokens_per_step"]
            print(f"| {m['mix']['name']} | {variant} | {s['output_tok_s']['median']:.0f} "
                  f"(±{s['output_tok_s']['spread']:.0%}) | "
                  f"{'-' if tpot is None else format(tpot['median'], '.2f')} | "
                  f"{s['ttft_ms_median']['median']:.1f} | "
                  f"{'-' if steps is None else format(steps['median'], '.0f')} | "
                  f"{'-' if per is None else format(per['median'], '.2f')} |")
        a, b = m["async_over_sync"], m["async_before_fix_over_sync"]
        print(f"| {m['mix']['name']} | async / sync tok/s | {a['median']:.3f} "
              f"(±{a['spread']:.0%}); before the fix {b['median']:.3f} (±{b['spread']:.0%}) "
              f"| | | | |")


def plot(r: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = (("output_tok_s", "output tokens/s"), ("tpot_ms_median", "TPOT ms (median)"),
            ("ttft_ms_median", "TTFT ms (median)"))
    fig, axes = plt.subplots(len(r["mixes"]), 3, figsize=(13, 3.6 * len(r["mixes"])),
                             squeeze=False)
    for row, m in zip(axes, r["mixes"]):
        names = list(m["variants"])
        for ax, (key, label) in zip(row, keys):
            values = [(m["variants"][n][key] or {"median": 0})["median"] for n in names]
            ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
            ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names],
                          fontsize=7)
            ax.set_title(f"{m['mix']['name']}: {label}", fontsize=9)
    fig.suptitle(f"lockstep bench --traffic: {r['device']}, {r['shape']}, commit {r['commit']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
