"""Run a saved KV-Embedding (or baseline) model through MTEB on a list of tasks.

The folder is loaded with ``SentenceTransformer(folder, trust_remote_code=True)`` -- the module class is
``kvemb_st.module.KVEmbedding`` from this installed package -- and handed to ``mteb.evaluate``. Every
task's data is loaded *before* the model, so a machine without the data (offline, empty Hugging Face
datasets cache) fails at once with a message naming the missing dataset instead of a stack trace.
mteb is an optional dependency: ``pip install 'kvemb-st[mteb]'``. Example::

    python experiments/run_mteb/run_mteb.py models/kv-smollm2 --tasks STSBenchmark,SICK-R --out results/mteb

Writes mteb's own result files under ``<out>/`` and a summary ``<out>/<name>.json`` (main score per task).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'kvemb-st[mteb]'  (or: pip install mteb)"


class MTEBRunError(RuntimeError):
    """A condition the user can fix (missing package, data or model); reported without a traceback."""


def import_mteb() -> Any:
    try:
        import mteb
    except ImportError as err:
        raise MTEBRunError(f"mteb is not installed ({err}); install it with: {INSTALL_HINT}") from None
    return mteb


def resolve_tasks(mteb: Any, names: Sequence[str]) -> list[Any]:
    tasks = []
    for name in names:
        try:
            tasks.append(mteb.get_task(name))
        except KeyError as err:
            detail = str(err.args[0] if err.args else err).removeprefix("KeyError: ")
            raise MTEBRunError(f"unknown MTEB task {name!r}: {detail}") from None
    return tasks


def load_task_data(tasks: Sequence[Any]) -> None:
    """Load every task's data up front; a miss names the dataset and how to get it."""
    for task in tasks:
        try:
            task.load_data()
        except Exception as err:  # datasets/huggingface_hub raise many types for "not available here"
            dataset = (getattr(task.metadata, "dataset", None) or {}).get("path", "?")
            offline = any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
            raise MTEBRunError(
                f"the data of MTEB task '{task.metadata.name}' (Hugging Face dataset '{dataset}') is not available: "
                f"{type(err).__name__}: {err}\n"
                f"It is neither in the local datasets cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}) nor "
                f"reachable on the Hub{' (offline mode is on)' if offline else ''}. On a machine with internet, "
                f"download it with `python -c \"import mteb; mteb.get_task('{task.metadata.name}').load_data()\"` and "
                "copy the Hugging Face cache here (or point HF_HOME at it), then rerun"
                + ("." if offline else "; HF_HUB_OFFLINE=1 skips the network retries.")
            ) from None


def load_model(path: str, name: str, device: str | None) -> Any:
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(path, trust_remote_code=True, device=device)
    except (OSError, ValueError) as err:
        raise MTEBRunError(f"cannot load the model '{path}': {type(err).__name__}: {err}") from None
    model.model_card_data.model_name = name  # mteb names results (and its cache) after this
    return model


def run(
    model_path: str,
    tasks: Sequence[str | Any],
    out: str | Path,
    *,
    name: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``model_path`` on ``tasks`` (names or mteb task objects); return and write the summary."""
    mteb = import_mteb()
    resolved = resolve_tasks(mteb, [t for t in tasks if isinstance(t, str)])
    resolved += [t for t in tasks if not isinstance(t, str)]
    if not resolved:
        raise MTEBRunError("no tasks given; pass e.g. --tasks STSBenchmark")
    load_task_data(resolved)
    name = name or f"kvemb-st/{Path(model_path).resolve().name}"
    model = load_model(model_path, name, device)
    out = Path(out)
    result = mteb.evaluate(
        model,
        resolved,
        encode_kwargs={"batch_size": batch_size},
        cache=mteb.ResultCache(cache_path=out),
        overwrite_strategy="always",  # a run measures this folder now, never a cached result of another
        show_progress_bar=False,
    )
    summary = {
        "model": model_path,
        "name": name,
        "mteb_version": getattr(mteb, "__version__", "?"),
        "scores": {r.task_name: r.get_score() for r in result.task_results},
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name.replace('/', '__')}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="saved model folder (or Hub id) of a kvemb-st model")
    parser.add_argument("--tasks", required=True, help="comma-separated MTEB task names, e.g. STSBenchmark,SICK-R")
    parser.add_argument("--out", default="results/mteb", help="folder for mteb's result files and the summary")
    parser.add_argument("--name", default=None, help="model name in the results (default: kvemb-st/<folder name>)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        summary = run(args.model, tasks, args.out, name=args.name, batch_size=args.batch_size, device=args.device)
    except MTEBRunError as err:
        print(f"run_mteb: error: {err}", file=sys.stderr)
        return 2
    for task, score in summary["scores"].items():
        print(f"{task}: {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
