"""Collect a sweep's results:

    python -m launcher.sweep outputs/mrpc_bert     # the sweep root: the base recipe's output.dir

prints every task's settings, state, final metrics and throughput as one table (launcher/cluster/sweeps.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from launcher.cluster.sweeps import SweepError, collect, format_table


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.sweep",
                                     description="Collect the results of a sweep submitted with --array.")
    parser.add_argument("root", help="the sweep's root folder (the base recipe's output.dir)")
    args = parser.parse_args(argv)
    try:
        print(format_table(collect(args.root)))
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
