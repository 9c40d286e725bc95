"""The ``lockstep`` command line."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lockstep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gate = sub.add_parser("gate", help="run the regression gate (exit status 1 on failure)")
    gate.add_argument("--model", default=None,
                      help="checkpoint directory; default: the embedded default model")
    gate.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.command == "gate":
        from .gate import run_gate
        return run_gate(model=args.model, device=args.device)
    return 2


if __name__ == "__main__":
    sys.exit(main())
