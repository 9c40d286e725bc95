"""The workload: one serialisable value holding everything a differential run depends on.

A workload is the engine configuration, the requests (id, prompt, sampling parameters, the driver
step at which each arrives), the aborts (driver step, id, which use of the id), forced
preemptions (driver steps) and, through repeated ids, request-id reuse. Requests are added in list order: one that arrives while an
earlier one is still waiting to be added (a reused id whose previous holder has not finished)
waits too, so every engine sees the same arrival order. It round-trips through versioned JSON
exactly (``Workload.from_json(w.to_json()) == w``); loading validates it
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

FORMAT_VERSION = 1
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
    """One request: added at driver step ``arrival`` (or as soon after as its id is free)."""

    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    arrival: int = 0


@dataclass(frozen=True)
class AbortSpec:
    """Abort the ``occurrence``-th request named ``request_id`` at driver step ``step``."""

    step: int
    request_id: str
    occurrence: int = 0


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

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "engine": dataclasses.asdict(self.engine),
                "requests": [{"request_id": r.request_id, "prompt": list(r.prompt),
                              "params": _params_to_dict(r.params), "arrival": r.arrival}
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
            uses[r.request_id] = uses.get(r.request_id, 0) + 1
        for i, a in enumerate(self.aborts):
            _non_negative(f"aborts[{i}].step", a.step)
            _non_negative(f"aborts[{i}].occurrence", a.occurrence)
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
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"version={data.get('version')!r}: this Lockstep reads version "
                             f"{FORMAT_VERSION}")
        requests = tuple(RequestSpec(r["request_id"], tuple(r["prompt"]),
                                     SamplingParams(**r["params"]), r["arrival"])
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
