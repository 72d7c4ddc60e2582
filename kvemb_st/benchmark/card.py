"""MTEB scores into a model folder's card as Hugging Face ``model-index`` metadata (what the Hub shows as results).

The entries are mteb's own (``TaskResult.get_hf_eval_results``: task type, dataset id and revision, split,
subset, main score); a new run replaces the earlier entries of the same task, split and subset and keeps the rest.
The card's text is left as it is; only its YAML header changes, written by ``huggingface_hub.ModelCard``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData


def _key(result: EvalResult) -> tuple[Any, ...]:
    return (result.dataset_type, result.dataset_config, result.dataset_split, result.metric_type)


def write_model_index(folder: str | Path, model_name: str, task_results: Sequence[Any], data_source: str | None) -> Path:
    """Merge the results of mteb ``TaskResult`` objects into ``folder/README.md`` (created if absent).

    ``data_source`` names the local copy the data came from, recorded in each entry's ``source_name``.
    """
    path = Path(folder) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard(f"---\n---\n# {model_name}\n")
    if card.data is None:
        card.data = ModelCardData()
    new = [result for task_result in task_results for result in task_result.get_hf_eval_results()]
    for result in new:
        result.metric_value = round(float(result.metric_value), 6)
        if data_source:
            result.source_name = f"MTEB (data: {data_source})"
    keys = {_key(result) for result in new}
    card.data.eval_results = [r for r in card.data.eval_results or [] if _key(r) not in keys] + new
    card.data.model_name = card.data.model_name or model_name
    card.save(path)
    return path
