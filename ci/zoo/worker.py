"""One zoo entry in its own process: demonstrate the injection, apply it, run the gate.

``python -m lockstep.ci.zoo.worker NAME --device cpu --out FILE`` writes one JSON object:
the demonstration (or why none showed), the first gate check that failed, its detector, and
the seconds from the gate's start to that failure. ``NAME`` ``clean`` runs the whole gate on
the clean engine instead.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time

import torch


def run(name: str, device: str, checks: tuple[str, ...] = (), quick: bool = False,
        whole_gate: bool = False) -> dict:
    from lockstep.ci.gate import GateOptions, run_check, selected, validate
    from lockstep.ci.watchdog import CheckHang, watchdog
    from lockstep.property_tests import profiles

    from . import INJECTIONS, Patcher
    from .witness import demonstrate
    out: dict = {"name": name, "whole_gate": whole_gate}
    if name != "clean":
        injection = INJECTIONS[name]
        out["class"] = injection.bug_class

        def apply():
            patch = Patcher()
            injection.apply(patch)
            return patch.undo
        start = time.perf_counter()
        try:
            with watchdog("demonstration", stall_s=5):
                out["demonstration"] = demonstrate(injection.witness, apply)
        except (AssertionError, CheckHang) as exc:
            out["demonstration_failed"] = str(exc)
        out["demonstration_s"] = time.perf_counter() - start
        injection.apply(Patcher())  # for the rest of this process: it is the process's purpose
    stop = name != "clean" and not whole_gate
    options = GateOptions(device=device, stop_at_first_failure=stop, stall_s=10, only=checks,
                          quick=quick)
    validate(options)
    profiles.load("ci")
    out["checks"], elapsed = [], 0.0
    for check in selected(options):
        result = run_check(check, options)
        elapsed += result.seconds
        out["checks"].append({"name": result.name, "status": result.status,
                              "seconds": result.seconds})
        if result.status == "fail" and "caught_by" not in out:
            out.update(caught_by=f"{result.name}: {result.detector}", seconds_to_catch=elapsed,
                       message=result.detail, replay=result.replay)
        if result.status == "fail" and (stop or result.hung):
            break   # after a hang, the stuck engine's threads may still spin (see the gate)
    out["gate_s"] = elapsed
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checks", default="", help="comma-separated gate checks (default all)")
    parser.add_argument("--quick", action="store_true", help="the gate's --quick")
    parser.add_argument("--whole-gate", action="store_true",
                        help="run every check, not only up to the first failure")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for logger in ("sync_guard", "lockstep"):
        logging.getLogger(logger).setLevel(logging.CRITICAL)
    os.environ.setdefault("LOCKSTEP_REPLAY_DIR", tempfile.mkdtemp(prefix="lockstep-zoo-"))
    with contextlib.redirect_stdout(io.StringIO()):  # hypothesis' own reports
        result = run(args.name, args.device, tuple(c for c in args.checks.split(",") if c),
                     args.quick, args.whole_gate)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
