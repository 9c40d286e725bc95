"""The workload: one serialisable value holding everything a differential run depends on.

A workload is the engine configuration, the requests (id, prompt, sampling parameters, the driver
step at which each arrives), the aborts (driver step, id, which use of the id), forced
preemptions (driver steps) and, through repeated ids, request-id reuse.

Within one driver step a client's calls come in any order: each add and abort has an ``order``,
and the step's calls run in ascending order (at equal order, adds before aborts), then the forced
preemption (the harness's action, not a client's), then ``step()``. So "abort x, then add x
again" and "add x, then abort it" inside one step are both expressible. Requests are added in
list order: one that is due while an earlier one still waits (a reused id whose previous request
is neither finished nor aborted) waits too, so every engine sees the same arrival order. An id
is free again the moment its request's final output was reported or its abort was accepted.

It round-trips through versioned JSON exactly (``Workload.from_json(w.to_json()) == w``;
version 1 files, which had no ``order``, still load); loading validates it
(:meth:`Workload.validate`).
"""
from __future__ import annotations

import dataclasses
import json
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lockstep.engine import SamplingParams

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)   # version 1: no ``order`` (every call at order 0)
FORMAT_NAME = "lockstep-workload"


@dataclass(frozen=True)
class EngineSpec:
    """The engine configuration a workload runs under (the rest of ``LLM``'s defaults apply)."""

    model: str | None = "oracle"
    block_size: int = 4
    num_kv_blocks: int | None = 64
    max_num_batched_tokens: int = 64
    max_num_seqs: int = 8
    max_model_len: int | None = 256
    seed: int = 0

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))


@dataclass(frozen=True)
class RequestSpec:
    """One request: added at driver step ``arrival``, at position ``order`` among that step's
    calls (or as soon after as its id is free)."""

    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    arrival: int = 0
    order: int = 0


@dataclass(frozen=True)
class AbortSpec:
    """Abort the ``occurrence``-th request named ``request_id`` at driver step ``step``, at
    position ``order`` among that step's calls."""

    step: int
    request_id: str
    occurrence: int = 0
    order: int = 0


@dataclass(frozen=True)
class Workload:
    engine: EngineSpec = field(default_factory=EngineSpec)
    requests: tuple[RequestSpec, ...] = ()
    aborts: tuple[AbortSpec, ...] = ()
    preempt_steps: tuple[int, ...] = ()   # driver steps that force-preempt the newest request
    # the engine under test and its adapter's version (a replay runs there unless told otherwise)
    engine_under_test: str = "lockstep"
    adapter_version: str = ""

    def keys(self) -> list[tuple[str, int]]:
        """(request id, occurrence) for each request, in list order: how results are keyed."""
        seen: dict[str, int] = {}
        keys = []
        for r in self.requests:
            keys.append((r.request_id, seen.get(r.request_id, 0)))
            seen[r.request_id] = keys[-1][1] + 1
        return keys

    def readds_in_abort_step(self, aborted: set[tuple[str, int]] | None = None) -> int:
        """How many requests are added in the step that aborts their id's previous request,
        after the abort (of those ``aborted``, the aborts that reached a live request)."""
        due = {key: (r.arrival, r.order) for key, r in zip(self.keys(), self.requests)}
        return sum(1 for a in self.aborts
                   if (aborted is None or (a.request_id, a.occurrence) in aborted)
                   and (nxt := due.get((a.request_id, a.occurrence + 1))) is not None
                   and nxt[0] == a.step and nxt[1] > a.order)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "engine": dataclasses.asdict(self.engine),
                "requests": [{"request_id": r.request_id, "prompt": list(r.prompt),
                              "params": _params_to_dict(r.params), "arrival": r.arrival,
                              "order": r.order}
                             for r in self.requests],
                "aborts": [dataclasses.asdict(a) for a in self.aborts],
                "preempt_steps": list(self.preempt_steps),
                "engine_under_test": {"name": self.engine_under_test,
                                      "adapter_version": self.adapter_version}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def validate(self) -> None:
        """Raise ValueError, naming the field and value, for what no run could mean: an empty or
        non-string request id, a negative arrival, preemption or abort step, an abort of an id
        no request has or of an occurrence beyond that id's requests. (What the engine refuses,
        such as a prompt outside the vocabulary, the engine checks.)"""
        uses: dict[str, int] = {}
        for i, r in enumerate(self.requests):
            if not isinstance(r.request_id, str) or not r.request_id:
                raise ValueError(f"requests[{i}].request_id={r.request_id!r} must be a "
                                 f"non-empty string")
            _non_negative(f"requests[{i}].arrival", r.arrival)
            _non_negative(f"requests[{i}].order", r.order)
            uses[r.request_id] = uses.get(r.request_id, 0) + 1
        for i, a in enumerate(self.aborts):
            _non_negative(f"aborts[{i}].step", a.step)
            _non_negative(f"aborts[{i}].occurrence", a.occurrence)
            _non_negative(f"aborts[{i}].order", a.order)
            if a.request_id not in uses:
                raise ValueError(f"aborts[{i}].request_id={a.request_id!r} names no request")
            if a.occurrence >= uses[a.request_id]:
                raise ValueError(f"aborts[{i}].occurrence={a.occurrence} but only "
                                 f"{uses[a.request_id]} request(s) use the id "
                                 f"{a.request_id!r} (occurrences count from 0)")
        for i, step in enumerate(self.preempt_steps):
            _non_negative(f"preempt_steps[{i}]", step)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Workload":
        """The workload ``data`` describes, validated; ValueError naming the field if not."""
        if not isinstance(data, dict):
            raise ValueError(f"a workload is a JSON object, got {type(data).__name__} "
                             f"{reprlib.repr(data)}")
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"format={data.get('format')!r}: not a {FORMAT_NAME} file")
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"version={data.get('version')!r}: this Lockstep reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        requests = tuple(RequestSpec(r["request_id"], tuple(r["prompt"]),
                                     SamplingParams(**r["params"]), r["arrival"],
                                     r.get("order", 0))
                         for r in data["requests"])
        tested = data.get("engine_under_test", {"name": "lockstep", "adapter_version": ""})
        workload = cls(EngineSpec(**data["engine"]), requests,
                       tuple(AbortSpec(**a) for a in data["aborts"]),
                       tuple(data.get("preempt_steps", ())), str(tested["name"]),
                       str(tested.get("adapter_version", "")))
        workload.validate()
        return workload

    @classmethod
    def from_json(cls, text: str) -> "Workload":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Workload":
        return cls.from_json(Path(path).read_text())


def _non_negative(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be an int >= 0")


def _params_to_dict(params: SamplingParams) -> dict[str, Any]:
    out = dataclasses.asdict(params)
    out["stop_token_ids"] = list(params.stop_token_ids)
    return out


class ClientCalls:
    """A workload's client calls, step by step, in the order the module docstring gives: every
    driver makes them the same way. ``calls(step, busy)`` yields ``("add", index)`` (the
    ``index``-th request, its key ``keys[index]``) and ``("abort", request_id, occurrence)``
    lazily, so an abort made just before frees its id for an add that follows; ``busy(id)``
    says whether an id still names an unfinished, unaborted request."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.keys = workload.keys()
        self.pending = list(range(len(workload.requests)))[::-1]   # next to add last
        self.aborts: dict[int, list[AbortSpec]] = {}
        self.orders: dict[int, set[int]] = {}
        for a in workload.aborts:
            self.aborts.setdefault(a.step, []).append(a)
            self.orders.setdefault(a.step, set()).add(a.order)
        for r in workload.requests:
            self.orders.setdefault(r.arrival, set()).add(r.order)

    def calls(self, step: int, busy):
        requests, aborts = self.workload.requests, self.aborts.pop(step, [])
        for order in sorted({0} | self.orders.pop(step, set())):
            while self.pending and (requests[self.pending[-1]].arrival,
                                    requests[self.pending[-1]].order) <= (step, order) \
                    and not busy(requests[self.pending[-1]].request_id):
                yield "add", self.pending.pop()
            for a in aborts:
                if a.order == order:
                    yield "abort", a.request_id, a.occurrence
