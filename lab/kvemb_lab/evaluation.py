"""One evaluation harness for every embedding method: sentences, documents and long inputs.

Scores always come from sentence-transformers' own evaluators where one fits (``EmbeddingSimilarityEvaluator``
for STS-B and the Lee document pairs, ``InformationRetrievalEvaluator`` for paragraph and passkey retrieval),
so numbers are comparable with any other ST model; topic labels are scored by leave-one-out k-NN
(:func:`kvemb_lab.doc_tasks.knn_accuracy`, ST has no such evaluator). The data are in
:mod:`kvemb_lab.doc_tasks`.

:func:`evaluate_model` embeds each distinct text of every task **once** per role (``text``, ``query``,
``document``) and scores the vectors with the very evaluator code (:class:`PrecomputedSTSEvaluator`,
:class:`PrecomputedIREvaluator`). Calibrated post-processing (:mod:`kvemb_st.postprocessing`) is then a
transform of those vectors, fitted on the calibration texts embedded by the same model, so every method is
scored with and without it at the cost of one embedding pass; the transform is the same math as the
module that ``add_postprocessing`` appends.

The paragraph task is built from STS-B itself: each query is the first sentence of a high-similarity pair,
and the relevant document is a paragraph that holds the partner sentence at a random place among unrelated
STS-B sentences. A model that only summarises the end of a text, or loses the middle of it, scores low here
even when it does well on single sentences.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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

from kvemb_st.pooling import Readout
from kvemb_st.postprocessing import POSTPROCESSING_MODES, check_postprocessing_args
from kvemb_st.postprocessing_fit import fit_postprocessing

from kvemb_lab.assets import load_sts_b
from kvemb_lab.doc_tasks import DocumentTask, SimilarityTask, TopicTask, knn_accuracy
from kvemb_lab.provenance import provenance, provenance_line

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


def precomputed_sts_metrics(
    model: SentenceTransformer, pairs: Sequence[StsPair], vectors: Mapping[str, np.ndarray], name: str = "sts"
) -> dict[str, float]:
    """Pearson and Spearman of cosine vs gold for vectors computed elsewhere (``vectors[text]``)."""
    evaluator = sts_evaluator(pairs, name=name, cls=PrecomputedSTSEvaluator)
    evaluator.vectors = {"text": vectors}
    metrics = evaluator(model)
    return {m: float(metrics[f"{name}_{m}_cosine"]) for m in ("pearson", "spearman")}


def precomputed_sts_spearman(
    model: SentenceTransformer, pairs: Sequence[StsPair], vectors: Mapping[str, np.ndarray]
) -> float:
    """Like :func:`evaluate_sts`, for vectors computed elsewhere (``vectors[text]``)."""
    return precomputed_sts_metrics(model, pairs, vectors)["spearman"]


def precomputed_document_metrics(
    model: SentenceTransformer,
    task: DocumentTask,
    queries: Mapping[str, np.ndarray],
    documents: Mapping[str, np.ndarray],
    name: str = "docs",
    metrics: Sequence[str] = DOC_METRICS,
) -> dict[str, float]:
    """Like :func:`evaluate_documents`, for vectors computed elsewhere."""
    evaluator = document_evaluator(task, name=name, cls=PrecomputedIREvaluator)
    evaluator.vectors = {"query": queries, "document": documents}
    scores = evaluator(model)
    return {m: float(scores[f"{name}_cosine_{m}"]) for m in metrics}


# ------------------------------------------------------------------------------------------- harness
ENCODERS = {"text": "encode", "query": "encode_query", "document": "encode_document"}  # role -> ST method
TEMPLATE_ROOM = 64  # tokens per copy of the text reserved for the template when max_seq_length is raised
LONG_BATCH_TOKENS = 8192  # texts of a long-input task per batch = this // their length (bounds attention memory)
Vectors = dict[str, dict[str, np.ndarray]]  # role -> text -> unit vector


@dataclass(frozen=True)
class PostSpec:
    """A post-processing to score: ``mode`` ``None`` is none; see :mod:`kvemb_st.postprocessing`.

    ``calibration`` names the calibration set it is fitted on
    (:func:`~kvemb_lab.calibration_sets.calibration_texts`); ``None`` is
    the one passed to :func:`evaluate_model` as a plain list.
    """

    mode: str | None = None
    components: int | None = None
    calibration: str | None = None

    @classmethod
    def parse(cls, text: str) -> PostSpec:
        """``none``, ``center``, ``remove_pcs:10``, ``whiten`` or ``whiten:256`` (output dimension), each
        optionally ``@SET`` (``whiten@general``, ``whiten:256@sts-b-train+general``)."""
        text, at, calibration = text.partition("@")
        if at and not calibration.strip():
            raise ValueError(f"post-processing {text + at!r}: name a calibration set after '@', e.g. whiten@general")
        mode, _, components = text.partition(":")
        if mode == "none" and not components:
            if at:
                raise ValueError(f"post-processing 'none@{calibration}': 'none' uses no calibration set")
            return cls()
        if components and not components.isdigit():
            raise ValueError(f"post-processing {text!r}: components must be a positive integer, got {components!r}")
        if mode not in POSTPROCESSING_MODES:
            raise ValueError(f"unknown post-processing {text!r}; use none or one of {', '.join(POSTPROCESSING_MODES)}")
        spec = cls(mode, int(components) if components else None, calibration.strip() or None)
        check_postprocessing_args(mode, spec.components)
        return spec

    @property
    def name(self) -> str:
        if self.mode is None:
            return "none"
        components = "" if self.components is None else f":{self.components}"
        return self.mode + components + ("" if self.calibration is None else f"@{self.calibration}")


def final_pooling(text: str) -> Readout:
    """A pooling to score from the same forward pass as others (``last``, ``mean``, ``mean+last[:W]``): a
    :class:`~kvemb_st.pooling.Readout` of the final output over all tokens (other readouts: :mod:`kvemb_lab.layer_probe`)."""
    readout = Readout.parse(text)
    if readout.layers is not None or readout.span != "all":
        raise ValueError(f"pooling {text!r}: --poolings scores the final output over all tokens; layers and the text "
                         "span are swept by experiments/doc_levers/doc_levers.py (kvemb_lab.layer_probe)")
    return readout


def pool_states(readout: Readout, states: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Pool each text's final hidden states ``(T_i, H)`` (real tokens only) into a unit vector."""
    return [
        torch.nn.functional.normalize(readout.pool(h[None], torch.ones(1, len(h))), dim=-1)[0].numpy() for h in states
    ]


@dataclass(frozen=True)
class EvalTask:
    """One task of the harness: the texts it needs per role and how it scores their vectors.

    ``max_tokens`` (long-input tasks) is the length of its texts; ``max_seq_length`` is raised to fit them.
    """

    name: str
    inputs: Mapping[str, Sequence[str]]
    score: Callable[[SentenceTransformer, Vectors], dict[str, float]]
    max_tokens: int | None = None


def sts_task(pairs: Sequence[StsPair], name: str = "sts") -> EvalTask:
    """Spearman of cosine on sentence pairs (``<name>_spearman``)."""
    texts = [s for pair in pairs for s in pair[:2]]
    return EvalTask(name, {"text": texts}, lambda model, v: {
        f"{name}_spearman": precomputed_sts_metrics(model, pairs, v["text"], name)["spearman"]})


def similarity_task(task: SimilarityTask, name: str = "lee", role: str = "document") -> EvalTask:
    """Pearson and Spearman of cosine vs the human score over document pairs (each document embedded once,
    by ``encode_document``: the same as ``encode`` for a model without a document side)."""
    pairs = task.text_pairs()
    return EvalTask(name, {role: task.texts}, lambda model, v: {
        f"{name}_{m}": value for m, value in precomputed_sts_metrics(model, pairs, v[role], name).items()})


def topic_task(task: TopicTask, k: int = 5, name: str = "newsgroups", role: str = "document") -> EvalTask:
    """Leave-one-out ``k``-NN accuracy of the topic labels (``<name>_<k>nn``), documents by ``encode_document``."""
    return EvalTask(name, {role: task.texts}, lambda model, v: {
        f"{name}_{k}nn": knn_accuracy(np.stack([v[role][t] for t in task.texts]), task.labels, k)})


def retrieval_task(
    task: DocumentTask, name: str = "docs", metrics: Sequence[str] = DOC_METRICS, max_tokens: int | None = None
) -> EvalTask:
    """Queries via ``encode_query``, documents via ``encode_document``; ``<name>_<metric>``."""

    def score(model: SentenceTransformer, v: Vectors) -> dict[str, float]:
        found = precomputed_document_metrics(model, task, v["query"], v["document"], name, metrics)
        return {f"{name}_{m}": value for m, value in found.items()}

    return EvalTask(name, {"query": list(task.queries.values()), "document": list(task.corpus.values())}, score, max_tokens)


@contextmanager
def room_for(model: SentenceTransformer, tokens: int | None) -> Iterator[None]:
    """Raise the embedding module's ``max_seq_length`` so texts of ``tokens`` tokens fit whole, then restore it."""
    module = model[0]
    old = module.max_seq_length
    if tokens is not None:
        module.max_seq_length = max(old, module.method.copies * (tokens + TEMPLATE_ROOM))
    try:
        yield
    finally:
        module.max_seq_length = old


def encode_texts(
    model: SentenceTransformer,
    texts: Sequence[str],
    role: str = "text",
    batch_size: int = 32,
    poolings: Sequence[Readout] | None = None,
) -> dict[str | None, dict[str, np.ndarray]]:
    """``{pooling name: {text: unit vector}}``, each distinct text embedded once with the role's ST method.

    Without ``poolings`` the model's own output is used (key ``None``). With them, every pooling is computed
    from the same final hidden states (``output_value="token_embeddings"``), so comparing poolings costs one
    forward pass; that needs a single-copy method (not echo, whose pooled tokens are a subset) and a model
    without post-processing modules.
    """
    unique = list(dict.fromkeys(texts))
    encode = getattr(model, ENCODERS[role])
    options = dict(batch_size=batch_size, show_progress_bar=False)
    if poolings is None:
        return {None: dict(zip(unique, encode(unique, convert_to_numpy=True, **options)))}
    if len(model) != 1 or model[0].method.copies != 1:
        raise ValueError(
            f"comparing poolings from one forward pass needs a model of one single-copy KVEmbedding module; this one "
            f"has {len(model)} module(s) and method {model[0].config.method!r}: score its own pooling instead"
        )
    states = encode(unique, output_value="token_embeddings", convert_to_numpy=False, **options)
    return {p.name: dict(zip(unique, pool_states(p, states))) for p in poolings}


def embed_task(
    model: SentenceTransformer, task: EvalTask, batch_size: int = 32, poolings: Sequence[Readout] | None = None
) -> dict[str | None, Vectors]:
    """``{pooling name: {role: {text: vector}}}`` (see :func:`encode_texts`; ``None`` = the model's pooling)."""
    if task.max_tokens is not None:
        batch_size = max(1, min(batch_size, LONG_BATCH_TOKENS // task.max_tokens))
    vectors: dict[str | None, Vectors] = {}
    with room_for(model, task.max_tokens):
        for role, texts in task.inputs.items():
            for name, table in encode_texts(model, texts, role, batch_size, poolings).items():
                vectors.setdefault(name, {})[role] = table
    return vectors


def evaluate_model(
    model: SentenceTransformer,
    tasks: Sequence[EvalTask],
    postprocessing: Sequence[PostSpec] = (PostSpec(),),
    calibration: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 32,
    poolings: Sequence[Readout] | None = None,
) -> dict[str, dict[str, float]]:
    """``{post-processing name: {metric: value}}`` for every task, each text embedded once.

    A post-processing is fitted on its calibration texts embedded with ``model.encode`` (the default prompt,
    as ``add_postprocessing`` does) and applied to every vector, queries and documents alike. ``calibration``
    is one list of texts, or ``{set name: texts}`` for :attr:`PostSpec.calibration` names; a text shared by
    several sets is embedded once. With ``poolings`` (:func:`encode_texts`) the keys are
    ``"<pooling>/<post-processing>"``, all from one forward pass per text.
    """
    sets = dict(calibration) if isinstance(calibration, Mapping) else {None: calibration}
    for post in postprocessing:
        if post.mode and not sets.get(post.calibration):
            which = "" if post.calibration is None else f" set {post.calibration!r}"
            raise ValueError(f"post-processing {post.name!r} needs calibration texts{which}; pass "
                             "calibration=calibration_texts(...) (or {name: texts} for named sets)")
    vectors = {task.name: embed_task(model, task, batch_size, poolings) for task in tasks}
    needed = list(dict.fromkeys(t for post in postprocessing if post.mode for t in sets[post.calibration]))
    embedded = encode_texts(model, needed, "text", batch_size, poolings) if needed else {}
    results: dict[str, dict[str, float]] = {}
    for pooling in [None] if poolings is None else [p.name for p in poolings]:
        for post in postprocessing:
            transform = None
            if post.mode is not None:
                reference = np.stack([embedded[pooling][t] for t in sets[post.calibration]])
                transform = fit_postprocessing(reference, post.mode, post.components).transform
            row: dict[str, float] = {}
            for task in tasks:
                table = vectors[task.name][pooling]
                if transform is not None:
                    table = {role: dict(zip(t, transform(np.stack(list(t.values()))))) for role, t in table.items()}
                row.update(task.score(model, table))
            results[post.name if pooling is None else f"{pooling}/{post.name}"] = row
    return results


# ------------------------------------------------------------------------------------------- writers
def write_json(path: str | Path, data: Mapping[str, Any], assets: Iterable[str] = ()) -> dict[str, Any]:
    """A result file: ``data`` plus its ``provenance`` (commit, dirty flag, versions, the ``assets`` the run read),
    which is returned for the markdown file beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**data, "provenance": provenance(dict.fromkeys(assets))}
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return record["provenance"]


def write_result(stem: str | Path, data: Mapping[str, Any], markdown: str, assets: Iterable[str] = ()) -> None:
    """``<stem>.json`` (:func:`write_json`) and ``<stem>.md``: ``markdown`` ending in the Provenance line of the very
    record the JSON holds, so the table a reader sees is traceable without opening the JSON."""
    record = write_json(f"{stem}.json", data, assets)
    Path(f"{stem}.md").write_text(f"{markdown.rstrip()}\n\n{provenance_line(record)}\n", encoding="utf-8")


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
