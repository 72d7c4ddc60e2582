"""The MTEB table of issue 26: every method, with and without the default whitening, on one backbone's 14 tasks.

Scores are mteb's own (``kvemb_st.benchmark``: mteb's task objects fed from the local copy, ``mteb.evaluate``,
mteb's result files per row under ``<output>/<row>/``); nothing here computes a metric. What this module adds:
the rows (``kvemb_st.from_base(base, method=m)`` for the baselines, the default build folder for ``kv``), the
whitening fitted on the baselines exactly as ``kvemb build`` fits it, one cached forward pass per text and side
shared by a method's two rows (and by ``mean`` and ``last``, two readouts of one forward:
:mod:`kvemb_lab.vector_cache`), and the table (main score per task, mean per task
type, overall mean) rewritten after every task, so a stopped run keeps what it finished and resumes there.
The subsampling and the choice rules are fixed in ``experiments/mteb/RULE.md``, written before any run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sentence_transformers.base.modules import Router

from kvemb_st.benchmark import import_mteb
from kvemb_st.benchmark.identity import jsonable, refresh_revision
from kvemb_st.benchmark.local_tasks import SAMPLING_RULE, Sampling, load_local_task
from kvemb_st.benchmark.run import run_tasks
from kvemb_st.config import KVEmbeddingConfig
from kvemb_st.postprocessing import PostProcessing

from kvemb_lab.assets import STS_DISTRIBUTION
from kvemb_lab.backbones import BACKBONES, run_assets
from kvemb_lab.provenance import provenance, provenance_line
from kvemb_lab.vector_cache import CachedEncode, forward_signature

BASELINES = ("mean", "last", "prompteol", "echo", "token_prepending")
METHODS = ("kv", *BASELINES)
POSTS = ("none", "whiten")
TASKS = (
    "STSBenchmark", "STS12", "STS13", "STS14", "STS15", "STS16", "SICK-R", "BIOSSES", "SciFact",
    "Banking77Classification", "EmotionClassification", "AmazonCounterfactualClassification",
    "TweetSentimentExtractionClassification", "ImdbClassification",
)  # fmt: skip
# RULE.md's dev tasks and the split each is scored on (None: the task's own test split).
DEV_SPLITS: dict[str, list[str] | None] = {
    "STSBenchmark": ["validation"], "STS12": None, "SICK-R": None, "Banking77Classification": None,
    "EmotionClassification": ["validation"],
}  # fmt: skip
TASK_TYPES = ("STS", "Retrieval", "Classification")
CAPPED = Sampling(1000, 0)  # RULE.md: every evaluated split capped at 1,000 examples, seed 0
MEASURED = frozenset({"id_curve", "spread"})  # what a build's layer selection measures: the last bits vary by machine


def held_out_tasks(names: Iterable[str]) -> list[str]:
    """RULE.md: on test splits every task but the dev ones is held out, never chosen on."""
    return [name for name in names if name not in DEV_SPLITS]


def row_name(method: str, post: str) -> str:
    return method if post == "none" else f"{method}_{post}"


def row_of(plan: TablePlan, method: str, post: str) -> str:
    """The row a method fills: the kv build's rows carry the plan's ``kv_row`` (a candidate's name)."""
    return row_name(plan.kv_row if method == "kv" else method, post)


def type_means(scores: Mapping[str, float], types: Mapping[str, str]) -> dict[str, float | None]:
    """Mean main score per task type and over all tasks (``overall``); ``None`` where a task of it is missing."""

    def mean(names: Sequence[str]) -> float | None:
        return sum(scores[n] for n in names) / len(names) if names and all(n in scores for n in names) else None

    means = {kind: mean([n for n, t in types.items() if t == kind]) for kind in TASK_TYPES}
    return {**means, "overall": mean(list(types))}


def fit_build_whitening(model: Any, batch_size: int = 32) -> Any:
    """Append the whitening ``kvemb build`` appends by default, fitted the same way (same texts, document side)."""
    from kvemb_st.build import (
        DEFAULT_DOCUMENT_CALIBRATION,
        DEFAULT_DOCUMENT_STATISTICS,
        DEFAULT_POSTPROCESS,
        calibration_name_of,
    )
    from kvemb_st.calibration import load_calibration
    from kvemb_st.postprocessing_fit import add_postprocessing

    with_documents = "document" in model[0].config.sides
    return add_postprocessing(
        model, load_calibration(None, None), DEFAULT_POSTPROCESS, None, batch_size,
        calibration_name=calibration_name_of(None),
        document_texts=load_calibration(DEFAULT_DOCUMENT_CALIBRATION, None) if with_documents else (),
        document_name=calibration_name_of(DEFAULT_DOCUMENT_CALIBRATION) if with_documents else None,
        document_statistics=DEFAULT_DOCUMENT_STATISTICS and with_documents,
    )  # fmt: skip


@dataclass(frozen=True)
class TablePlan:
    """What one table run measures and where it writes (``output`` = ``results/mteb/<backbone>``)."""

    backbone: str
    base_folder: Path
    kv_folder: Path
    data_dir: Path
    output: Path
    cache_dir: Path
    command: str
    methods: tuple[str, ...] = METHODS
    posts: tuple[str, ...] = POSTS
    tasks: tuple[str, ...] | None = None  # None: all 14, or RULE.md's dev tasks with splits="dev"
    splits: str = "test"  # "test", or "dev" (RULE.md's dev tasks, validation splits where they have them)
    sampling: Sampling = CAPPED
    batch_size: int = 32
    kv_row: str = "kv"  # the rows of kv_folder: "kv" for the default build, another name for a candidate build
    shortest_first: bool = False  # embed shortest texts first: a second run of the same tasks beside a first

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS] + [p for p in self.posts if p not in POSTS]
        if unknown:
            raise ValueError(f"unknown methods/post-processing {unknown}; methods: {METHODS}, post-processing: {POSTS}")
        if not re.fullmatch(r"kv(_[a-z0-9]+)*", self.kv_row) or self.kv_row.endswith(tuple(f"_{p}" for p in POSTS)):
            raise ValueError(f"kv_row {self.kv_row!r}: name a kv build's rows 'kv' or 'kv_<candidate>' (a-z, 0-9)")
        if self.splits not in ("test", "dev"):
            raise ValueError(f"splits must be 'test' or 'dev', got {self.splits!r}")
        if self.tasks is None:
            object.__setattr__(self, "tasks", self.columns)
        bad = [t for t in self.tasks if t not in TASKS or (self.splits == "dev" and t not in DEV_SPLITS)]
        if bad:
            allowed = list(DEV_SPLITS) if self.splits == "dev" else list(TASKS)
            raise ValueError(f"tasks {bad} are not in this table ({self.splits} tasks: {allowed})")

    @property
    def columns(self) -> tuple[str, ...]:
        """Every task of this table, whichever of them this run measures: a run of some tasks keeps the others'
        columns, and a type's mean waits for all of its tasks."""
        return tuple(DEV_SPLITS) if self.splits == "dev" else TASKS

    @property
    def mode(self) -> str:
        """The table's name beside its rows: ``table`` (capped test), ``table_full``, ``table_dev``."""
        full = self.sampling.max_examples is None
        return "table" + ("_dev" if self.splits == "dev" else "") + ("_full" if full else "")

    def row_dir(self, row: str) -> Path:
        return self.output / ("dev" if self.splits == "dev" else "") / row

    def load_task(self, name: str) -> tuple[Any, Any]:
        splits = DEV_SPLITS.get(name) if self.splits == "dev" else None
        return load_local_task(name, self.data_dir, eval_splits=splits, sampling=self.sampling)


@dataclass
class Table:
    """The rows measured so far, written as ``<mode>.json`` and ``<mode>.md`` after every task."""

    plan: TablePlan
    types: dict[str, str] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # of the code that runs: taken once, at the start

    def __post_init__(self) -> None:
        plan = self.plan
        # every task's type from mteb's metadata (no data loaded), so a type's mean waits for all of its tasks
        self.types = {name: import_mteb().get_task(name).metadata.type for name in plan.columns} | self.types
        models = {"base_model": plan.base_folder.name, "kv_build": plan.kv_folder.name}
        known = [plan.backbone] if plan.backbone in BACKBONES else []  # a test's tiny model has no asset package
        assets = run_assets(known, data=(STS_DISTRIBUTION,))  # the STSBenchmark files
        self.provenance = self.provenance or {**provenance(assets), "models": models}

    @property
    def commit(self) -> str | None:
        """The commit this run measures with, marked ``+dirty`` when uncommitted changes were present."""
        commit = self.provenance.get("commit")
        return f"{commit}+dirty" if commit and self.provenance.get("dirty") else commit

    @property
    def json_path(self) -> Path:
        return self.plan.output / f"{self.plan.mode}.json"

    def resume(self) -> None:
        """Keep the rows of an earlier run of the same table (same sampling and splits)."""
        if self.json_path.is_file():
            old = json.loads(self.json_path.read_text(encoding="utf-8"))
            if old.get("sampling") == self.plan.sampling.record() and old.get("splits") == self.plan.splits:
                self.rows = with_recipes(old.get("rows", {}))

    def done(self, row: str, recipe: str, task: str) -> bool:
        record = self.rows.get(row, {})
        return record.get("recipe") == recipe and task in record.get("scores", {})

    def record(
        self, row: str, model: str, revision: str, task: str, score: float, seconds: float, embedded: int,
        recipe: str | None = None,
    ) -> None:
        """One score; ``recipe`` (default: ``revision``) is what the row measures, see :func:`row_recipe`."""
        self.resume()  # the rows another run of this table wrote meanwhile: two runs never drop each other's rows
        recipe = recipe or revision
        record = self.rows.setdefault(row, {})
        if record.get("recipe") != recipe:  # another model under the row's name: its old scores do not count
            record.clear()
        record.update(model=model, recipe=recipe, revision=revision, command=self.plan.command)  # the last run's
        # per task: a row filled over several runs names the code (commit) and model (revision) behind each score
        per_task = {"scores": score, "seconds": round(seconds, 1), "embedded": embedded, "commits": self.commit,
                    "revisions": revision}  # fmt: skip
        for key, value in per_task.items():
            record.setdefault(key, {})[task] = value
        self.write()

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan
        types = {t: self.types[t] for t in plan.columns}
        return {
            "backbone": plan.backbone, "splits": plan.splits, "command": plan.command,
            "sampling": plan.sampling.record(), "sampling_rule": SAMPLING_RULE if plan.sampling.record() else None,
            "task_types": types, "rows": self.rows,
            "means": {row: type_means(r.get("scores", {}), types) for row, r in self.rows.items()},
            "provenance": self.provenance,
        }  # fmt: skip

    def write(self) -> None:
        """Both files replaced whole (written aside, then renamed), so a run reading them never sees half."""
        data = self.to_dict()
        self.plan.output.mkdir(parents=True, exist_ok=True)
        markdown = self.json_path.with_suffix(".md")
        texts = {self.json_path: json.dumps(data, indent=2) + "\n", markdown: render_markdown(data)}
        for path, text in texts.items():
            aside = path.with_name(f".{path.name}.{os.getpid()}")
            aside.write_text(text, encoding="utf-8")
            os.replace(aside, path)


def render_markdown(data: Mapping[str, Any]) -> str:
    """The table as Markdown: one line per row, main score per task, type means, overall; then timings."""
    tasks = list(data["task_types"])
    held_out = held_out_tasks(tasks) if data["splits"] == "test" else []
    short = [t.removesuffix("Classification").replace("AmazonCounterfactual", "AmazonCF")
             + ("*" if t in held_out else "") for t in tasks]  # fmt: skip
    head = ["row", *short, *TASK_TYPES, "overall"]

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.4f}"

    lines = [f"# MTEB table: {data['backbone']} ({data['splits']} splits)", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, record in data["rows"].items():
        scores, means = record.get("scores", {}), data["means"][row]
        cells = [cell(scores.get(t)) for t in tasks] + [cell(means[k]) for k in (*TASK_TYPES, "overall")]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "Main score per task (mteb's own), mean per task type and over all tasks (–: not yet measured)."]
    if data["splits"] == "test":
        lines.append("*: held out, never chosen on (RULE.md). The dev tasks' single-split ones (STS12, SICK-R, "
                     "Banking77) are the numbers the dev rule chose on.")  # fmt: skip
    lines.append("")
    lines += ["| row | model | revision | seconds | texts embedded | commits |", "|---|---|---|---|---|---|"]
    for row, record in data["rows"].items():
        seconds, embedded = sum(record.get("seconds", {}).values()), sum(record.get("embedded", {}).values())
        tasks = record.get("scores", {})
        commits = ", ".join(sorted({str(record.get("commits", {}).get(t)) for t in tasks}))
        revisions = ", ".join(sorted({str(record.get("revisions", {}).get(t, record.get("revision"))) for t in tasks}))
        lines.append(f"| {row} | {record.get('model')} | {revisions} | {seconds:.0f} | {embedded} | {commits} |")
    sampling = data["sampling"]
    lines += ["", f"Sampling: {json.dumps(sampling) if sampling else 'none (every example)'}"]
    if data.get("sampling_rule"):
        lines.append(f"({data['sampling_rule']}; rules: experiments/mteb/RULE.md)")
    lines += ["", f"Command (the last run's): `{data['command']}`. Commits: the code behind each row's scores "
              "(None: not recorded). Revisions: the models mteb filed them under; a row can name several where its "
              "statistics were fitted again on another machine (same texts, same code, other last bits): a "
              "baseline's whitening, refitted by every run, or the same kv build made again.", "",
              provenance_line(data["provenance"]), ""]
    return "\n".join(lines)


def run_task(
    model: Any, row: str, recipe: str, name: str, table: Table, encode: CachedEncode, log: Any = print
) -> None:
    """One task for one row, unless the table already holds it for this recipe (:func:`row_recipe`)."""
    plan = table.plan
    if table.done(row, recipe, name):
        return
    task, origin = plan.load_task(name)
    embedded, start = encode.counts.embedded, time.perf_counter()
    summary = run_tasks(
        model, [(task, origin)], plan.row_dir(row), sampling=plan.sampling, batch_size=plan.batch_size,
        show_progress_bar=False, command=plan.command,
    )  # fmt: skip
    seconds, embedded = time.perf_counter() - start, encode.counts.embedded - embedded
    table.record(row, summary.model, summary.revision, name, summary.scores[name], seconds, embedded, recipe)
    log(f"{plan.backbone} {row} {name}: {summary.scores[name]:.4f} ({seconds:.0f} s, {embedded} texts embedded)")


def load_method(plan: TablePlan, method: str) -> tuple[Any, PostProcessing | Router | None]:
    """The method's model without post-processing, and the kv build's own post-processing module (a PostProcessing,
    or the Router of its per-side statistics; ``None`` for a baseline)."""
    import kvemb_st

    if method != "kv":
        return kvemb_st.from_base(**baseline_knobs(plan, method)), None
    model = kvemb_st.load(str(plan.kv_folder))
    post = model[-1] if isinstance(model[-1], (PostProcessing, Router)) else None
    if post is None:
        raise ValueError(f"the kv build folder {plan.kv_folder.name} has no PostProcessing: not a default build")
    use_post(model, None)
    return model, post


def baseline_knobs(plan: TablePlan, method: str) -> dict[str, Any]:
    """What a baseline row is built from (``from_base``'s arguments, equally a config's fields)."""
    return {"base_model": str(plan.base_folder), "method": method}


def sibling_methods(plan: TablePlan, model: Any, methods: Sequence[str]) -> list[str]:
    """The baselines among ``methods`` that run ``model``'s forward pass (``mean`` and ``last``: the same plain
    forward, two readouts): embedding a text for ``model`` caches their vectors of it too. Told apart by their
    configs, so no weights are loaded to find them; the cache checks the loaded pair again."""
    signature = forward_signature(model[0].config)
    return [
        method for method in methods
        if method != "kv" and forward_signature(KVEmbeddingConfig(**baseline_knobs(plan, method))) == signature
    ]  # fmt: skip


def use_post(model: Any, post: PostProcessing | Router | None) -> None:
    """Make ``post`` (or none) the model's last module; the model is another one then, with its own revision."""
    if isinstance(model[-1], (PostProcessing, Router)):
        del model[-1]
    if post is not None:
        model.append(post)
    refresh_revision(model)


def row_recipe(method: str, model: Any, raw_revision: str) -> str:
    """What a row measures, so a later run resumes it only for the same thing, on any machine; each score keeps the
    revision mteb filed it under. A baseline: its raw revision, whitened or not (each run refits its whitening, same
    texts, same code). The kv build: every module's configuration, without what a build measures in floats (the ID
    curve, the whitening statistics), whose last bits differ between machines: the same build made again resumes
    its rows, a build with another knob (window, bias, calibration set) starts them again."""
    if method != "kv":
        return raw_revision
    parts = []
    for module in model:
        for name, sub in [("", module)] if hasattr(module, "auto_model") else module.named_modules():
            if hasattr(sub, "get_config_dict"):  # a Router's own, then its sides' PostProcessing
                config = {key: value for key, value in sub.get_config_dict().items() if key != "kvemb_st_version"}
                if isinstance(config.get("layer_selection"), dict):
                    selection = config["layer_selection"].items()
                    config["layer_selection"] = {key: value for key, value in selection if key not in MEASURED}
                parts.append([name, type(sub).__name__, config])
    text = json.dumps(jsonable(parts), sort_keys=True, default=str)
    return "kv-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def with_recipes(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``rows`` as :meth:`Table.record` writes them: a row written before recipes were recorded gets its recipe
    (:func:`row_recipe`: a whitened baseline's raw row's revision) and each score the row's revision."""
    for row, record in rows.items():
        if "recipe" in record:
            continue
        raw = next((method for method in BASELINES if row == row_name(method, "whiten")), row)
        record["recipe"] = rows.get(raw, record)["revision"]  # a kv row: its revision (a run today starts it again)
        record["revisions"] = dict.fromkeys(record.get("scores", {}), record["revision"])
    return rows


def run_table(plan: TablePlan, log: Any = print) -> Table:
    """Every (method, post-processing) row of ``plan``, task by task: a method's rows advance together (the
    whitened row costs no forward pass), and the table is rewritten after every task."""
    table = Table(plan)
    table.resume()
    posts = [p for p in POSTS if p in plan.posts]
    siblings: dict[str, Any] = {}  # loaded once: for the cache of an earlier method's forward, then for their rows
    for index, method in enumerate(plan.methods):
        model, post = (siblings.pop(method), None) if method in siblings else load_method(plan, method)
        same = sibling_methods(plan, model, plan.methods[index + 1 :])
        siblings |= {other: load_method(plan, other)[0] for other in same if other not in siblings}
        encode = CachedEncode(model, plan.cache_dir, siblings=[siblings[other] for other in same],
                              shortest_first=plan.shortest_first)
        raw_revision = model.model_card_data.base_model_revision
        if post is None and "whiten" in posts:  # a baseline: fitted as kvemb build fits it, through the cache
            post = fit_build_whitening(model, plan.batch_size)[-1]
            use_post(model, None)
        for name in plan.tasks:
            for kind in posts:
                use_post(model, post if kind == "whiten" else None)
                recipe = row_recipe(method, model, raw_revision)
                run_task(model, row_of(plan, method, kind), recipe, name, table, encode, log)
        encode.close()
    return table
