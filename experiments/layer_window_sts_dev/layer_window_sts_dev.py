"""Automatic layer selection vs hand-picked windows on STS-B dev (SmolLM2-135M-Instruct, CPU).

Every setting shares one loaded backbone and the same knobs (prefix_bias 2.0, prefix_rope relative0,
last-token pooling, PromptEOL template -- the package defaults when this was run, pinned here so that a
rerun measures the same thing); only the re-routed layers change. The automatic
windows are placed on the ID curve of the default calibration set (cached by ``kvemb build``) with
several widths and both anchors, which is how the default window width was chosen. Writes
``results/layer_window/smollm2/layer_window_sts_dev.json`` and ``.md``. Takes ~1 h on one (shared) CPU core with
the default 1,000 pairs.

    python experiments/layer_window_sts_dev/layer_window_sts_dev.py [--pairs 1000] [--threads 1]
    python experiments/layer_window_sts_dev/layer_window_sts_dev.py --markdown-only   # rewrite the .md from the .json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from sentence_transformers import SentenceTransformer

from kvemb_st.backbone import load_backbone
from kvemb_st.calibration import load_calibration
from kvemb_st.config import PROMPTEOL_TEMPLATE, KVEmbeddingConfig
from kvemb_st.layer_spec import parse_layer_spec
from kvemb_st.layer_selection import select_layers
from kvemb_st.layer_spec import format_layer_spec
from kvemb_st.module import KVEmbedding
from kvemb_st.window_rule import SelectionParams, select_window

from kvemb_lab.assets import STS_DISTRIBUTION, load_sts_b, smollm2_folder
from kvemb_lab.backbones import run_assets
from kvemb_lab.evaluation import write_json
from kvemb_lab.paths import RESULTS

OUT = RESULTS / "layer_window" / "smollm2"

FIXED = ["10-19", "15-24", "18-27", "20-29"]
KNOBS = {"prefix_bias": 2.0, "prefix_rope": "relative0", "pooling": "last", "template": PROMPTEOL_TEMPLATE}
AUTO = [(3, "start"), (5, "start"), (7, "start"), (10, "start"), (15, "start"), (5, "center"), (10, "center")]


def spearman(model: SentenceTransformer, pairs: list[tuple[str, str, float]]) -> float:
    sentences = sorted({s for a, b, _ in pairs for s in (a, b)})
    vectors = model.encode(sentences, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    index = {s: i for i, s in enumerate(sentences)}
    cosine = [float(vectors[index[a]] @ vectors[index[b]]) for a, b, _ in pairs]
    return float(spearmanr(cosine, [score for _, _, score in pairs]).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000, help="STS-B dev pairs (a fixed random subset below 1500)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--markdown-only", action="store_true", help="only rewrite the .md from the saved .json")
    args = parser.parse_args()
    if args.markdown_only:
        write_markdown(json.loads((OUT / "layer_window_sts_dev.json").read_text(encoding="utf-8")))
        return
    torch.set_num_threads(args.threads)
    dev = load_sts_b("dev")
    pairs = [dev[i] for i in sorted(np.random.default_rng(0).permutation(len(dev))[: args.pairs])]

    base = str(smollm2_folder())
    backbone, tokenizer = load_backbone(base)
    max_seq_length = KVEmbeddingConfig(base_model=base, layers=[0]).max_seq_length
    selection = select_layers(
        backbone,
        tokenizer,
        base_model=base,
        base_revision=None,
        template=KNOBS["template"],
        texts=load_calibration(),
        max_seq_length=max_seq_length,
    )  # fmt: skip  -- the default-calibration curve, from the cache written by tools/build_offline.py smollm2
    curve = selection.id_curve

    settings: dict[str, dict] = {
        "none (PromptEOL only)": {"kind": "no re-routing", "method": "prompteol", "layers": []}
    }
    for spec in FIXED:
        settings[spec] = {"kind": "fixed", "layers": parse_layer_spec(spec)}
    for width, anchor in AUTO:
        layers, _ = select_window(curve, SelectionParams(window=width, anchor=anchor))
        entry = settings.setdefault(format_layer_spec(layers), {"kind": "auto", "layers": layers})
        entry["kind"] = "auto" if entry["kind"] == "auto" else "fixed = auto"
        entry.setdefault("auto", []).append(f"width {width} ({width / len(curve):.2f} of depth), {anchor}")

    rows = []
    for name, setting in settings.items():
        routing = (
            {"method": setting["method"]}
            if "method" in setting
            else {"layers": setting["layers"], "prefix_bias": KNOBS["prefix_bias"], "prefix_rope": KNOBS["prefix_rope"]}
        )
        config = KVEmbeddingConfig(base_model=base, pooling=KNOBS["pooling"], template=KNOBS["template"], **routing)
        model = SentenceTransformer(modules=[KVEmbedding(config, backbone, tokenizer)], device="cpu")
        start = time.time()
        score = spearman(model, pairs)
        rows.append({"setting": name, **setting, "spearman": round(score, 4)})
        print(
            f"{name:24s} {setting['kind']:14s} {score:.4f}  ({time.time() - start:.0f} s)  {setting.get('auto', '')}",
            flush=True,
        )

    result = {
        "model": "SmolLM2-135M-Instruct (fp32, dequantised from the Q4_1 GGUF)",
        "data": f"STS-B dev, {len(pairs)} pairs" + ("" if len(pairs) == len(dev) else " (fixed random subset, seed 0)"),
        "metric": "Spearman of cosine similarity",
        "knobs": KNOBS,
        "id_curve": curve,
        "id_argmin_after_skip": selection.argmin,
        "skip_fraction": selection.params["skip_fraction"],
        "rows": rows,
    }
    write_json(OUT / "layer_window_sts_dev.json", result, run_assets(["smollm2"], [STS_DISTRIBUTION]))
    write_markdown(result)


def write_markdown(result: dict) -> None:
    rows = result["rows"]
    knobs = result["knobs"]
    fixed = max((r for r in rows if r["kind"].startswith("fixed")), key=lambda r: r["spearman"])
    auto = max((r for r in rows if "auto" in r["kind"]), key=lambda r: r["spearman"])
    lines = [
        "# Automatic layer selection vs fixed windows: STS-B dev",
        "",
        "> Provenance: the `provenance` key of `layer_window_sts_dev.json` beside this file.",
        "",
        f"{result['model']}; {result['data']}; {result['metric']}. Knobs: prefix_bias {knobs['prefix_bias']}, "
        f"prefix_rope {knobs['prefix_rope']}, pooling {knobs['pooling']}, PromptEOL template.",
        f"ID minimum (TwoNN, default calibration set, first {result['skip_fraction']:.0%} of layers skipped): "
        f"layer {result['id_argmin_after_skip']}. Produced by `python experiments/layer_window_sts_dev/layer_window_sts_dev.py`.",
        "",
        "| layers | kind | automatic window | Spearman |",
        "|---|---|---|---|",
        *(
            f"| {r['setting']} | {r['kind']} | {'; '.join(r.get('auto', [])) or '-'} | {r['spearman']:.4f} |"
            for r in rows
        ),
        "",
        f"Best fixed window: {fixed['setting']} ({fixed['spearman']:.4f}). Best automatic window: {auto['setting']} "
        f"({auto['spearman']:.4f}; {'; '.join(auto['auto'])}).",
        "",
    ]
    (OUT / "layer_window_sts_dev.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
