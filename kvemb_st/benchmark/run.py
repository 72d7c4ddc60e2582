"""Evaluate a model on MTEB tasks with ``mteb.evaluate``, into mteb's result layout, plus a summary of the run.

Results go through mteb's own result objects and :class:`mteb.ResultCache` into
``<output>/results/<model>/<revision>/<task>.json`` (mteb's layout; a subsampled run lands under
``.../<revision>/experiments/max_examples_<n>_seed_<s>/``, because the sampling is part of the model meta's
``experiment_kwargs``, so it can never be taken for a full run). Every task is run again (``overwrite_strategy
="always"``): a cached score is never reused. ``kvemb_summary.json`` beside them holds the main score per task,
where each task's data came from, the sampling, and the package versions (of every task filed there: a later run
of other tasks adds its own).
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvemb_st.benchmark import get_task, import_mteb, quiet_mteb
from kvemb_st.benchmark.identity import mteb_model
from kvemb_st.benchmark.local_tasks import SAMPLING_RULE, DataOrigin, Sampling, load_local_task

SUMMARY_FILE = "kvemb_summary.json"
VERSIONED = ("kvemb-st", "mteb", "sentence-transformers", "transformers", "torch")
@dataclass
class RunSummary:
    """What one run measured: main score per task, the model's identity, the data and how it was sampled."""

    model: str
    revision: str
    scores: dict[str, float] = field(default_factory=dict)
    main_scores: dict[str, str] = field(default_factory=dict)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    sampling: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    command: str | None = None
    results: list[Any] = field(default_factory=list, repr=False)  # mteb's TaskResult objects
    folder: Path | None = None  # where mteb wrote the results and this summary went

    def to_dict(self) -> dict[str, Any]:
        skip = {"results", "folder"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def table(self) -> str:
        """A plain-text table: task, main score metric, score."""
        width = max([len("task"), *map(len, self.scores)])
        lines = [f"{'task':<{width}}  {'metric':<16}  score", f"{'-' * width}  {'-' * 16}  ------"]
        lines += [f"{t:<{width}}  {self.main_scores[t]:<16}  {s:.4f}" for t, s in self.scores.items()]
        return "\n".join(lines)


def load_tasks(names: Sequence[str], data_dir: str | Path | None, sampling: Sampling) -> list[tuple[Any, DataOrigin]]:
    """mteb's tasks with their data loaded: from ``data_dir`` (offline copy) or, without it, as mteb loads them."""
    if data_dir is not None:
        return [load_local_task(name, data_dir, sampling=sampling) for name in names]
    if sampling.max_examples is not None:
        raise ValueError("max_examples subsamples the local copies: give a data folder (--data-dir) with it")
    loaded = []
    for name in names:
        task = get_task(name)
        dataset = task.metadata.dataset
        try:
            task.load_data()
        except OSError as err:  # ConnectionError, requests' and huggingface_hub's errors, a dataset not found
            raise ConnectionError(
                f"the data of MTEB task {name} (Hugging Face dataset {dataset['path']}) could not be loaded: "
                f"{type(err).__name__}: {err}. Without access to the Hub, pass the offline copy with --data-dir"
            ) from None
        loaded.append((task, DataOrigin(f"huggingface:{dataset['path']}@{dataset['revision']}")))
    return loaded


def run_tasks(
    model: Any,
    loaded: Sequence[tuple[Any, DataOrigin]],
    output: str | Path | None,
    *,
    sampling: Sampling = Sampling(),
    batch_size: int = 32,
    show_progress_bar: bool = True,
    command: str | None = None,
) -> RunSummary:
    """Evaluate ``model`` (a SentenceTransformer) with ``mteb.evaluate`` on loaded tasks (:func:`load_tasks`).

    ``sampling`` is how the tasks were subsampled (recorded, and part of mteb's experiment name); ``output`` is
    mteb's result cache folder (``None``: nothing written). Returns the :class:`RunSummary`.
    """
    mteb = import_mteb()
    from tqdm.auto import tqdm

    wrapper = mteb_model(model, experiment_kwargs=sampling.record())
    meta = wrapper.mteb_model_meta
    cache = mteb.ResultCache(cache_path=Path(output)) if output is not None else None
    summary = RunSummary(
        model=meta.name,
        revision=meta.revision,
        sampling={**sampling.record(), "rule": SAMPLING_RULE} if sampling.record() else None,
        versions={package: importlib.metadata.version(package) for package in VERSIONED},
        command=command,
    )
    progress = tqdm(loaded, desc="MTEB", unit="task", disable=not show_progress_bar)
    for task, origin in progress:
        name = task.metadata.name
        progress.set_postfix_str(name)
        with quiet_mteb():
            result = mteb.evaluate(
                wrapper, task, cache=cache, overwrite_strategy="always", encode_kwargs={"batch_size": batch_size},
                show_progress_bar=show_progress_bar,
            ).task_results[0]  # fmt: skip
        summary.results.append(result)
        summary.scores[name] = float(result.get_score())
        summary.main_scores[name] = task.metadata.main_score
        summary.data[name] = origin.to_dict()
    if cache is not None:
        summary.folder = cache.get_task_result_path(SUMMARY_FILE, meta).parent
        summary.folder.mkdir(parents=True, exist_ok=True)
        path = summary.folder / SUMMARY_FILE
        path.write_text(json.dumps(_with_earlier_tasks(summary.to_dict(), path), indent=2) + "\n", encoding="utf-8")
    return summary


def _with_earlier_tasks(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """The summary to write: this run's tasks plus those an earlier run of the same model revision and sampling
    filed in the same folder, whose result files stay there and so must keep their scores and data origin."""
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if (earlier.get("revision"), earlier.get("sampling")) != (data["revision"], data["sampling"]):
        return data
    merged = {key: {**earlier.get(key, {}), **data[key]} for key in ("scores", "main_scores", "data")}
    return {**data, **merged}
