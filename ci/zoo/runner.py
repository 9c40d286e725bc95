"""``lockstep zoo``: every injection in a fresh process, against the gate, as one table.

For each injection a worker process (:mod:`.worker`) demonstrates that it misbehaves, applies
it, and runs the gate's checks until the first one fails; one more worker runs the whole gate
on the clean engine. The table: injection | class | caught by | seconds to catch (from the
gate's start to the failing check's end, process start and demonstration excluded). Exit 1
if any injection escapes (every check passed), shows no misbehaviour, or its worker dies or
runs past ``WORKER_TIMEOUT_S``; or if the clean engine fails a check.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import CLASSES, INJECTIONS

WORKER_TIMEOUT_S = 600


@dataclass
class ZooOptions:
    device: str = "cpu"
    jobs: int = 1
    json_path: str | None = None
    only: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()   # the gate's checks to run (default: all of them)
    list_only: bool = False
    quick: bool = False            # the gate's --quick
    whole_gate: bool = False       # every check runs, not only up to the first failure


def run_worker(name: str, device: str, folder: Path, checks: tuple[str, ...] = (),
               quick: bool = False, whole_gate: bool = False) -> dict:
    out = folder / f"{name}.json"
    start = time.perf_counter()
    flags = (["--quick"] if quick else []) + (["--whole-gate"] if whole_gate else [])
    try:
        proc = subprocess.run([sys.executable, "-m", "lockstep.ci.zoo.worker", name,
                               "--device", device, "--out", str(out),
                               "--checks", ",".join(checks), *flags],
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"worker ran past {WORKER_TIMEOUT_S} s"}
    result = json.loads(out.read_text()) if out.exists() else {
        "name": name, "error": f"worker exited {proc.returncode}: "
                               f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}"}
    result["process_s"] = time.perf_counter() - start
    return result


def verdict(r: dict) -> str | None:
    """Why this entry fails the zoo, or None."""
    if "error" in r:
        return r["error"]
    if r["name"] == "clean":
        return f"the clean engine failed {r['caught_by']}" if "caught_by" in r else None
    if "demonstration_failed" in r:
        return f"shows no misbehaviour: {r['demonstration_failed']}"
    if "caught_by" not in r:
        return "escaped: every gate check passed"
    return None


def run_zoo(options: ZooOptions) -> int:
    unknown = set(options.only) - set(INJECTIONS)
    if unknown:
        print(f"lockstep zoo: --only: unknown injections {sorted(unknown)}", file=sys.stderr)
        return 2
    from ..gate import CHECKS
    bad_checks = set(options.checks) - {c.name for c in CHECKS}
    if bad_checks:
        print(f"lockstep zoo: --checks: unknown gate checks {sorted(bad_checks)}", file=sys.stderr)
        return 2
    if options.device not in ("cpu", "cuda"):
        print(f"lockstep zoo: --device={options.device!r}: choose cpu or cuda", file=sys.stderr)
        return 2
    names = list(options.only or INJECTIONS)
    if options.list_only:
        for name in names:
            inj = INJECTIONS[name]
            print(f"{name:40} {CLASSES[inj.bug_class]:28} {inj.summary}")
        return 0
    print(f"lockstep zoo: {len(names)} injections + the clean engine, device={options.device}, "
          f"{options.jobs} at a time, checks: {','.join(options.checks) or 'the whole gate'}"
          f"{' (--quick)' if options.quick else ''}"
          f"{'; every check runs (the gate time when failing)' if options.whole_gate else ''}")
    print("| injection | class | caught by | seconds to catch |\n|---|---|---|---|")
    folder = Path(tempfile.mkdtemp(prefix="lockstep-zoo-"))
    start, results = time.perf_counter(), []
    with ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
        futures = [pool.submit(run_worker, n, options.device, folder, options.checks,
                               options.quick, options.whole_gate) for n in ["clean", *names]]
        for future in futures:
            r = future.result()
            results.append(r)
            print(_row(r), flush=True)
    wall = time.perf_counter() - start
    problems = [(r["name"], why) for r in results if (why := verdict(r))]
    caught = [r["seconds_to_catch"] for r in results if r["name"] != "clean"
              and "caught_by" in r]
    median = statistics.median(caught) if caught else float("nan")
    print(f"\nzoo: {len(caught)}/{len(names)} caught, median {median:.1f} s to catch, "
          f"max {max(caught, default=0):.1f} s; wall {wall:.0f} s")
    for name, why in problems:
        print(f"  FAIL  {name}: {why}")
    print("zoo: " + ("FAILED" if problems else "passed"))
    if options.json_path:
        Path(options.json_path).write_text(json.dumps(
            {"device": options.device, "quick": options.quick,
             "whole_gate": options.whole_gate, "wall_s": wall, "median_s_to_catch": median,
             "results": results, "problems": problems}, indent=2) + "\n")
    return 1 if problems else 0


def _row(r: dict) -> str:
    if r["name"] == "clean":
        status = f"FAILED {r['caught_by']}" if "caught_by" in r else "passed every check"
        seconds = r.get("gate_s", float("nan"))
        return f"| (clean engine) | - | {status} | {seconds:.1f} (whole gate) |"
    why = verdict(r)
    cls = CLASSES.get(r.get("class", ""), "?")
    caught = r.get("caught_by") or f"**{why}**"
    seconds = f"{r['seconds_to_catch']:.1f}" if "seconds_to_catch" in r else "-"
    if "seconds_to_catch" in r and r.get("whole_gate"):
        seconds += f" (whole gate {r['gate_s']:.1f})"
    return f"| {r['name']} | {cls} | {caught} | {seconds} |"
