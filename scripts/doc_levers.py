"""The document levers of issue 18, measured on dev data from one forward pass per text and setting.

Stage ``probe`` runs each forward setting (template, re-routed window, bias; or a baseline method) once over every
text set and caches all layers' readouts (:mod:`kvemb_st.layer_probe`: mean over all tokens, over the text's own
tokens, last token, at every layer). Stage ``score`` then combines them without another forward pass: every
document readout (pooling, layer or window of layers, token span) x every whitening (calibration sentences,
paragraphs or both, shared by both sides or one per side) on Lee (Pearson, Spearman), newsgroups-dev 5-NN and the
newsgroups subject -> body retrieval dev queries (nDCG@10, MRR@10, queries from the query side), plus STS-B dev of
the default side under each shared whitening. Never test data.

    python scripts/doc_levers.py probe smollm2            # ~15 min on 2 cores; cached under --cache
    python scripts/doc_levers.py score smollm2            # minutes; writes results/doc_levers/smollm2.{json,md}
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

import kvemb_st
from kvemb_st.assets import load_sts_b, qwen25_folder, smollm2_folder
from kvemb_st.calibration import load_calibration
from kvemb_st.config import COMPRESSION_TEMPLATE, PROMPTEOL_TEMPLATE
from kvemb_st.doc_tasks import knn_accuracy, load_lee, load_newsgroup_retrieval, load_newsgroups
from kvemb_st.evaluation import markdown_table, sts_pairs, write_json
from kvemb_st.layer_probe import ProbeVectors, probe
from kvemb_st.pooling import Readout
from kvemb_st.postprocessing import fit_postprocessing

ROOT = Path(__file__).resolve().parent.parent
PASSAGE_TEMPLATE = 'This passage : "{text}" means in one word:"'


@dataclass(frozen=True)
class Backbone:
    folder: Callable[[], Path]
    layers: str  # the window the default build picks
    early: str  # a window a third of the depth earlier
    sts_limit: int | None


BACKBONES = {
    "smollm2": Backbone(smollm2_folder, "20-29", "10-19", None),
    "qwen25": Backbone(qwen25_folder, "14-21", "6-13", 400),
}


def settings(backbone: Backbone) -> dict[str, dict[str, Any]]:
    """Forward settings by name: ``from_base`` keyword arguments (the default build's knobs unless named)."""
    kv = dict(method="kv", layers=backbone.layers)
    return {
        "kv": kv,
        "kv_compression": {**kv, "template": COMPRESSION_TEMPLATE},
        "kv_passage": {**kv, "template": PASSAGE_TEMPLATE},
        "kv_raw": {**kv, "template": "{text}"},
        "kv_bias0": {**kv, "prefix_bias": 0.0},
        "kv_bias5": {**kv, "prefix_bias": 5.0},
        "kv_early": {**kv, "layers": backbone.early},
        "mean": dict(method="mean"),
        "prompteol": dict(method="prompteol"),
        "echo": dict(method="echo"),
        "token_prepending": dict(method="token_prepending"),
    }


STS_SETTINGS = ("kv", "mean", "prompteol", "echo", "token_prepending")  # the default side and the baselines


def sts_paragraphs(count: int = 256, seed: int = 0) -> list[str]:
    """Paragraphs of 3-6 STS-B *train* sentences (none of the shipped calibration sentences): shippable texts."""
    used = set(load_calibration())
    sentences = sorted({s for a, b, _ in load_sts_b("train") for s in (a, b) if len(s.split()) >= 5} - used)
    rng = random.Random(seed)
    rng.shuffle(sentences)
    out, cursor = [], 0
    for _ in range(count):
        size = rng.randint(3, 6)
        out.append(" ".join(s if s[-1] in ".!?" else s + "." for s in sentences[cursor : cursor + size]))
        cursor += size
    return out


def general_paragraphs() -> list[str]:
    """The 256 paragraphs of the shipped general set (its other 256 texts are single sentences)."""
    texts = load_calibration("general")
    return sorted(texts, key=lambda t: -len(t.split()))[:256]


def text_sets(backbone: Backbone) -> dict[str, list[str]]:
    retrieval = load_newsgroup_retrieval("dev")
    return {
        "cal_sentences": load_calibration(),
        "cal_general": load_calibration("general"),
        "cal_sts_paragraphs": sts_paragraphs(),
        "lee": list(load_lee().texts),
        "newsgroups": list(load_newsgroups("all").texts),
        "subjects": list(retrieval.queries.values()),
        "sts": [s for pair in sts_pairs("dev", backbone.sts_limit) for s in pair[:2]],
    }


def run_probe(args: argparse.Namespace) -> None:
    backbone = BACKBONES[args.backbone]
    folder = str(backbone.folder())
    sets = text_sets(backbone)
    wanted = args.settings.split(",") if args.settings else list(settings(backbone))
    for name in wanted:
        kwargs = settings(backbone)[name]
        model = None
        for set_name, texts in sets.items():
            if set_name == "sts" and name not in STS_SETTINGS:
                continue
            path = args.cache / args.backbone / name / f"{set_name}.npz"
            if path.exists():
                continue
            model = model or kvemb_st.from_base(folder, **kwargs)
            start = time.perf_counter()
            probe(model, texts, batch_size=args.batch_size).save(path)
            print(f"{name} {set_name}: {len(texts)} texts in {time.perf_counter() - start:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------- scoring
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

    def __init__(self, cache: Path, backbone: str) -> None:
        self.root = cache / backbone
        self.backbone = BACKBONES[backbone]
        self._probes: dict[tuple[str, str], ProbeVectors] = {}
        lee = load_lee()
        self.lee_texts, self.lee_pairs = list(lee.texts), lee.pairs
        news = load_newsgroups("all")
        dev = set(load_newsgroups("dev").texts)
        self.news_texts = list(news.texts)
        self.news_dev = [i for i, t in enumerate(news.texts) if t in dev]
        self.news_labels = np.array(news.labels)
        retrieval = load_newsgroup_retrieval("dev")
        self.subjects = list(retrieval.queries.values())
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

    def documents(self, setting: str, readout: Readout, calibration: str) -> dict[str, float]:
        """Lee and newsgroups-dev scores of one document readout under one whitening."""
        apply = self.transform(setting, readout, calibration)
        lee = apply(self.vectors(setting, "lee", readout))
        cos = np.array([lee[i] @ lee[j] for i, j, _ in self.lee_pairs])
        gold = np.array([score for _, _, score in self.lee_pairs])
        news = apply(self.vectors(setting, "newsgroups", readout))
        dev = news[self.news_dev]
        return {
            "lee_pearson": float(pearsonr(cos, gold)[0]),
            "lee_spearman": float(spearmanr(cos, gold)[0]),
            "newsgroups_5nn": knn_accuracy(dev, self.news_labels[self.news_dev], 5),
            "_docs": news,
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


def document_readouts(num_layers: int) -> list[Readout]:
    """Every layer x pooling x span, plus windows of 3 and 5 layers (mean pooling) around every layer."""
    out = []
    for layer in range(num_layers):
        for spec in ("mean", "mean/text", "last", "mean+last:0.5", "mean+last:0.5/text", "mean+last:0.25/text"):
            out.append(Readout.parse(f"{spec}@{layer}"))
        for width in (3, 5):
            lo, hi = layer - width // 2, layer + width // 2
            if lo >= 0 and hi < num_layers:
                out += [Readout.parse(f"{spec}@{lo}-{hi}") for spec in ("mean", "mean/text")]
    return out


CALIBRATIONS = ("none", "sentences", "general", "sts_paragraphs", "sentences+general", "sentences+sts_paragraphs")
DEFAULT_QUERY = Readout("mean+last", 0.75)  # the default build's readout


def run_score(args: argparse.Namespace) -> dict[str, Any]:
    scorer = Scorer(args.cache, args.backbone)
    names = [n for n in (args.settings.split(",") if args.settings else settings(scorer.backbone)) if scorer.has(n)]
    rows = []
    for setting in names:
        num_layers = scorer.layers(setting)
        readouts = document_readouts(num_layers) + [Readout(), DEFAULT_QUERY, Readout("mean"), Readout("last")]
        if setting in ("echo", "token_prepending", "mean", "prompteol"):  # their own recipe too
            readouts.append(kvemb_st.from_base.__globals__["KVEmbeddingConfig"](
                base_model="x", **settings(scorer.backbone)[setting]).readout())
        for readout in dict.fromkeys(readouts):
            for calibration in CALIBRATIONS:
                row = {"setting": setting, "readout": readout.name, "whiten": calibration}
                scores = scorer.documents(setting, readout, calibration)
                docs = scores.pop("_docs")
                row.update(scores)
                # queries through the same setting and readout: one side for both
                query = scorer.transform(setting, readout, calibration)(scorer.vectors(setting, "subjects", readout))
                row.update(scorer.retrieval(query, docs))
                rows.append(row)
        print(f"{setting}: {len(rows)} rows so far", flush=True)
    result = {"backbone": args.backbone, "command": " ".join(sys.argv), "rows": rows}
    write_json(args.out / f"{args.backbone}.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("probe", "score"))
    parser.add_argument("backbone", choices=sorted(BACKBONES))
    parser.add_argument("--settings", default=None, help="comma-separated forward settings (default: all)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "kvemb_st" / "probe")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "doc_levers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "probe":
        run_probe(args)
    else:
        run_score(args)


if __name__ == "__main__":
    main()
