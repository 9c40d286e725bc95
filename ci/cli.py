"""The ``lockstep`` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from lockstep import __version__
    parser = argparse.ArgumentParser(prog="lockstep", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lockstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gate = sub.add_parser("gate", help="run the regression gate (exit status 0 passed, "
                          "1 a check failed, 2 a usage or environment error)")
    gate.add_argument("--model", default=None,
                      help="checkpoint directory for the checks that take a model (generate, "
                      "property-model); default: the embedded default model")
    gate.add_argument("--device", default="cpu",
                      help="cpu (simulated device) or cuda (adds the GPU checks and perf)")
    gate.add_argument("--quick", action="store_true",
                      help="the fast checks only, fewer examples (pre-push, about a minute)")
    gate.add_argument("--json", dest="json_path", metavar="FILE", help="write results as JSON")
    gate.add_argument("--junit-xml", dest="junit_path", metavar="FILE",
                      help="write results as JUnit XML")
    gate.add_argument("--only", default="", metavar="CHECKS",
                      help="comma-separated check names to run (default: all)")
    gate.add_argument("--engine", default="lockstep", metavar="NAME|module:factory",
                      help="the engine under test: lockstep (default), transformers, or a "
                      "factory of your own adapter (see docs/engines.md)")
    gate.add_argument("--record-perf-baseline", action="store_true",
                      help="with --device cuda: measure and store this GPU's perf baseline")
    zoo = sub.add_parser("zoo", help="apply every fault injection in a fresh process, prove it "
                         "misbehaves and that the gate catches it (exit status 1 on an escape)")
    zoo.add_argument("--device", default="cpu", help="cpu or cuda: the device the gate uses")
    zoo.add_argument("--only", default="", metavar="NAMES",
                     help="comma-separated injection names (default: all)")
    zoo.add_argument("--jobs", type=int, default=1, help="injections run in parallel")
    zoo.add_argument("--checks", default="", metavar="CHECKS",
                     help="comma-separated gate checks to run against each injection "
                     "(default: the whole gate; e.g. property,machine to measure the random "
                     "search alone)")
    zoo.add_argument("--json", dest="json_path", metavar="FILE", help="write the table as JSON")
    zoo.add_argument("--list", action="store_true", help="list the injections and exit")
    zoo.add_argument("--quick", action="store_true",
                     help="run the gate's --quick against each injection (its catch rate)")
    zoo.add_argument("--whole-gate", action="store_true",
                     help="run every check against each injection, not only up to the first "
                          "failure (the gate's time when it fails)")
    bench = sub.add_parser("bench", help="decode TPOT sync vs async vs the HBM floor")
    bench.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    bench.add_argument("--batch-sizes", default="1,8,64")
    bench.add_argument("--shape", default="llama-3.2-1b", choices=["llama-3.2-1b", "tiny"])
    bench.add_argument("--short", type=int, default=32, help="tokens of the short run")
    bench.add_argument("--long", type=int, default=160, help="tokens of the long run")
    bench.add_argument("--repeats", type=int, default=5, help="alternated repetitions")
    bench.add_argument("--no-transformers", action="store_true",
                       help="skip the transformers generate baselines (eager and static cache)")
    bench.add_argument("--peers", default=None,
                       help="which transformers baselines to run (comma-separated; default "
                            "transformers_eager,transformers_static, with --traffic "
                            "transformers_cb)")
    bench.add_argument("--out", default=None, help="write the results as JSON here")
    bench.add_argument("--plot", default=None, metavar="FILE.png",
                       help="draw TPOT against batch size (needs matplotlib)")
    bench.add_argument("--traffic", action="store_true",
                       help="serving traffic instead: request streams of mixed lengths arriving "
                            "over time; sync, async, async before the admission fix, and "
                            "transformers' continuous batching (peer: transformers_cb)")
    bench.add_argument("--mixes", default="long,short",
                       help="with --traffic: the traffic mixes (long, short, tiny)")
    bench.add_argument("--peer-repeats", type=int, default=1,
                       help="with --traffic: runs of the transformers peer per mode")
    guard = sub.add_parser("guard-bench", help="decode TPOT with sync_guard armed vs off")
    guard.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    guard.add_argument("--batch-sizes", default="1,8")
    guard.add_argument("--shape", default="llama-3.2-1b", choices=["llama-3.2-1b", "tiny"])
    guard.add_argument("--repeats", type=int, default=5,
                       help="alternated repetitions per mode (median and spread)")
    guard.add_argument("--out", default=None, help="write the results as JSON here")
    soak = sub.add_parser("soak", help="churn many requests with aborts and injected faults; "
                          "print RSS at 1k and at the end (exit 1 if anything leaked)")
    soak.add_argument("--requests", type=int, default=10_000)
    soak.add_argument("--device", default="sim", choices=["cpu", "sim", "cuda"])
    soak.add_argument("--policy", default="lazy", choices=["eager", "lazy", "threaded", "skewed"])
    soak.add_argument("--sync", action="store_true", help="sync scheduling (default: async)")
    soak.add_argument("--abort-rate", type=float, default=0.2)
    soak.add_argument("--fault-every", type=int, default=200,
                      help="about one injected fault per this many steps (0: none)")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--max-steps", type=int, default=None,
                      help="stop (exit 1) past this many engine steps (default: 50 per request "
                           "+ 1,000); also stops after 2,000 steps in which nothing finished")
    rep = sub.add_parser("replay", help="re-run a saved failing workload and print the report")
    rep.add_argument("file", help="a workload JSON file written by a failing property")
    rep.add_argument("--device", default="sim", choices=["sim", "cuda"])
    rep.add_argument("--policy", default=None, choices=["eager", "lazy", "threaded", "skewed"],
                     help="one sim policy (default: all three)")
    rep.add_argument("--engine", default=None, metavar="NAME|module:factory",
                     help="the engine to replay on (default: the one the file records)")
    fuzz = sub.add_parser("fuzz", help="a long fuzzing session of the differential property "
                          "on K workers sharing one example database (exit status 1 on failure)")
    fuzz.add_argument("--minutes", type=float, required=True, help="session length (may be 0.5)")
    fuzz.add_argument("--workers", type=int, required=True, help="worker processes")
    fuzz.add_argument("--db", required=True, metavar="DIR|redis://HOST:PORT",
                      help="the shared hypothesis example database")
    fuzz.add_argument("--out", required=True, metavar="DIR",
                      help="replay files and logs, one folder per worker")
    fuzz.add_argument("--profile", default="fuzz", choices=["ci", "dev", "fuzz"],
                      help="hypothesis settings profile (default: fuzz)")
    fuzz.add_argument("--engine", default="lockstep", metavar="NAME|module:factory",
                      help="the engine under test: lockstep (default), transformers, or a "
                      "factory of your own adapter (see docs/engines.md)")
    fuzz.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                      help="cpu: the simulated device where the engine has one (default)")
    fuzz.add_argument("--model", default="oracle", choices=["oracle", "default"],
                      help="the embedded model the workloads run on (default: oracle)")
    args = parser.parse_args(argv)
    try:
        check_options(args)
    except UsageError as exc:
        return _usage_error(args.command, exc)
    if args.command == "fuzz":
        from lockstep.property_tests.fuzz import FuzzConfig, run_fuzz
        return run_fuzz(FuzzConfig(args.minutes, args.workers, args.db, Path(args.out),
                                   args.profile, args.model, args.engine, args.device))
    if args.command == "replay":
        from lockstep.property_tests.replay import replay
        return replay(args.file, device=args.device, policy=args.policy, engine=args.engine)
    if args.command == "gate":
        from .gate import GateOptions, run_gate
        if args.record_perf_baseline:
            return _record_perf_baseline(args.device)
        return run_gate(GateOptions(model=args.model, device=args.device, quick=args.quick,
                                    json_path=args.json_path, junit_path=args.junit_path,
                                    only=tuple(n for n in args.only.split(",") if n),
                                    engine=args.engine))
    if args.command == "zoo":
        from .zoo.runner import ZooOptions, run_zoo
        return run_zoo(ZooOptions(device=args.device, jobs=args.jobs, json_path=args.json_path,
                                  only=tuple(n for n in args.only.split(",") if n),
                                  checks=tuple(n for n in args.checks.split(",") if n),
                                  list_only=args.list, quick=args.quick,
                                  whole_gate=args.whole_gate))
    if args.command == "soak":
        from .soak import print_soak, run_soak
        return print_soak(run_soak(args.requests, args.device, args.policy, not args.sync,
                                   abort_rate=args.abort_rate, fault_every=args.fault_every,
                                   seed=args.seed, max_steps=args.max_steps))
    from .bench import BenchOptions, BenchUsageError, parse_batch_sizes
    try:
        batch_sizes = parse_batch_sizes(args.batch_sizes)
        if args.command == "guard-bench":
            from .guard_bench import run_guard_bench
            if args.repeats < 1:
                raise BenchUsageError(f"--repeats={args.repeats}: at least 1")
            run_guard_bench(device=args.device, shape=args.shape, out=args.out,
                            batch_sizes=batch_sizes, repeats=args.repeats)
            return 0
        if args.traffic:
            from .bench_traffic import TrafficOptions, run_traffic_bench
            peers = "" if args.no_transformers else args.peers or "transformers_cb"
            run_traffic_bench(TrafficOptions(
                args.device, args.shape, tuple(m for m in args.mixes.split(",") if m),
                args.repeats, tuple(p for p in peers.split(",") if p), args.peer_repeats,
                args.out, args.plot))
            return 0
        from .bench import run_bench
        run_bench(BenchOptions(args.device, batch_sizes, args.shape, args.short, args.long,
                               args.repeats, args.out, args.plot,
                               () if args.no_transformers else tuple(
                                   p for p in (args.peers or "transformers_eager,"
                                               "transformers_static").split(",") if p)))
    except BenchUsageError as exc:
        return _usage_error(args.command, exc)
    return 0


class UsageError(ValueError):
    """A bad option or a missing device: exit status 2 and one line, before any work."""


def check_options(args: argparse.Namespace) -> None:
    """Raise UsageError naming the option and its value for what argparse cannot check. The
    gate, bench and fuzz validate their other options themselves, also before any work."""
    # the gate checks --device (with its own wording) together with its other options
    if args.command != "gate" and getattr(args, "device", None) == "cuda" \
            and not _cuda_available():
        raise UsageError("--device cuda but no CUDA device is available")
    for holds, message in _rules(args):
        if not holds:
            raise UsageError(message)


def _rules(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """(holds, message) for each option of ``args.command`` checked here."""
    if args.command == "zoo":
        return [(args.jobs >= 1, f"--jobs must be at least 1, got {args.jobs}")]
    if args.command == "guard-bench" and args.out is not None:
        folder = Path(args.out).resolve().parent
        return [(folder.is_dir(), f"--out {args.out}: the folder {folder} does not exist")]
    if args.command == "soak":
        return [(args.requests >= 1, f"--requests must be at least 1, got {args.requests}"),
                (0 <= args.abort_rate <= 1,
                 f"--abort-rate must be in [0, 1], got {args.abort_rate}"),
                (args.fault_every >= 0,
                 f"--fault-every must be 0 (no faults) or more, got {args.fault_every}"),
                (args.max_steps is None or args.max_steps >= 1,
                 f"--max-steps must be at least 1, got {args.max_steps}")]
    return []


def _usage_error(command: str, exc: Exception) -> int:
    print(f"lockstep {command}: {exc}", file=sys.stderr)
    return 2


def _record_perf_baseline(device: str) -> int:
    if device != "cuda" or not _cuda_available():
        print("lockstep gate: --record-perf-baseline needs --device cuda and a CUDA device",
              file=sys.stderr)
        return 2
    from .perf import BASELINES, record_baseline
    entry = record_baseline()
    print(f"recorded {BASELINES}: {entry}")
    return 0


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
