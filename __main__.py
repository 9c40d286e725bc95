"""``python -m lockstep ...``: the same command line as ``lockstep ...``."""
import sys

from lockstep.ci.cli import main

sys.exit(main())
