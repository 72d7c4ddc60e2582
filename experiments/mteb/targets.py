"""Issue 26's targets on one backbone's test table: the default build against every baseline, same post-processing.

    python experiments/mteb/targets.py results/mteb/smollm2/table.json --default kv_bias1 \
        --out results/mteb/smollm2/targets
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvemb_st.public_paths import public_command

from kvemb_lab.evaluation import write_result
from kvemb_lab.mteb_targets import add_target_options, compare, read_table, render


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("table", type=Path, help="a backbone's table.json (run_table.py, test splits)")
    add_target_options(parser)
    args = parser.parse_args(argv)
    try:
        table = read_table(args.table, args.default)
    except ValueError as err:
        parser.error(str(err))
    comparisons = compare(table, args.default)
    command = public_command(["python", "experiments/mteb/targets.py", *argv])
    text = render(table, comparisons, args.default, command)
    print(text)
    if args.out is not None:
        data = {"backbone": table["backbone"], "default": args.default, "command": command,
                "comparisons": [c.record() for c in comparisons],
                "table": table.get("provenance")}  # fmt: skip
        write_result(args.out.with_suffix(""), data, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
