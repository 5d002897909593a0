"""Command line: `python -m minigpt4_min series [--out DIR] [--ci] [--only 00 01]`."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minigpt4_min", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("series", help="run the notebook series end-to-end with papermill")
    s.add_argument("--out", default="runs/series", help="output folder (notebooks, metrics)")
    s.add_argument("--ci", action="store_true", help="use the small parameters of notebooks/ci_params")
    s.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 00 01")
    s.add_argument("--kernel", default="python3")
    a = ap.parse_args(argv)
    if a.cmd == "series":
        from .series import run_series
        run_series(a.out, ci=a.ci, only=a.only, kernel=a.kernel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
