"""``kvemb eval``: a saved model's MTEB scores in one command (options and handler; cli.py registers it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvemb_st.benchmark import ENGLISH_BENCHMARK
from kvemb_st.benchmark.local_tasks import LOCAL_TASKS, Sampling
from kvemb_st.public_paths import public_command

DESCRIPTION = (
    "Evaluate a saved model on MTEB tasks with mteb's own evaluator: a summary table of the main score per task, "
    "mteb's result files under --output (<model>/<revision>/<task>.json), and with --card the scores in the "
    "folder's model card as Hugging Face model-index metadata and a table. Tasks load from the Hub as mteb loads "
    f"them, or from an offline copy with --data-dir (tasks read locally: {', '.join(LOCAL_TASKS)}); either way a "
    f"task is scored on the splits and subsets {ENGLISH_BENCHMARK} scores it on."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="saved kvemb-st model folder (or Hub id), loaded with kvemb_st.load")
    parser.add_argument("--tasks", required=True, help="comma-separated MTEB task names, e.g. STS12,SciFact")
    parser.add_argument("--data-dir", default=None, help="offline copy of the task data (default: the Hub)")
    parser.add_argument("--output", default="mteb-results", help="mteb's result folder (default: %(default)s)")
    parser.add_argument("--card", action="store_true", help="write the scores into FOLDER/README.md (model-index)")
    parser.add_argument("--max-examples", type=int, default=None, help="cap each evaluated split at N seeded rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of --max-examples (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: sentence-transformers' choice)")


def recorded_command(args: argparse.Namespace) -> str:
    """The command as the summary records it, never a machine path (:func:`~kvemb_st.public_paths.public_command`)."""
    words = ["kvemb", "eval", args.folder, "--tasks", args.tasks]
    if args.data_dir:
        words += ["--data-dir", args.data_dir]
    if args.max_examples is not None:
        words += ["--max-examples", str(args.max_examples), "--seed", str(args.seed)]
    return public_command(words + ["--card"] * args.card)


def run_eval(args: argparse.Namespace) -> int:
    """Load ``args.folder``, evaluate it, print the table (and write the card with ``--card``)."""
    import kvemb_st
    from kvemb_st.benchmark.card import write_model_index
    from kvemb_st.benchmark.run import load_tasks, run_tasks

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not tasks:
        raise ValueError("--tasks is empty; pass e.g. --tasks STS12,SciFact")
    if args.card and args.max_examples is not None:
        raise ValueError("--card records MTEB scores on whole tasks; leave out --max-examples to write the card")
    if args.card and not Path(args.folder).is_dir():
        raise ValueError(f"--card writes FOLDER/README.md, but '{args.folder}' is not a local folder")
    sampling = Sampling(args.max_examples, args.seed)
    try:
        loaded = load_tasks(tasks, args.data_dir, sampling)  # before the model: missing data fails at once
    except (ImportError, KeyError) as err:  # mteb missing, an unknown task name: say it in one line
        raise ValueError(str(err).strip("'\"")) from None
    model = kvemb_st.load(args.folder, device=args.device)
    summary = run_tasks(
        model, loaded, args.output, sampling=sampling, batch_size=args.batch_size, command=recorded_command(args)
    )
    print(f"model {summary.model} at revision {summary.revision}")
    print(summary.table())
    print(f"results: {summary.folder}")
    if args.card:
        sources = {task: origin["source"] for task, origin in summary.data.items()}
        print(f"model card: {write_model_index(args.folder, summary.model, summary.results, sources)}")
    return 0
