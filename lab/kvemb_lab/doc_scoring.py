"""Dev-data scoring of cached probe readouts: the text sets every document experiment embeds, and the scorer that
combines cached readouts and whitenings into Lee, newsgroups-dev 5-NN, subject -> body retrieval and STS-B dev."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

from kvemb_st.calibration import load_calibration
from kvemb_st.pooling import Readout
from kvemb_st.postprocessing_fit import fit_postprocessing

from kvemb_lab.backbones import BACKBONES, Backbone
from kvemb_lab.calibration_sets import calibration_texts
from kvemb_lab.doc_tasks import knn_accuracy, load_lee, load_newsgroup_retrieval, load_newsgroups
from kvemb_lab.evaluation import sts_pairs
from kvemb_lab.layer_probe import ProbeVectors


def text_sets(backbone: Backbone) -> dict[str, list[str]]:
    retrieval = load_newsgroup_retrieval("dev")
    return {
        "cal_sentences": load_calibration(),
        "cal_general": calibration_texts("general"),
        "cal_sts_paragraphs": load_calibration("sts-b-train-paragraphs"),
        "lee": list(load_lee().texts),
        "newsgroups": list(load_newsgroups("all").texts),
        "subjects": list(retrieval.queries.values()),
        "subjects_test": list(load_newsgroup_retrieval("test").queries.values()),
        "sts": [s for pair in sts_pairs("dev", backbone.sts_limit) for s in pair[:2]],
    }


def ndcg_mrr(queries: np.ndarray, docs: np.ndarray, relevant: list[set[int]], k: int = 10) -> tuple[float, float]:
    """Binary-relevance nDCG@k and MRR@k of cosine ranking, as sentence-transformers' IR evaluator defines them."""
    order = np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :k]
    ndcg, mrr = [], []
    for ranked, rel in zip(order, relevant):
        gains = np.array([1.0 if d in rel else 0.0 for d in ranked])
        discounts = 1.0 / np.log2(np.arange(2, k + 2))
        ideal = discounts[: min(len(rel), k)].sum()
        ndcg.append(float((gains * discounts).sum() / ideal))
        hits = np.flatnonzero(gains)
        mrr.append(1.0 / (hits[0] + 1) if hits.size else 0.0)
    return float(np.mean(ndcg)), float(np.mean(mrr))


class Scorer:
    """Loads the cached probes of one backbone and scores readout x whitening combinations."""

    def __init__(self, cache: Path, backbone: str, split: str = "dev") -> None:
        self.root = cache / backbone
        self.split = split
        self.backbone = BACKBONES[backbone]
        self._probes: dict[tuple[str, str], ProbeVectors] = {}
        lee = load_lee()
        self.lee_texts = list(lee.texts)
        self.lee_index = np.array([[i for i, _, _ in lee.pairs], [j for _, j, _ in lee.pairs]])
        self.lee_gold = np.array([score for _, _, score in lee.pairs])
        news = load_newsgroups("all")
        half = set(load_newsgroups(split).texts)
        self.news_texts = list(news.texts)
        self.news_dev = [i for i, t in enumerate(news.texts) if t in half]  # the split's half, dev unless told
        self.news_labels = np.array(news.labels)
        retrieval = load_newsgroup_retrieval(split)
        self.subjects = list(retrieval.queries.values())  # the split's queries; cached as ``subjects_set``
        self.subjects_set = "subjects" if split == "dev" else f"subjects_{split}"
        ids = list(retrieval.corpus)
        position = {text: i for i, text in enumerate(self.news_texts)}
        self.corpus = [position[retrieval.corpus[d]] for d in ids]  # corpus bodies = the newsgroups texts
        self.relevant = [{ids.index(d) for d in retrieval.relevant[q]} for q in retrieval.queries]
        pairs = sts_pairs("dev", self.backbone.sts_limit)
        self.sts_pairs = pairs

    def vectors(self, setting: str, text_set: str, readout: Readout) -> np.ndarray:
        key = (setting, text_set)
        if key not in self._probes:
            self._probes[key] = ProbeVectors.load(self.root / setting / f"{text_set}.npz")
        return self._probes[key].vectors(readout)

    def has(self, setting: str) -> bool:
        return (self.root / setting / "lee.npz").exists()

    def layers(self, setting: str) -> int:
        self.vectors(setting, "lee", Readout("last"))
        return self._probes[(setting, "lee")].layers

    def transform(self, setting: str, readout: Readout, calibration: str) -> Callable[[np.ndarray], np.ndarray]:
        if calibration == "none":
            return lambda x: x
        parts = [self.vectors(setting, f"cal_{part}", readout) for part in calibration.split("+")]
        return fit_postprocessing(np.concatenate(parts), "whiten").transform

    def documents(self, lee: np.ndarray, news: np.ndarray) -> dict[str, float]:
        """Lee and newsgroups-dev scores of (post-processed) document vectors: Lee's texts, all newsgroups texts."""
        cos = np.einsum("ij,ij->i", lee[self.lee_index[0]], lee[self.lee_index[1]])
        dev = news[self.news_dev]
        return {
            "lee_pearson": float(pearsonr(cos, self.lee_gold)[0]),
            "lee_spearman": float(spearmanr(cos, self.lee_gold)[0]),
            "newsgroups_5nn": knn_accuracy(dev, self.news_labels[self.news_dev], 5),
        }

    def retrieval(self, query: np.ndarray, docs: np.ndarray) -> dict[str, float]:
        ndcg, mrr = ndcg_mrr(query, docs[self.corpus], self.relevant)
        return {"retrieval_ndcg@10": ndcg, "retrieval_mrr@10": mrr}

    def sts(self, setting: str, readout: Readout, apply: Callable[[np.ndarray], np.ndarray]) -> float:
        probe_ = self._probes.get((setting, "sts")) or ProbeVectors.load(self.root / setting / "sts.npz")
        self._probes[(setting, "sts")] = probe_
        table = dict(zip(probe_.texts, apply(probe_.vectors(readout))))
        cos = [float(table[a] @ table[b]) for a, b, _ in self.sts_pairs]
        return float(spearmanr(cos, [s for _, _, s in self.sts_pairs])[0])
