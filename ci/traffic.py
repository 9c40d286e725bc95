"""Serving traffic for ``lockstep bench --traffic``: seeded request streams and one serving run.

A *mix* draws requests with uniform random prompt and output lengths that arrive over time
(a seeded Poisson process, open loop: a client sends at its arrival time, whatever is still
open). The rate exceeds what the engine serves, so requests queue and ``max_num_seqs`` binds:
at every turnover the scheduler has someone to admit.

:func:`serve` drives Lockstep's engine the way a serving loop does (add what has arrived,
step, hand out what came back) and times each request from the client's side: time to first
token from its arrival, time per output token between its first and last token.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

from lockstep.engine import SamplingParams
from lockstep.engine.core import EngineCore


@dataclass(frozen=True)
class Mix:
    name: str
    requests: int
    max_num_seqs: int           # the engine's (the "concurrent requests")
    prompt: tuple[int, int]     # uniform lengths, inclusive
    output: tuple[int, int]
    rate: float                 # arrivals per second (Poisson)
    max_num_batched_tokens: int


MIXES = {
    # like the published async speed-ups: 48 concurrent, long inputs and outputs
    "long": Mix("long", 96, 48, (1024, 2048), (256, 1024), 24.0, 8192),
    # short requests: turnover at almost every step
    "short": Mix("short", 512, 32, (8, 128), (1, 16), 1000.0, 4096),
    # well under a second on a CPU, for the tests and a quick look
    "tiny": Mix("tiny", 24, 4, (4, 24), (1, 6), 4000.0, 64),
}


@dataclass(frozen=True)
class TrafficRequest:
    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int
    arrival_s: float


def requests_of(mix: Mix, vocab: int, seed: int = 0) -> list[TrafficRequest]:
    rng, t, out = random.Random(f"{mix.name}:{seed}"), 0.0, []
    for i in range(mix.requests):
        t += rng.expovariate(mix.rate)
        n = rng.randint(*mix.prompt)
        prompt = tuple(rng.randrange(3, vocab) for _ in range(n))
        out.append(TrafficRequest(f"{mix.name}-{i}", prompt, rng.randint(*mix.output), t))
    return out


@dataclass
class Timing:
    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0


@dataclass
class ServeResult:
    timings: dict[str, Timing] = field(default_factory=dict)
    wall_s: float = 0.0
    steps: int | None = None   # device steps (Lockstep's engine; a peer does not report them)

    def metrics(self) -> dict:
        done = [t for t in self.timings.values() if t.last is not None]
        tokens = sum(t.tokens for t in done)
        ttft = [1e3 * (t.first - t.sent) for t in done]
        tpot = [1e3 * (t.last - t.first) / (t.tokens - 1) for t in done if t.tokens > 1]
        return {"output_tokens": tokens, "output_tok_s": tokens / self.wall_s,
                "ttft_ms_median": statistics.median(ttft), "ttft_ms_p90": _quantile(ttft, 0.9),
                "tpot_ms_median": statistics.median(tpot) if tpot else None,
                "tpot_ms_mean": statistics.fmean(tpot) if tpot else None,
                "steps": self.steps,
                "tokens_per_step": None if not self.steps else tokens / self.steps,
                "wall_s": self.wall_s}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Arrivals:
    """The stream in arrival order: which requests have arrived by now."""

    def __init__(self, requests: list[TrafficRequest]) -> None:
        self.queue, self.start = list(requests), time.perf_counter()

    def due(self) -> list[TrafficRequest]:
        now, out = time.perf_counter() - self.start, []
        while self.queue and self.queue[0].arrival_s <= now:
            out.append(self.queue.pop(0))
        return out

    def wait_s(self) -> float:
        """Seconds until the next arrival."""
        return max(0.0, self.queue[0].arrival_s - (time.perf_counter() - self.start))


def serve(core: EngineCore, requests: list[TrafficRequest]) -> ServeResult:
    """Run the stream on ``core`` (idle) to the end."""
    arrivals, result = Arrivals(requests), ServeResult()
    steps0 = core.num_steps
    while arrivals.queue or core.has_unfinished_requests():
        for req in arrivals.due():
            core.add_request(req.request_id, list(req.prompt), SamplingParams(
                temperature=0.0, max_tokens=req.max_tokens, ignore_eos=True))
            result.timings[req.request_id] = Timing(arrivals.start + req.arrival_s)
        if not core.has_unfinished_requests():
            time.sleep(min(arrivals.wait_s(), 0.001))
            continue
        outputs = core.step()
        now = time.perf_counter()
        for out in outputs:
            timing = result.timings[out.request_id]
            if out.token_ids and timing.first is None:
                timing.first = now
            if out.finished:
                timing.last, timing.tokens = now, len(out.token_ids)
    result.wall_s = time.perf_counter() - arrivals.start
    result.steps = core.num_steps - steps0
    return result
