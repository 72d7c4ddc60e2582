"""Sweep the KV-Embedding knobs on STS-B dev and a document task, to choose defaults by measurement.

Never tunes on test. Stages (each appends one JSON line per scored setting to ``<out>/<stage>.jsonl``, ``--out``
by default ``results/sweep/<backbone>``, and skips settings already there, so an interrupted run resumes):

* ``coarse``  -- a fixed random subset of STS-B dev pairs, coordinate descent per template (one knob at
  a time, each at the best of the previous ones): no re-routing; for the first template every
  ``prefix_bias`` at the last third of the layers (20-29 of 30) with RoPE ``keep``, every ``prefix_rope``,
  every window, then the bias again; later templates start from the first one's best and sweep its
  neighbourhood. Windows are those chosen for SmolLM2's 30 layers scaled to the backbone's depth
  (:func:`windows_for`), or ``--windows``.
* ``confirm`` -- the best settings of ``coarse`` on all 1,500 dev pairs.
* ``docs``    -- the best settings (of ``confirm``, else of ``coarse``) on the paragraph-retrieval task
  built from STS-B train (:func:`kvemb_lab.evaluation.build_document_task`), with every query/document
  template combination.

Cost control on 2 CPU cores: every pooling (``last``, ``mean``, ``mean+last`` at several weights) is
derived from one forward pass; and layers before the first re-routed layer compute exactly what a plain
forward computes, so the plain forward's hidden states are cached once per template and only the tail
of the network is re-run per setting. A self-check compares that shortcut with the real module.

    python experiments/sweep/sweep.py coarse && python experiments/sweep/sweep.py confirm && python experiments/sweep/sweep.py docs
    python experiments/sweep/sweep.py coarse --backbone qwen25 --limit 400 --threads 1   # into results/sweep/qwen25
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from transformers.masking_utils import create_causal_mask

from kvemb_st.backbone import load_backbone
from kvemb_st.config import NAMED_TEMPLATES, KVEmbeddingConfig
from kvemb_st.layer_spec import parse_layer_spec
from kvemb_st.methods import kv_routing
from kvemb_st.module import KVEmbedding
from kvemb_st.pooling import pool

from kvemb_lab.backbones import BACKBONES
from kvemb_lab.evaluation import (
    build_document_task,
    markdown_table,
    precomputed_document_metrics,
    precomputed_sts_spearman,
    sts_pairs,
)
from kvemb_lab.paths import RESULTS

ROPES = ("keep", "start", "relative0")
BIASES = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
# Windows as chosen for SmolLM2's 30 layers; other depths get them scaled (windows_for).
REFERENCE_DEPTH = 30
REFERENCE_WINDOWS = ((10, 19), (15, 24), (18, 27), (20, 29), (22, 29), (24, 29), (15, 29))
REFERENCE_START = (20, 29)
POOLINGS = {  # name -> (mode, last_weight)
    "last": ("last", 0.5),
    "mean": ("mean", 0.5),
    "mean+last@0.25": ("mean+last", 0.25),
    "mean+last@0.5": ("mean+last", 0.5),
    "mean+last@0.75": ("mean+last", 0.75),
}
NONE = "none"  # no re-routing


@dataclass(frozen=True)
class Setting:
    """One forward pass: everything but the pooling."""

    template: str
    layers: str
    rope: str = "keep"
    bias: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.template}|{self.layers}|{self.rope}|{self.bias:g}"


class TailRunner:
    """Embeds texts under many settings of one template, re-running only the layers from the first re-routed one."""

    def __init__(self, backbone, tokenizer, template: str, texts: Sequence[str], starts: Iterable[int], batch_size: int):
        self.backbone, self.tokenizer = backbone, tokenizer
        self.template = template
        plain = self.module(Setting(template, NONE))
        self.texts = sorted(set(texts), key=len)
        self.batches = []  # (texts, features, {start layer: its input hidden states}, plain final states)
        starts = sorted(set(starts))
        for i in range(0, len(self.texts), batch_size):
            chunk = self.texts[i : i + batch_size]
            features = plain.preprocess(chunk)
            with torch.inference_mode():
                out = backbone(**features, output_hidden_states=True, use_cache=False)
            states = {s: out.hidden_states[s] for s in starts}
            self.batches.append((chunk, features, states, out.last_hidden_state))

    def module(self, setting: Setting) -> KVEmbedding:
        if setting.layers == NONE:  # the template alone, no re-routing: what method 'prompteol' runs
            routing = {"method": "prompteol"}
        else:
            routing = {"method": "kv", "layers": setting.layers, "prefix_rope": setting.rope, "prefix_bias": setting.bias}
        config = KVEmbeddingConfig(base_model="(preloaded)", template=NAMED_TEMPLATES[setting.template], pooling="last", **routing)
        return KVEmbedding(config, self.backbone, self.tokenizer)

    def final_states(self, setting: Setting, batches: Sequence | None = None):
        """Yield ``(texts, attention_mask, final hidden states)`` per batch (all batches by default)."""
        batches = self.batches if batches is None else batches
        if setting.layers == NONE:
            for chunk, features, _, last in batches:
                yield chunk, features["attention_mask"], last
            return
        module = self.module(setting)
        start = min(module.config.layers)
        model = self.backbone
        for chunk, features, states, _ in batches:
            ids, mask = features["input_ids"], features["attention_mask"]
            hidden = states[start]
            position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
            with torch.inference_mode():
                causal = create_causal_mask(
                    config=model.config, inputs_embeds=hidden, attention_mask=mask, cache=None, position_ids=position_ids
                )
                rotary = model.rotary_emb(hidden, position_ids=position_ids)
                routing = kv_routing(model, module.config, ids, mask)
                for layer in model.layers[start:]:
                    hidden = layer(
                        hidden, attention_mask=causal, position_embeddings=rotary, position_ids=position_ids,
                        kv_routing=routing,
                    )
                yield chunk, mask, model.norm(hidden)

    def vectors(self, setting: Setting, batches: Sequence | None = None) -> dict[str, dict[str, np.ndarray]]:
        """``{pooling name: {text: unit vector}}`` for every pooling in :data:`POOLINGS`, from one pass."""
        out: dict[str, dict[str, np.ndarray]] = {name: {} for name in POOLINGS}
        for chunk, mask, hidden in self.final_states(setting, batches):
            for name, (mode, weight) in POOLINGS.items():
                pooled = F.normalize(pool(hidden, mask, mode, weight), dim=-1).numpy()
                out[name].update(zip(chunk, pooled))
        return out

    def self_check(self, setting: Setting) -> float:
        """Max abs difference between the shortcut and the real module (through sentence-transformers)."""
        texts = self.batches[-1][0]
        mine = self.vectors(setting, self.batches[-1:])["last"]
        reference = SentenceTransformer(modules=[self.module(setting)]).encode(texts, convert_to_numpy=True)
        return float(np.abs(np.stack([mine[t] for t in texts]) - reference).max())


# ---------------------------------------------------------------------------------------------- io
def read_done(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["id"]: row for row in rows}


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def score_sts(runner: TailRunner, setting: Setting, pairs, done: dict, path: Path, st_model) -> list[dict]:
    """Score every pooling of ``setting``; cached rows are reused."""
    if all(f"{setting.key}|{p}" in done for p in POOLINGS):
        return [done[f"{setting.key}|{p}"] for p in POOLINGS]
    t0 = time.perf_counter()
    vectors = runner.vectors(setting)
    rows = []
    for name, table in vectors.items():
        row = {
            "id": f"{setting.key}|{name}", "template": setting.template, "layers": setting.layers,
            "rope": setting.rope, "bias": setting.bias, "pooling": name, "pairs": len(pairs),
            "spearman": precomputed_sts_spearman(st_model, pairs, table),
        }
        done[row["id"]] = row
        append(path, row)
        rows.append(row)
    best = max(rows, key=lambda r: r["spearman"])
    print(f"{setting.key:45s} best {best['pooling']:15s} {best['spearman']:.4f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    return rows


def best_of(rows: Sequence[dict]) -> dict:
    return max(rows, key=lambda r: r["spearman"])


def neighbours(bias: float, grid: Sequence[float] = BIASES) -> list[float]:
    """``bias`` and its neighbours on the sorted ``grid`` (+-1 on the default grid)."""
    grid = sorted(set(grid) | {bias})
    i = grid.index(bias)
    return grid[max(0, i - 1) : i + 2]


def window_start(layers: str) -> int:
    return min(parse_layer_spec(layers))


def scale_window(window: tuple[int, int], num_layers: int) -> str:
    """``first-last`` of a 30-layer window moved to ``num_layers`` layers, keeping its relative position."""
    first, last = window
    lo = round(first * num_layers / REFERENCE_DEPTH)
    hi = min(num_layers, round((last + 1) * num_layers / REFERENCE_DEPTH)) - 1
    return f"{lo}-{max(lo, hi)}"


def windows_for(num_layers: int) -> tuple[str, ...]:
    """The swept windows for a backbone of ``num_layers`` layers (SmolLM2's own set at 30), without duplicates."""
    return tuple(dict.fromkeys(scale_window(w, num_layers) for w in REFERENCE_WINDOWS))


# ------------------------------------------------------------------------------------------- stages
def stage_coarse(args, backbone, tokenizer, st_model) -> None:
    pairs = sts_pairs("dev", args.limit, args.seed)
    texts = [s for p in pairs for s in p[:2]]
    path = args.out / "coarse.jsonl"
    done = read_done(path)
    windows = tuple(args.windows) if args.windows else windows_for(backbone.config.num_hidden_layers)
    start_window = scale_window(REFERENCE_START, backbone.config.num_hidden_layers)
    starts = {window_start(w) for w in (*windows, start_window)}
    seed: dict | None = None
    for template in args.templates:
        runner = TailRunner(backbone, tokenizer, template, texts, starts, args.batch_size)
        if args.self_check:
            diff = runner.self_check(Setting(template, start_window, "relative0", 2.0))
            print(f"self-check {template}: max |shortcut - module| = {diff:.2e}", flush=True)
            if diff > 1e-4:
                raise SystemExit("the cached-prefix shortcut disagrees with the module; not sweeping")

        def score(settings: Iterable[Setting], runner: TailRunner = runner) -> dict:
            return best_of([row for s in settings for row in score_sts(runner, s, pairs, done, path, st_model)])

        score([Setting(template, NONE)])
        if seed is None:  # first template: every bias, then every rope, then every window
            window, rope, biases, ropes, swept = start_window, "keep", args.biases, ROPES, windows
        else:  # later templates: around the first template's best
            window, rope = seed["layers"], seed["rope"]
            biases, ropes, swept = neighbours(seed["bias"], args.biases), (rope,), sorted({window, start_window})
        best = score(Setting(template, window, rope, b) for b in biases)
        best = score(Setting(template, window, r, best["bias"]) for r in ropes)
        best = score(Setting(template, w, best["rope"], best["bias"]) for w in swept)
        best = score(Setting(template, best["layers"], best["rope"], b) for b in neighbours(best["bias"], args.biases))
        seed = seed or best
    summarize(path, args.out / "coarse.md", f"STS-B dev, {args.limit} random pairs (seed {args.seed})")


def top_settings(path: Path, k: int) -> list[Setting]:
    """The ``k`` best forward settings (best pooling each) per template, plus no re-routing."""
    rows = list(read_done(path).values())
    chosen: list[Setting] = []
    templates = sorted({r["template"] for r in rows})
    for template in templates:
        by_setting: dict[str, dict] = {}
        for r in rows:
            if r["template"] == template:
                key = Setting(r["template"], r["layers"], r["rope"], r["bias"]).key
                by_setting[key] = max(by_setting.get(key, r), r, key=lambda x: x["spearman"])
        ranked = sorted(by_setting.values(), key=lambda r: -r["spearman"])
        picks = [r for r in ranked if r["layers"] != NONE][:k] + [r for r in ranked if r["layers"] == NONE]
        chosen += [Setting(r["template"], r["layers"], r["rope"], r["bias"]) for r in picks]
    return chosen


def stage_confirm(args, backbone, tokenizer, st_model) -> None:
    settings = top_settings(args.out / "coarse.jsonl", args.top)
    pairs = sts_pairs("dev")
    texts = [s for p in pairs for s in p[:2]]
    path = args.out / "confirm.jsonl"
    done = read_done(path)
    for template in args.templates:
        mine = [s for s in settings if s.template == template]
        starts = {window_start(s.layers) for s in mine if s.layers != NONE}
        runner = TailRunner(backbone, tokenizer, template, texts, starts, args.batch_size)
        for s in mine:
            score_sts(runner, s, pairs, done, path, st_model)
    summarize(path, args.out / "confirm.md", "STS-B dev, all 1,500 pairs")


def stage_docs(args, backbone, tokenizer, st_model) -> None:
    """Each forward setting of the top list is run with both templates on queries and on paragraphs."""
    task = build_document_task(args.doc_split, n_queries=args.doc_queries, sentences_per_doc=args.doc_sentences)
    if args.settings:
        forward = {(layers, rope, float(bias)) for layers, rope, bias in (s.split("|") for s in args.settings)}
    else:
        ranked = args.out / "confirm.jsonl"
        ranked = ranked if ranked.exists() else args.out / "coarse.jsonl"
        forward = {(s.layers, s.rope, s.bias) for s in top_settings(ranked, args.top)}
    path = args.out / "docs.jsonl"
    done = read_done(path)
    queries, documents = list(task.queries.values()), list(task.corpus.values())
    vectors: dict[tuple, dict] = {}  # (role, template, layers, rope, bias) -> {pooling: {text: vec}}
    for template in args.templates:
        starts = {window_start(layers) for layers, _, _ in forward if layers != NONE}
        q_runner = TailRunner(backbone, tokenizer, template, queries, starts, args.batch_size)
        d_runner = TailRunner(backbone, tokenizer, template, documents, starts, max(1, args.batch_size // 4))
        for layers, rope, bias in sorted(forward):
            setting = Setting(template, layers, rope, bias)
            t0 = time.perf_counter()
            vectors[("query", template, layers, rope, bias)] = q_runner.vectors(setting)
            vectors[("document", template, layers, rope, bias)] = d_runner.vectors(setting)
            print(f"docs {setting.key} embedded ({time.perf_counter() - t0:.0f}s)", flush=True)
    for layers, rope, bias in sorted(forward):
        for q_template in args.templates:
            for d_template in args.templates:
                for name in POOLINGS:
                    row_id = f"{q_template}>{d_template}|{layers}|{rope}|{bias:g}|{name}"
                    if row_id in done:
                        continue
                    metrics = precomputed_document_metrics(
                        st_model, task,
                        vectors[("query", q_template, layers, rope, bias)][name],
                        vectors[("document", d_template, layers, rope, bias)][name],
                    )
                    row = {
                        "id": row_id, "query_template": q_template, "document_template": d_template,
                        "layers": layers, "rope": rope, "bias": bias, "pooling": name, **metrics,
                    }
                    append(path, row)
    rows = sorted(read_done(path).values(), key=lambda r: -r["ndcg@10"])
    columns = ["query_template", "document_template", "layers", "rope", "bias", "pooling", "mrr@10", "ndcg@10", "accuracy@1"]
    title = f"# Document retrieval, STS-B {args.doc_split} paragraphs ({args.doc_queries} queries, {args.doc_sentences} sentences each)\n\n"
    (args.out / "docs.md").write_text(title + markdown_table(rows, columns))


def summarize(path: Path, md_path: Path, title: str) -> None:
    rows = sorted(read_done(path).values(), key=lambda r: -r["spearman"])
    columns = ["template", "layers", "rope", "bias", "pooling", "spearman"]
    md_path.write_text(f"# {title}: Spearman of cosine, best first\n\n" + markdown_table(rows, columns, digits=4))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("coarse", "confirm", "docs"))
    parser.add_argument("--backbone", default="smollm2", choices=list(BACKBONES), help="real backbone from PyPI")
    parser.add_argument("--base", default=None, help="base model folder (overrides --backbone)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/sweep/<--backbone>")
    parser.add_argument("--limit", type=int, default=600, help="dev pairs in the coarse stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--templates", nargs="+", default=list(NAMED_TEMPLATES), choices=list(NAMED_TEMPLATES))
    parser.add_argument("--top", type=int, default=3, help="settings per template carried to the next stage")
    parser.add_argument(
        "--settings", nargs="+", metavar="LAYERS|ROPE|BIAS",
        help="docs stage: these forward settings (e.g. '20-29|keep|3' 'none|keep|0') instead of the best ranked ones",
    )
    parser.add_argument("--doc-split", default="train", choices=("train", "dev"))
    parser.add_argument("--doc-queries", type=int, default=200)
    parser.add_argument("--doc-sentences", type=int, default=10)
    parser.add_argument(
        "--biases", nargs="+", type=float, default=list(BIASES), metavar="BIAS", help="coarse stage: the prefix_bias grid"
    )
    parser.add_argument(
        "--windows", nargs="+", metavar="LAYERS", help="coarse stage: these windows (e.g. '8-15') instead of the scaled set"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-self-check", dest="self_check", action="store_false")
    args = parser.parse_args(argv)
    args.out = args.out or RESULTS / "sweep" / args.backbone
    torch.set_num_threads(args.threads)
    backbone, tokenizer = load_backbone(args.base or str(BACKBONES[args.backbone].folder()))
    # The evaluators record metrics on a model card, so they need a model; it never encodes here.
    st_model = SentenceTransformer(
        modules=[KVEmbedding(KVEmbeddingConfig("(preloaded)", method="prompteol"), backbone, tokenizer)]
    )
    {"coarse": stage_coarse, "confirm": stage_confirm, "docs": stage_docs}[args.stage](args, backbone, tokenizer, st_model)


if __name__ == "__main__":
    main()
