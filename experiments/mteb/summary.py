"""Issue 26's targets on every backbone side by side, from the backbones' test tables.

    python experiments/mteb/summary.py results/mteb/smollm2/table.json results/mteb/gemma3/table.json \
        results/mteb/qwen25/table.json --default kv_bias1 --out results/mteb/summary
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvemb_st.public_paths import public_command

from kvemb_lab.evaluation import write_result
from kvemb_lab.mteb_targets import add_target_options, compare, read_table, render_summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tables", type=Path, nargs="+", help="each backbone's table.json (run_table.py, test splits)")
    add_target_options(parser)
    args = parser.parse_args(argv)
    comparisons = {}
    for path in args.tables:
        try:
            table = read_table(path, args.default)
        except ValueError as err:
            parser.error(str(err))
        if table["backbone"] in comparisons:
            parser.error(f"{path}: backbone {table['backbone']!r} is given twice")
        comparisons[table["backbone"]] = compare(table, args.default)
    command = public_command(["python", "experiments/mteb/summary.py", *argv])
    text = render_summary(comparisons, args.default, command)
    print(text)
    if args.out is not None:
        data = {"default": args.default, "command": command, "backbones": {
            name: [c.record() for c in found]
            for name, found in comparisons.items()}}  # fmt: skip
        write_result(args.out.with_suffix(""), data, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
