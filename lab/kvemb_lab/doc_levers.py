"""The document levers of issue 18, measured on dev data from one forward pass per text and setting.

Stage ``probe`` runs each forward setting (template, re-routed window, bias; or a baseline method) once over every
text set and caches all layers' readouts (:mod:`kvemb_lab.layer_probe`: mean over all tokens, over the text's own
tokens, last token, at every layer). Stage ``score`` then combines them without another forward pass: every
document readout (pooling, layer or window of layers, token span) x every whitening (calibration sentences,
paragraphs or both, shared by both sides or one per side) on Lee (Pearson, Spearman), newsgroups-dev 5-NN and the
newsgroups subject -> body retrieval dev queries (nDCG@10, MRR@10, queries from the query side), plus STS-B dev of
the default side under each shared whitening. Never test data.

    python experiments/doc_levers/doc_levers.py probe smollm2            # ~15 min on 2 cores; cached under --cache
    python experiments/doc_levers/doc_levers.py score smollm2            # minutes; results/doc_levers/smollm2/*_stage1.json.gz
    python experiments/doc_levers/doc_levers.py choose smollm2,qwen25    # results/doc_levers/choice.json (then: report)
    python experiments/doc_levers/doc_levers.py windows gemma3 --out results/windows  # results/windows/gemma3/

Files about one backbone go to ``--out``/BACKBONE/, files about several (choice, report) to ``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr

import kvemb_st
from kvemb_st.config import COMPRESSION_TEMPLATE, KVEmbeddingConfig
from kvemb_st.pooling import Readout
from kvemb_st.postprocessing_fit import fit_postprocessing

from kvemb_lab.backbones import BACKBONES, Backbone, run_assets
from kvemb_lab.doc_scoring import Scorer, text_sets
from kvemb_lab.evaluation import markdown_table, write_json
from kvemb_lab.layer_probe import probe
from kvemb_lab.paths import RESULTS
from kvemb_lab.provenance import provenance

PASSAGE_TEMPLATE = 'This passage : "{text}" means in one word:"'




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
        **({"kv_early": {**kv, "layers": backbone.early}} if backbone.early else {}),
        "mean": dict(method="mean"),
        "prompteol": dict(method="prompteol"),
        "echo": dict(method="echo"),
        "token_prepending": dict(method="token_prepending"),
    }


STS_SETTINGS = ("kv", "mean", "prompteol", "echo", "token_prepending")  # the default side and the baselines
_WINDOW = re.compile(r"kv@(\d+-\d+)(?:/b(-?[\d.]+))?")


def setting_kwargs(backbone: Backbone, name: str) -> dict[str, Any]:
    """A named setting, or ``kv@START-END[/bBIAS]``: the default knobs with that window (and prefix bias)."""
    match = _WINDOW.fullmatch(name)
    if match:
        window, bias = match.groups()
        return dict(method="kv", layers=window, **({} if bias is None else {"prefix_bias": float(bias)}))
    if name not in settings(backbone):
        raise ValueError(f"unknown setting {name!r}: one of {sorted(settings(backbone))} or kv@START-END[/bBIAS]")
    return settings(backbone)[name]


def wants_sts(name: str) -> bool:
    return name in STS_SETTINGS or bool(_WINDOW.fullmatch(name))




def run_probe(args: argparse.Namespace) -> None:
    backbone = BACKBONES[args.backbone]
    folder = str(backbone.folder())
    sets = text_sets(backbone)
    wanted = args.settings.split(",") if args.settings else list(settings(backbone))
    for name in wanted:
        kwargs = setting_kwargs(backbone, name)
        model = None
        for set_name, texts in sets.items():
            if args.sets and set_name not in args.sets.split(","):
                continue
            if set_name == "sts" and not wants_sts(name):
                continue
            path = args.cache / args.backbone / name / f"{set_name}.npz"
            if path.exists():
                continue
            model = model or kvemb_st.from_base(folder, **kwargs)
            start = time.perf_counter()
            probe(model, texts, batch_size=args.batch_size).save(path)
            print(f"{name} {set_name}: {len(texts)} texts in {time.perf_counter() - start:.0f} s", flush=True)



FRACTIONS = tuple(round(0.25 + 0.05 * k, 2) for k in range(16))  # relative depth 0.25 ... 1.0
WIDTHS = (1, 3, 5)
POOLINGS = ("mean", "mean/text", "last", "mean+last:0.5/text", "mean+last:0.25/text")
CALIBRATIONS = ("none", "sentences", "sts_paragraphs", "sentences+sts_paragraphs", "general", "sentences+general")
ELIGIBLE_CALIBRATIONS = CALIBRATIONS[:4]  # general reaches us only as gensim's LGPL test data
TEMPLATE_SETTINGS = ("kv", "kv_passage", "kv_compression", "kv_raw")  # side knobs only
FORWARD_SETTINGS = ("kv_bias0", "kv_bias5", "kv_early")  # would need their own routing per side
DEFAULT_QUERY = Readout("mean+last", 0.75)  # the default build's readout


def depth_layers(fraction: float, width: int, num_layers: int) -> tuple[int, ...] | None:
    """The window of ``width`` layers centred on relative depth ``fraction`` (``None``: the final output)."""
    centre = int(fraction * (num_layers - 1) + 0.5)
    if fraction == 1.0 and width == 1:
        return None
    lo = min(max(centre - width // 2, 0), num_layers - width)
    return tuple(range(lo, lo + width))


def candidates(num_layers: int) -> Iterable[tuple[dict[str, Any], Readout]]:
    """Stage-1 readouts with the relative description the rule ranks by."""
    for fraction in FRACTIONS:
        for width in WIDTHS:
            layers = depth_layers(fraction, width, num_layers)
            for spec in POOLINGS:
                base = Readout.parse(spec)
                yield {"depth": fraction, "width": width, "pooling": spec}, Readout(
                    base.pooling, base.last_weight, layers, base.span)


def run_score(args: argparse.Namespace) -> dict[str, Any]:
    """Stage 1 on one backbone: every setting x readout x whitening, documents and symmetric retrieval."""
    scorer = Scorer(args.cache, args.backbone)
    names = [n for n in (args.settings.split(",") if args.settings else settings(scorer.backbone)) if scorer.has(n)]
    rows = []
    for setting in names:
        own = KVEmbeddingConfig(base_model="x", **setting_kwargs(scorer.backbone, setting)).readout()
        seen: dict[Readout, dict[str, Any]] = {}
        for description, readout in [*candidates(scorer.layers(setting)), ({"own": True}, own)]:
            seen.setdefault(readout, description)
        start = time.perf_counter()
        calibrations = [c for c in CALIBRATIONS if c == "none" or all(
            (scorer.root / setting / f"cal_{part}.npz").exists() for part in c.split("+"))]  # fmt: skip
        for readout, description in seen.items():
            for calibration in calibrations:
                apply = scorer.transform(setting, readout, calibration)
                docs = apply(scorer.vectors(setting, "newsgroups", readout))
                row = {"setting": setting, "readout": readout.name, **description, "whiten": calibration,
                       **scorer.documents(apply(scorer.vectors(setting, "lee", readout)), docs),
                       **scorer.retrieval(apply(scorer.vectors(setting, scorer.subjects_set, readout)), docs)}  # fmt: skip
                rows.append(row)
        print(f"{setting}: {len(seen)} readouts x {len(calibrations)} whitenings in {time.perf_counter() - start:.0f} s",
              flush=True)
    result = {"backbone": args.backbone, "command": " ".join(sys.argv), "rows": rows}
    write_rows(stage1_path(args.out, args.backbone), result)
    return result


def stage1_path(out: Path, backbone: str) -> Path:
    return out / backbone / f"{backbone}_stage1.json.gz"


def write_rows(path: Path, result: dict[str, Any]) -> None:
    """Compact gzipped JSON, floats to 4 decimals: thousands of rows per backbone."""
    rounded = [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in result["rows"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**result, "rows": rounded, "provenance": provenance(run_assets([result["backbone"]]))}
    path.write_bytes(gzip.compress(json.dumps(record, separators=(",", ":")).encode(), mtime=0))


def read_rows(path: Path) -> dict[str, Any]:
    return json.loads(gzip.decompress(path.read_bytes()))


SIMPLER_WHITENING = {"sentences": 0, "sts_paragraphs": 1, "sentences+sts_paragraphs": 2, "none": 3}
SIMPLER_POOLING = {spec: k for k, spec in enumerate(("mean", "last", "mean/text", "mean+last:0.5/text",
                                                    "mean+last:0.25/text"))}  # fmt: skip


def stage1_key(row: dict[str, Any]) -> tuple:
    return row["setting"], row["depth"], row["width"], row["pooling"], row["whiten"]


def doc_score(row: dict[str, Any]) -> float:
    return (row["lee_pearson"] + row["newsgroups_5nn"] + row["retrieval_ndcg@10"]) / 3


def simplicity(key: tuple) -> tuple:
    setting, depth, width, pooling, whiten = key
    return (setting != "kv", width, "/text" in pooling, SIMPLER_WHITENING[whiten], SIMPLER_POOLING[pooling], -depth)


def rank_stage1(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Candidates of every backbone by the rule's score (experiments/doc_levers/RULE.md, stage 1)."""
    by_key: dict[tuple, dict[str, Any]] = {}
    for result in results:
        for row in result["rows"]:
            if "depth" in row:
                entry = by_key.setdefault(stage1_key(row), {"key": stage1_key(row), "rows": {}})
                entry["rows"][result["backbone"]] = row
    ranked = []
    for entry in by_key.values():
        if len(entry["rows"]) == len(results):
            entry["score"] = float(np.mean([doc_score(row) for row in entry["rows"].values()]))
            ranked.append(entry)
    return sorted(ranked, key=lambda e: -e["score"])


def choose_stage1(ranked: list[dict[str, Any]]) -> dict[str, Any]:
    eligible = [e for e in ranked if e["key"][4] in ELIGIBLE_CALIBRATIONS]
    same = [e for e in eligible if e["key"][0] in TEMPLATE_SETTINGS]
    forward = [e for e in eligible if e["key"][0] in FORWARD_SETTINGS]
    pool = same
    if forward and same and forward[0]["score"] > same[0]["score"] + 0.01:
        pool = forward + same
    best = pool[0]["score"]
    return min((e for e in pool if e["score"] >= best - 0.005), key=lambda e: simplicity(e["key"]))


STS_FLOOR = {"smollm2": 0.805 - 0.005, "qwen25": 0.787 - 0.005}  # today's STS-B dev of `encode`, minus 0.005
QUERY_ORDER = ("default side", "document readout", "document side")
POST_ORDER = ("one whitening", "one whitening, document paragraphs", "one per side")


def choose_stage2(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Best mean retrieval-dev nDCG@10 over the backbones among candidates that keep STS-B dev on each;
    a simpler candidate within 0.005 wins (experiments/doc_levers/RULE.md, stage 2)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["query"], row["post"]), []).append(row)
    allowed = {key: float(np.mean([r["retrieval_ndcg@10"] for r in group])) for key, group in groups.items()
               if all(r["sts_dev"] >= STS_FLOOR[r["backbone"]] for r in group)}  # fmt: skip
    if not allowed:
        raise ValueError("no stage-2 candidate keeps STS-B dev on every backbone")
    best = max(allowed.values())
    query, post = min((key for key, score in allowed.items() if score >= best - 0.005),
                      key=lambda key: (QUERY_ORDER.index(key[0]), POST_ORDER.index(key[1])))  # fmt: skip
    return {"query": query, "post": post, "retrieval_ndcg@10": allowed[(query, post)], "allowed": len(allowed)}


def document_readout(scorer: Scorer, key: tuple) -> tuple[str, Readout, str]:
    """The stage-1 key's setting, document readout on this backbone, and whitening name."""
    setting, depth, width, pooling, whiten = key
    base = Readout.parse(pooling)
    return setting, Readout(base.pooling, base.last_weight, depth_layers(depth, width, scorer.layers(setting)),
                            base.span), whiten  # fmt: skip


def shared_whitenings(scorer: Scorer, setting: str, doc: Readout, whiten: str) -> dict[str, Callable]:
    """Stage 2's shared post-processings: one whitening on the default side's calibration sentences plus the
    document side's whitening texts, or plus the document side's calibration paragraphs only (RULE.md: the
    shipped paragraphs embedded by the document side, whatever stage 1's whitening was)."""
    default_sentences = scorer.vectors("kv", "cal_sentences", DEFAULT_QUERY)
    doc_parts = [] if whiten == "none" else whiten.split("+")
    posts = {"one whitening": doc_parts, "one whitening, document paragraphs": ["sts_paragraphs"]}
    return {name: fit_postprocessing(np.concatenate(
        [default_sentences, *(scorer.vectors(setting, f"cal_{p}", doc) for p in parts)]), "whiten").transform
        for name, parts in posts.items() if name == "one whitening" or parts != doc_parts}  # fmt: skip


def score_sides(scorer: Scorer, doc: tuple[str, Readout, Callable], query: tuple[str, Readout, Callable],
                default: Callable | None) -> dict[str, float]:
    """Documents (Lee, newsgroups 5-NN), query -> document retrieval, and STS-B dev of the default side under
    ``default`` (``None``: not scored), each side through its own (setting, readout, post-processing)."""
    (doc_setting, doc_readout, w_doc), (query_setting, query_readout, w_query) = doc, query
    docs = w_doc(scorer.vectors(doc_setting, "newsgroups", doc_readout))
    row = {**scorer.documents(w_doc(scorer.vectors(doc_setting, "lee", doc_readout)), docs),
           **scorer.retrieval(w_query(scorer.vectors(query_setting, scorer.subjects_set, query_readout)), docs)}  # fmt: skip
    if default is not None:
        row["sts_dev"] = scorer.sts("kv", DEFAULT_QUERY, default)
    return row


def query_readouts(setting: str, doc: Readout) -> dict[str, tuple[str, Readout]]:
    """Stage 2's ways to read queries: (forward setting, readout) by name (QUERY_ORDER)."""
    return {"default side": ("kv", DEFAULT_QUERY), "document readout": ("kv", doc), "document side": (setting, doc)}


def run_choose(args: argparse.Namespace) -> dict[str, Any]:
    """Both stages of the rule over the backbones' stage-1 results; stage 2 scores its candidates here."""
    results = [read_rows(stage1_path(args.out, name)) for name in args.backbones.split(",")]
    ranked = rank_stage1(results)
    chosen = choose_stage1(ranked)
    stage2 = []
    for result in results:
        scorer = Scorer(args.cache, result["backbone"])
        setting, doc, whiten = document_readout(scorer, chosen["key"])
        default_w = scorer.transform("kv", DEFAULT_QUERY, "sentences")
        doc_w = scorer.transform(setting, doc, whiten)
        shared = shared_whitenings(scorer, setting, doc, whiten)
        for query_name, (query_setting, query) in query_readouts(setting, doc).items():
            for post in [*shared, "one per side"]:
                w_query = shared.get(post, default_w if query_name == "default side" else doc_w)
                row = score_sides(scorer, (setting, doc, shared.get(post, doc_w)), (query_setting, query, w_query),
                                  shared.get(post, default_w))  # fmt: skip
                stage2.append({"backbone": result["backbone"], "query": query_name, "post": post, **row})
    choice = {"stage1": {"key": chosen["key"], "score": chosen["score"], "rows": chosen["rows"]},
              "top": [{"key": e["key"], "score": e["score"]} for e in ranked[:40]], "stage2": stage2,
              "stage2_choice": choose_stage2(stage2)}
    write_json(args.out / "choice.json", choice, run_assets(args.backbones.split(",")))
    return choice


BASELINES = ("mean", "prompteol", "echo", "token_prepending", "kv")  # kv: the default build before the document side
BASELINE_WHITENINGS = ("none", "sentences", "sentences+sts_paragraphs")


CONCAT_WEIGHTS = (0.25, 0.5, 0.75)


def concat_rows(scorer: Scorer, setting: str, doc: Readout, whiten: str, split: str) -> list[dict[str, Any]]:
    """The issue's other way to combine the two readouts: whiten the mean and the last-token vector each, then
    concatenate them scaled by sqrt(1 - w) and sqrt(w), so a cosine is ``(1-w) cos_mean + w cos_last``;
    documents and queries through the document side (as in stage 1), at the chosen layers and span."""
    parts = {}
    for pooling in ("mean", "last"):
        readout = Readout(pooling, layers=doc.layers, span=doc.span)
        parts[pooling] = (readout, scorer.transform(setting, readout, whiten))
    rows = []
    for weight in CONCAT_WEIGHTS:
        scale = {"mean": np.sqrt(1 - weight), "last": np.sqrt(weight)}

        def joined(text_set: str) -> np.ndarray:
            return np.concatenate([scale[p] * w(scorer.vectors(setting, text_set, r)) for p, (r, w) in parts.items()], 1)

        docs = joined("newsgroups")
        rows.append({"backbone": scorer.root.name, "split": split, "method": f"{setting} concat(mean, last:{weight})",
                     "whiten": f"{whiten} (each)", **scorer.documents(joined("lee"), docs),
                     **scorer.retrieval(joined(scorer.subjects_set), docs)})  # fmt: skip
    return rows


def run_report(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The chosen default (both sides) and every probed baseline, each with its own readout and the same
    whitening choices, on dev and on test (newsgroups test half, retrieval test queries; Lee has no split)."""
    choice = json.loads((args.out / "choice.json").read_text())
    query_name, post = choice["stage2_choice"]["query"], choice["stage2_choice"]["post"]
    rows = []
    for backbone in args.backbones.split(","):
        for split in ("dev", "test"):
            scorer = Scorer(args.cache, backbone, split)
            sts = split == "dev"
            setting, doc, whiten = document_readout(scorer, tuple(choice["stage1"]["key"]))
            default_w = scorer.transform("kv", DEFAULT_QUERY, "sentences")
            w = shared_whitenings(scorer, setting, doc, whiten).get(post)
            w_doc = w or scorer.transform(setting, doc, whiten)
            query = query_readouts(setting, doc)[query_name]
            w_query = w or (default_w if query_name == "default side" else w_doc)
            row = score_sides(scorer, (setting, doc, w_doc), (*query, w_query), (w or default_w) if sts else None)
            rows.append({"backbone": backbone, "split": split, "method": "default build (document side)",
                         "whiten": post, **row})  # fmt: skip
            rows += concat_rows(scorer, setting, doc, whiten, split)
            for name in BASELINES:
                if not scorer.has(name):
                    continue
                own = KVEmbeddingConfig(base_model="x", **setting_kwargs(scorer.backbone, name)).readout()
                for calibration in BASELINE_WHITENINGS:
                    apply = scorer.transform(name, own, calibration)
                    has_sts = sts and (scorer.root / name / "sts.npz").exists()
                    row = score_sides(scorer, (name, own, apply), (name, own, apply), None)
                    if has_sts:
                        row["sts_dev"] = scorer.sts(name, own, apply)
                    rows.append({"backbone": backbone, "split": split, "method": name, "whiten": calibration, **row})
    write_json(args.out / "report.json", {"command": " ".join(sys.argv), "choice": choice["stage2_choice"],
                                          "stage1": choice["stage1"]["key"], "rows": rows},
               run_assets(args.backbones.split(",")))  # fmt: skip
    columns = ["backbone", "split", "method", "whiten", "sts_dev", "lee_pearson", "lee_spearman", "newsgroups_5nn",
               "retrieval_ndcg@10", "retrieval_mrr@10"]  # fmt: skip
    (args.out / "report.md").write_text(markdown_table(rows, columns, 3))
    return rows


def run_windows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Issue 20's window (and bias) sweep: every cached ``kv@START-END[/bBIAS]`` setting of one backbone, the
    default readout whitened on the calibration sentences, on STS-B dev and Lee."""
    scorer = Scorer(args.cache, args.backbone)
    rows = []
    for path in sorted([*scorer.root.glob("kv@*"), *scorer.root.glob("kv@*/b*")]):  # kv@S-E/bB nests in kv@S-E
        name = path.relative_to(scorer.root).as_posix()
        if not (path / "sts.npz").exists() or not (path / "lee.npz").exists():
            continue
        kwargs = setting_kwargs(scorer.backbone, name)
        apply = scorer.transform(name, DEFAULT_QUERY, "sentences")
        lee = apply(scorer.vectors(name, "lee", DEFAULT_QUERY))
        cos = np.einsum("ij,ij->i", lee[scorer.lee_index[0]], lee[scorer.lee_index[1]])
        start, end = map(int, kwargs["layers"].split("-"))
        rows.append({"setting": name, "start": start, "end": end, "prefix_bias": kwargs.get("prefix_bias", 3.0),
                     "sts_dev": scorer.sts(name, DEFAULT_QUERY, apply),
                     "lee_pearson": float(pearsonr(cos, scorer.lee_gold)[0])})  # fmt: skip
    rows.sort(key=lambda r: (r["prefix_bias"], r["end"] - r["start"], r["start"]))
    out = args.out / args.backbone
    write_json(out / f"windows_{args.backbone}.json", {"backbone": args.backbone, "rows": rows},
               run_assets([args.backbone]))
    (out / f"windows_{args.backbone}.md").write_text(
        markdown_table(rows, ["setting", "start", "end", "prefix_bias", "sts_dev", "lee_pearson"], 4)
    )
    return rows



def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("probe", "score", "choose", "report", "windows"))
    parser.add_argument("backbone", help=f"one of {sorted(BACKBONES)} (choose: several, comma-separated)")
    parser.add_argument("--settings", default=None, help="comma-separated forward settings (default: all)")
    parser.add_argument("--sets", default=None, help="probe: comma-separated text sets (default: all)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "kvemb_st" / "probe")
    parser.add_argument("--out", type=Path, default=RESULTS / "doc_levers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.backbones = args.backbone
    if args.stage in ("choose", "report"):
        {"choose": run_choose, "report": run_report}[args.stage](args)
        return
    if args.backbone not in BACKBONES:
        parser.error(f"unknown backbone {args.backbone!r}; choose from {sorted(BACKBONES)}")
    {"probe": run_probe, "score": run_score, "windows": run_windows}[args.stage](args)


if __name__ == "__main__":
    main()
