"""Issue 20's decision: which label-free window rule carries to all three backbones (experiments/window_rule/RULE.md).

Reads each backbone's window sweep (``doc_levers.py windows BACKBONE --out results/windows`` writes it to
``results/windows/BACKBONE/windows_BACKBONE.json``) and its checked-in ID curve (``results/id_curve/BACKBONE/``),
places every candidate rule's window on that curve, and scores each rule by its gap to the best swept window on
STS-B dev. Writes ``decision.{json,md}`` and ``windows.png`` (score per window next to the ID curve) to ``--out``.

    python experiments/window_rule/window_rule.py smollm2,qwen25,gemma3
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvemb_st.window_rule import (
    END_LAYERS,
    SelectionParams,
    mean_position,
    near_minimum,
    place_window,
    select_window,
)

from kvemb_lab.backbones import run_assets
from kvemb_lab.evaluation import markdown_table, write_json
from kvemb_lab.paths import RESULTS

CURVES = {backbone: RESULTS / "id_curve" / backbone / "id_curve.json" for backbone in ("smollm2", "qwen25", "gemma3")}
TOLERANCE = 0.005  # the target: within 0.005 of the best swept window
DEFAULT_BIAS = 3.0
DEPTH_FRACTION = 0.7  # rule D's centre, relative depth; written in RULE.md before the runs
Rule = Callable[[Sequence[float], int], list[int]]


UNCAPPED = SelectionParams(end_margin=0)  # rules A, B and D as written: the window may end at the last layer


def centred(curve: Sequence[float], points: int) -> list[int]:
    return select_window(curve, UNCAPPED, points)[0]


def ending_at_anchor(curve: Sequence[float], points: int) -> list[int]:
    width = UNCAPPED.width(len(curve))
    anchor = mean_position(near_minimum(curve, UNCAPPED, points)[1])
    return place_window(anchor - (width - 1), len(curve), SelectionParams(anchor="start", end_margin=0))


def centred_end_capped(curve: Sequence[float], points: int) -> list[int]:
    return select_window(curve, SelectionParams(end_margin=END_LAYERS), points)[0]


def fixed_depth(curve: Sequence[float], points: int) -> list[int]:
    return place_window(int(DEPTH_FRACTION * (len(curve) - 1) + 0.5), len(curve), UNCAPPED)


RULES: dict[str, tuple[str, Rule]] = {
    "A": ("centred on the ID anchor (current)", centred),
    "B": ("ending at the ID anchor", ending_at_anchor),
    "C": ("centred, end capped before the last two layers", centred_end_capped),
    "D": (f"fixed depth: centred on {DEPTH_FRACTION} of the layers, no ID", fixed_depth),
}


def span(layers: Sequence[int]) -> str:
    return f"{layers[0]}-{layers[-1]}"


def decide(gaps: dict[str, list[float]]) -> str:
    """Most backbones within TOLERANCE; then the smallest largest gap; then A (no change)."""
    return min(gaps, key=lambda r: (-sum(g <= TOLERANCE for g in gaps[r]), max(gaps[r]), r != "A"))


def sweep_path(out: Path, backbone: str) -> Path:
    """Where ``doc_levers.py windows BACKBONE --out OUT`` wrote the backbone's sweep."""
    return out / backbone / f"windows_{backbone}.json"


def sweep_rows(path: Path, bias: float = DEFAULT_BIAS) -> dict[str, dict[str, Any]]:
    rows = json.loads(path.read_text())["rows"]
    return {f"{r['start']}-{r['end']}": r for r in rows if r["prefix_bias"] == bias}


def id_curve(backbone: str) -> tuple[list[float], int]:
    """The backbone's checked-in ID curve and the number of calibration texts behind it."""
    data = json.loads(CURVES[backbone].read_text())
    return data["id_curve"], data["num_calibration_texts"]


def evaluate(backbones: Sequence[str], out: Path) -> dict[str, Any]:
    per_rule: dict[str, list[float]] = {name: [] for name in RULES}
    rows = []
    for backbone in backbones:
        curve, points = id_curve(backbone)
        swept = sweep_rows(sweep_path(out, backbone))
        best = max(swept.values(), key=lambda r: r["sts_dev"])
        for name, (_, rule) in RULES.items():
            window = span(rule(curve, points))
            if window not in swept:
                raise SystemExit(f"rule {name} picks {window} on {backbone}, which the sweep has not run: probe kv@{window}")
            gap = best["sts_dev"] - swept[window]["sts_dev"]
            per_rule[name].append(gap)
            rows.append({"backbone": backbone, "rule": name, "window": window, "sts_dev": swept[window]["sts_dev"],
                         "lee_pearson": swept[window]["lee_pearson"], "best_window": f"{best['start']}-{best['end']}",
                         "best_sts_dev": best["sts_dev"], "gap": gap})  # fmt: skip
    chosen = decide(per_rule)
    summary = [{"rule": name, "definition": RULES[name][0], "within": sum(g <= TOLERANCE for g in gaps),
                "largest_gap": max(gaps), "adopted": name == chosen} for name, gaps in per_rule.items()]  # fmt: skip
    result = {"backbones": list(backbones), "tolerance": TOLERANCE, "chosen": chosen, "summary": summary, "rows": rows}
    write_json(out / "decision.json", result, run_assets(backbones))
    (out / "decision.md").write_text(
        f"Adopted rule: **{chosen}** ({RULES[chosen][0]}).\n\n"
        + markdown_table(summary, ["rule", "definition", "within", "largest_gap", "adopted"], 4)
        + "\n"
        + markdown_table(rows, ["backbone", "rule", "window", "sts_dev", "lee_pearson", "best_window", "gap"], 4)
    )
    return result


def plot(backbones: Sequence[str], out: Path) -> None:
    """Per backbone: each swept window as a bar over its layers at its STS-B dev (and Lee) score; the ID curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(backbones), 4), constrained_layout=True)
    FigureCanvasAgg(figure)
    for k, backbone in enumerate(backbones):
        axis = figure.add_subplot(1, len(backbones), k + 1)
        for row in sweep_rows(sweep_path(out, backbone)).values():
            xs = [row["start"] - 0.4, row["end"] + 0.4]
            axis.plot(xs, [row["sts_dev"]] * 2, color="tab:blue", lw=2, label="STS-B dev")
            axis.plot(xs, [row["lee_pearson"]] * 2, color="tab:green", lw=2, ls="--", label="Lee")
        handles = dict(zip(*reversed(axis.get_legend_handles_labels())))
        axis.set(title=backbone, xlabel="layer (window span)", ylabel="score")
        curve = id_curve(backbone)[0]
        twin = axis.twinx()
        line = twin.plot(range(len(curve)), curve, color="tab:red", marker=".", label="ID (TwoNN)")[0]
        twin.set_ylabel("intrinsic dimension")
        axis.legend([*handles.values(), line], [*handles, "ID (TwoNN)"], loc="lower left", fontsize=8)
    figure.savefig(out / "windows.png", dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbones", help=f"comma-separated, of {sorted(CURVES)}")
    parser.add_argument("--out", type=Path, default=RESULTS / "windows")
    args = parser.parse_args(argv)
    backbones = args.backbones.split(",")
    result = evaluate(backbones, args.out)
    plot(backbones, args.out)
    print((args.out / "decision.md").read_text())
    print(f"adopted: {result['chosen']}")


if __name__ == "__main__":
    main()
