"""Apply the written defaults rule to the dev results of both backbones and print the ranking.

The rule (docs/defaults.md, "The default build: the ranking rule"): every candidate default -- a pooling and a post-processing (mode, size,
calibration set) of the ``kv`` method at the layers ``kvemb build`` picks -- gets, on each backbone, the mean
of three dev metrics: STS-B dev Spearman, Lee Pearson and newsgroups dev 5-NN accuracy (sentences, document
similarity, document topics, equally weighted). Its score is the mean over the backbones. The highest score
wins; a candidate within ``--tie`` of it wins instead if it is simpler (no post-processing < center <
remove_pcs < whiten; full dimension before a reduced one; fewer calibration texts). Baselines get the same
post-processing and are listed for comparison, never chosen.

    python experiments/choose_defaults/choose_defaults.py --out results/defaults/choice.md
        results/defaults/smollm2/smollm2_dev_18-27.json results/defaults/qwen25/qwen25_dev.json
        results/defaults/gemma3/gemma3_dev.json    # (one command)
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvemb_st.calibration import JOIN

METRICS = ("sts_spearman", "lee_pearson", "newsgroups_5nn")
SIMPLICITY = {"none": 0, "center": 1, "remove_pcs": 2, "whiten": 3}


def pooling_of(row: dict[str, Any]) -> str:
    """The row's pooling: scored explicitly (``--poolings``) or the model's own."""
    if row.get("pooling"):
        return row["pooling"]
    config = row["config"]
    return f"mean+last:{config['last_weight']:g}" if config["pooling"] == "mean+last" else config["pooling"]


def complexity(post: str) -> tuple[int, int, int]:
    """Sort key of a post-processing name such as ``whiten:256@sts-b-train+general``: simpler first."""
    spec, _, calibration = post.partition("@")
    mode, _, components = spec.partition(":")
    return SIMPLICITY[mode], 1 if components else 0, calibration.count(JOIN)


def score_rows(files: Sequence[Path]) -> tuple[dict[tuple[str, str, str], dict[str, dict[str, float]]], list[str]]:
    """``{(method, pooling, post): {backbone: {metric: value}}}`` and the backbone names, in file order."""
    table: dict[tuple[str, str, str], dict[str, dict[str, float]]] = defaultdict(dict)
    backbones = []
    for path in files:
        data = json.loads(path.read_text())
        backbone = Path(data["base"]).name
        backbones.append(backbone)
        for row in data["results"]:
            table[(row["method"], pooling_of(row), row["postprocessing"])][backbone] = {m: row[m] for m in METRICS}
    return table, backbones


def rank(files: Sequence[Path], tie: float = 0.005) -> str:
    table, backbones = score_rows(files)

    def mean_score(key: tuple[str, str, str]) -> float | None:
        per = table[key]
        if any(b not in per for b in backbones):
            return None
        return sum(sum(per[b].values()) / len(METRICS) for b in backbones) / len(backbones)

    candidates = sorted((k for k in table if k[0] == "kv" and mean_score(k) is not None), key=mean_score, reverse=True)
    best = mean_score(candidates[0])
    chosen = min((k for k in candidates if mean_score(k) >= best - tie), key=lambda k: (complexity(k[2]), -mean_score(k)))
    header = ["method", "pooling", "post-processing", "score"] + [f"{b} {m}" for b in backbones for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = sorted(table, key=lambda k: (k[0] != "kv", -(mean_score(k) or 0.0)))
    for key in rows:
        score = mean_score(key)
        cells = [f"**{c}**" if key == chosen else c for c in key]
        cells.append("-" if score is None else f"{score:.4f}")
        for b in backbones:
            cells += [f"{table[key][b][m]:.3f}" if b in table[key] else "-" for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    verdict = f"Chosen: `kv`, pooling `{chosen[1]}`, post-processing `{chosen[2]}` (score {mean_score(chosen):.4f}; best {best:.4f}, tie {tie})."
    return verdict + "\n\n" + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="eval_sts.py JSON outputs on dev data, one per backbone")
    parser.add_argument("--tie", type=float, default=0.005, help="score margin within which the simpler candidate wins")
    parser.add_argument("--out", type=Path, default=None, help="also write the ranking to this Markdown file")
    args = parser.parse_args(argv)
    text = rank(args.files, args.tie)
    if args.out:
        args.out.write_text(f"`python experiments/choose_defaults/choose_defaults.py {' '.join(map(str, args.files))}`\n\n{text}")
    print(text)
    return text


if __name__ == "__main__":
    main()
