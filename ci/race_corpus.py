"""The race corpus: pinned-buffer races on CUDA, racy by construction or correctly fenced.

Each scenario enqueues a non-blocking copy between a pinned host buffer and the device, on the
current stream or a side stream, with ``torch.cuda._sleep`` worth ``widen_ms`` queued just before
the copy (the copy stays pending while the host goes on), then maybe fences, then touches the host
buffer: a write to an H2D source or a read of a D2H destination. Ground truth is by construction:
no fence, or a wait on the wrong event, is a race; a correct fence (``event.synchronize()``,
``stream.synchronize()``, ``event.query()`` polled until True, or a chain of stream waits ending
in a host wait) is not.

* Verdict: the scenario under ``sync_guard.race_check()``; a race = ``BufferRace`` raised.
* Always-on verdict: the scenario under ``sync_guard.light()``. With the native hook (CUDA's
  default), the buffers are page-owning staging buffers (``sync_guard.staging_empty``) and the
  page guard sees the access itself, whoever makes it (``light_by: "page guard"``; a numpy
  read is then scored too). Without it, the light mode checks at a declared point of reuse:
  just before the host access, ``sync_guard.buffer_reused(event)`` with the event recorded
  after the copy, as the engine's staging buffers do (``light_by: "reuse point"``).
* ``corruption_observed`` (informative, no guard): for H2D, the device received the host's *new*
  value; for D2H, the host read a stale value. Racy scenarios should show it, fenced ones not.

Run by ``python -m lockstep.ci.sync_corpus`` (see there) or ``run_race_corpus()``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .sync_corpus import N, side_stream, sleep_cycles, unguarded

OLD, NEW = 1.0, 7.0  # H2D: the buffer holds OLD when copied, the racy write makes it NEW
AT = 3               # every write changes element AT; every read looks at it (or the sum)

WRITES = {
    "fill": lambda buf: buf.fill_(NEW),
    "setitem": lambda buf: buf.__setitem__(AT, NEW),
    "numpy": lambda buf: buf.numpy().__setitem__(slice(None), NEW),
    "add": lambda buf: buf.add_(NEW - OLD),
}
READS = {  # name -> (read, the value a read after the copy completed sees)
    "tolist": (lambda out: out.tolist()[AT], NEW),
    "sum": (lambda out: float(out.sum()), NEW * N),
    "numpy": (lambda out: float(out.numpy()[AT]), NEW),
}


def _poll(event) -> None:
    while not event.query():
        time.sleep(0.0002)


def _transitive(stream, event, before) -> None:
    """The current stream waits the copy's event; the host waits an event after that wait."""
    current = torch.cuda.current_stream()
    current.wait_event(event)
    after = torch.cuda.Event()
    after.record(current)
    after.synchronize()


FENCES = {  # name -> (fence(copy stream, event after the copy, event before the copy), racy)
    "none": (lambda stream, event, before: None, True),
    "wrong_event": (lambda stream, event, before: before.synchronize(), True),
    "event_sync": (lambda stream, event, before: event.synchronize(), False),
    "stream_sync": (lambda stream, event, before: stream.synchronize(), False),
    "query_poll": (lambda stream, event, before: _poll(event), False),
    "transitive": (_transitive, False),
}


@dataclass(frozen=True)
class RaceScenario:
    direction: str          # "h2d" (host write to a pending copy's source) | "d2h" (early read)
    access: str             # a key of WRITES (h2d) or READS (d2h)
    fence: str              # a key of FENCES
    stream: str = "current"  # "current" | "side": the stream the copy runs on
    must_detect: bool = True  # False: reported, not scored (a race the checker cannot see)
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.direction}_{self.stream}_{self.access}_{self.fence}"

    @property
    def racy(self) -> bool:
        return FENCES[self.fence][1]


def _scenarios() -> list[RaceScenario]:
    out = [RaceScenario("h2d", w, f) for w in WRITES
           for f in ("none", "event_sync", "stream_sync", "query_poll")]
    out += [RaceScenario("h2d", "fill", "none", "side"),
            RaceScenario("h2d", "fill", "transitive", "side"),
            RaceScenario("h2d", "setitem", "wrong_event", "side")]
    for r in READS:
        out += [RaceScenario("d2h", r, "none", must_detect=r != "numpy",
                             note="a read through a numpy view is invisible to torch"
                             if r == "numpy" else ""),
                RaceScenario("d2h", r, "event_sync")]
    out += [RaceScenario("d2h", "tolist", "query_poll"), RaceScenario("d2h", "sum", "stream_sync"),
            RaceScenario("d2h", "tolist", "event_sync", "side",
                         note="side.wait_event(producer) + host waits the side-stream event"),
            RaceScenario("d2h", "tolist", "transitive", "side"),
            RaceScenario("d2h", "tolist", "wrong_event", "side",
                         note="host waits an event recorded before the side copy")]
    return out


SCENARIOS: list[RaceScenario] = _scenarios()


def _staging() -> torch.Tensor:
    """A page-owning pinned buffer, as an engine's staging buffer should be: with the native
    hook, the light mode's page guard watches it without a declared reuse point."""
    import sync_guard
    return sync_guard.staging_empty(N, torch.float32, name="the scenario's pinned buffer")


def paged() -> bool:
    """Whether the light mode judges by the page guard here (the native hook is installed)."""
    from sync_guard import native, pages
    return native.installed() and pages.loaded()


def _h2d(sc: RaceScenario, cycles: int, at_reuse=None):
    """Returns (body, observe): body runs the scenario; observe() -> corruption observed.
    ``at_reuse(event)`` runs just before the host access, with the event recorded after the
    copy (the always-on mode's reuse-point check)."""
    buf = _staging().fill_(OLD)
    dev = torch.zeros(N, device="cuda")
    torch.cuda.synchronize()
    stream = side_stream() if sc.stream == "side" else torch.cuda.current_stream()

    def body() -> None:
        with torch.cuda.stream(stream):
            before = torch.cuda.Event()
            before.record(stream)
            torch.cuda._sleep(cycles)
            dev.copy_(buf, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        FENCES[sc.fence][0](stream, event, before)
        if at_reuse is not None:
            at_reuse(event)
        WRITES[sc.access](buf)
        event.synchronize()  # the host observes completion: numpy writes are found here

    return body, lambda: dev[AT].item() == NEW


def _d2h(sc: RaceScenario, cycles: int, at_reuse=None):
    out = _staging().zero_()
    dev = torch.zeros(N, device="cuda")
    torch.cuda.synchronize()
    current = torch.cuda.current_stream()
    stream = side_stream() if sc.stream == "side" else current
    read, fresh = READS[sc.access]
    seen = []

    def body() -> None:
        torch.cuda._sleep(cycles)  # a slow producer on the current stream
        dev.fill_(NEW)
        produced = torch.cuda.Event()
        produced.record(current)
        if stream is not current:
            stream.wait_event(produced)
        with torch.cuda.stream(stream):
            before = torch.cuda.Event()
            before.record(stream)
            if stream is not current:
                torch.cuda._sleep(cycles)  # widen the side copy too
            out.copy_(dev, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        FENCES[sc.fence][0](stream, event, before)
        if at_reuse is not None:
            at_reuse(event)
        seen.append(read(out))
        event.synchronize()

    return body, lambda: seen[-1] != fresh


@contextmanager
def _light_allowing_fences():
    """The always-on mode with the scenario's own waits allowed (only races are judged)."""
    import sync_guard
    from sync_guard._scope import Scope
    with sync_guard.light(), Scope("allow", "the scenario's fences", deep=False):
        yield


def race_verdict(body, guard) -> tuple[bool, str | None]:
    """Whether ``body`` under ``guard()`` raised a BufferRace, and its first line."""
    import sync_guard
    try:
        with guard():
            body()
        return False, None
    except sync_guard.BufferRace as race:
        return True, str(race).splitlines()[0]


def run_scenario(sc: RaceScenario, cycles: int) -> dict:
    import sync_guard
    row = {"name": sc.name, "direction": sc.direction, "access": sc.access, "fence": sc.fence,
           "stream": sc.stream, "racy": sc.racy, "must_detect": sc.must_detect, "note": sc.note,
           "detected": None, "report": None, "light": None, "light_report": None,
           "corruption_observed": None, "error": None}
    setup = _h2d if sc.direction == "h2d" else _d2h
    try:
        body, observe = setup(sc, cycles)  # the effect, with no checker armed
        body()
        torch.cuda.synchronize()
        row["corruption_observed"] = observe()
        body, _ = setup(sc, cycles)
        row["detected"], row["report"] = race_verdict(body, sync_guard.race_check)
        torch.cuda.synchronize()
        by_pages = paged()
        row["light_by"] = "page guard" if by_pages else "reuse point"
        if by_pages:   # a numpy read of a pending destination faults like any other access
            row["must_detect"] = True
        body, _ = setup(sc, cycles, None if by_pages else lambda event: sync_guard.buffer_reused(
            event, "the scenario's pinned buffer"))
        row["light"], row["light_report"] = race_verdict(body, _light_allowing_fences)
    except Exception as exc:  # noqa: BLE001 - a crash is a finding, not an abort
        row["error"] = repr(exc)
    torch.cuda.synchronize()
    return row


def summarize_races(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["must_detect"] or not r["racy"]]
    correct = [r for r in scored if r["error"] is None and r["detected"] == r["racy"]]
    return {
        "scored": len(scored), "correct": len(correct),
        "mismatches": [r["name"] for r in scored if r not in correct],
        "informative": {r["name"]: r["detected"] for r in rows if r not in scored},
        "errors": {r["name"]: r["error"] for r in rows if r["error"]},
        "racy_without_corruption": [r["name"] for r in rows
                                    if r["racy"] and r["corruption_observed"] is False],
        "fenced_with_corruption": [r["name"] for r in rows
                                   if not r["racy"] and r["corruption_observed"]],
        "light_correct": sum(r["error"] is None and r["light"] == r["racy"] for r in scored),
        "light_mismatches": [r["name"] for r in scored
                             if r["error"] is None and r["light"] != r["racy"]],
        "ok": bool(scored) and len(correct) == len(scored) and all(
            r["error"] is None and r["light"] == r["racy"] for r in scored),  # both modes
    }


def run_race_corpus(widen_ms: float = 20.0, names: list[str] | None = None) -> dict:
    with unguarded():
        cycles = sleep_cycles(widen_ms)
        rows = [run_scenario(sc, cycles) for sc in SCENARIOS if names is None or sc.name in names]
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "widen_ms": widen_ms, "scenarios": rows, "summary": summarize_races(rows)}


def print_race_report(result: dict) -> None:
    print(f"\nrace corpus on {result['device']}, copies delayed {result['widen_ms']} ms")
    print(f"{'scenario':36} {'truth':6} {'guard':6} {'light':6} {'corrupted':9} report")
    for r in result["scenarios"]:
        mark = "" if not r["must_detect"] and r["racy"] else (
            " !!" if r["detected"] != r["racy"] else "")
        mark += " (informative)" if not r["must_detect"] and r["racy"] else ""
        text = f"ERROR {r['error']}" if r["error"] else (r["report"] or "")
        verdict = {True: "race", False: "-", None: "?"}[r["detected"]]
        light = {True: "race", False: "-", None: "?"}[r["light"]]
        print(f"{r['name']:36} {'race' if r['racy'] else 'clean':6} {verdict:6} {light:6} "
              f"{str(r['corruption_observed']):9} {text[:90]}{mark}")
    s = result["summary"]
    print(f"race accuracy: {s['correct']}/{s['scored']}; always-on (light, at the reuse point): "
          f"{s['light_correct']}/{s['scored']}, mismatches {s['light_mismatches']}")
    print(f"race mismatches: {s['mismatches']}; informative (not scored): {s['informative']}")
    print(f"racy but no corruption seen: {s['racy_without_corruption']}; "
          f"fenced but corrupted: {s['fenced_with_corruption']}")
