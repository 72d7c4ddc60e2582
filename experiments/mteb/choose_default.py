"""Apply RULE.md's rule 2 to the dev tables: does a candidate build replace today's default?

    python experiments/mteb/choose_default.py results/mteb/smollm2/table_dev.json [more backbones' tables] \
        --out results/mteb/dev_choice
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvemb_st.public_paths import public_command

from kvemb_lab.mteb_dev_rule import main as decide


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tables", nargs="+", type=Path, help="table_dev.json of each backbone measured")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    decide(args.tables, args.out, public_command(["python", "experiments/mteb/choose_default.py", *argv]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
