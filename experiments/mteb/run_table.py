"""The MTEB table of issue 26 on one backbone (rules: experiments/mteb/RULE.md, written before any run).

    PYTHONPATH=$PWD:$PWD/lab python experiments/mteb/run_table.py --backbone smollm2 \
        --kv-folder MODELS/smollm2-kvemb --data-dir ../shared/mteb --cache-dir CACHE

Rows: the baselines from ``kvemb_st.from_base(base, method=m)`` and ``kv`` = the default build folder, each
without post-processing and with the default whitening; mteb's result files per row under
``results/mteb/<backbone>/<row>/``, the table in ``results/mteb/<backbone>/table.{md,json}`` (``table_full``
with ``--full``, ``table_dev`` with ``--splits dev``). Stopped, the same command resumes: finished tasks are
kept and every text already embedded is read from ``--cache-dir``. The same command again with ``--shortest-first``,
started beside the first, puts a second core on the same tasks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvemb_st.benchmark.local_tasks import Sampling
from kvemb_st.public_paths import public_command

from kvemb_lab import assets
from kvemb_lab.mteb_table import CAPPED, METHODS, POSTS, TablePlan, run_table

BASE_FOLDERS = {"smollm2": assets.smollm2_folder, "gemma3": assets.gemma3_folder, "qwen25": assets.qwen25_folder}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", required=True, choices=sorted(BASE_FOLDERS))
    parser.add_argument("--kv-folder", required=True, type=Path, help="the backbone's default build (kvemb build)")
    parser.add_argument("--data-dir", required=True, type=Path, help="the offline MTEB copy (the team's shared/mteb)")
    parser.add_argument("--cache-dir", required=True, type=Path, help="raw vector cache (outside the repository)")
    parser.add_argument("--output", type=Path, default=Path("results/mteb"), help="default: %(default)s")
    parser.add_argument("--methods", default=",".join(METHODS), help="default: %(default)s")
    parser.add_argument("--post", default=",".join(POSTS), help="default: %(default)s")
    parser.add_argument("--tasks", default=None, help="default: all 14 (with --splits dev: the dev tasks)")
    parser.add_argument("--splits", choices=("test", "dev"), default="test")
    parser.add_argument("--full", action="store_true", help="every example (default: RULE.md's cap of 1,000, seed 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--kv-row", default="kv", help="row name of --kv-folder: kv_<candidate> for a candidate build")
    parser.add_argument("--shortest-first", action="store_true",
                        help="embed the shortest texts first: started beside a run of the same command, the two "
                        "share the cache and meet in the middle (two cores on one long task)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    split = lambda text: tuple(word.strip() for word in text.split(",") if word.strip())  # noqa: E731
    plan = TablePlan(
        backbone=args.backbone, base_folder=Path(BASE_FOLDERS[args.backbone]()), kv_folder=args.kv_folder,
        data_dir=args.data_dir, output=args.output / args.backbone, cache_dir=args.cache_dir,
        command=public_command(["python", "experiments/mteb/run_table.py", *argv]),
        methods=split(args.methods), posts=split(args.post),
        tasks=split(args.tasks) if args.tasks else None, splits=args.splits,
        sampling=Sampling() if args.full else CAPPED, batch_size=args.batch_size, kv_row=args.kv_row,
        shortest_first=args.shortest_first,
    )  # fmt: skip
    table = run_table(plan, log=lambda line: print(line, flush=True))
    print(table.json_path.with_suffix(".md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
