"""Rule 2 of ``experiments/mteb/RULE.md``: may a candidate build replace today's default, judged on the dev splits?

Each backbone's ``table_dev.json`` (``run_table.py --splits dev``) holds today's default build as ``kv_whiten`` and
each candidate build as ``kv_<name>_whiten`` (one change from the defaults per ``_<name>`` part). A row's score
on a backbone is its mean main score over the five dev tasks; its score is the mean over the backbones it was
measured on, and only the backbones the default was measured on count. A candidate wins only if it beats the
default by more than ``margin``; among candidates within ``margin`` of the best, the one with the fewest changes
wins (then the higher score). Raw rows (no whitening) and baselines are listed, never chosen: the default build
whitens. Nothing here reads a test split: the tables are the dev ones or the run is refused. Until every backbone and
every candidate the amendment names is measured, the outcome is provisional and says what it still lacks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvemb_lab.backbones import BACKBONES
from kvemb_lab.evaluation import write_result

DEFAULT_ROW = "kv_whiten"
MARGIN = 0.005
CANDIDATES = ("bias1", "window10", "docside", "broadmix")  # RULE.md's amendment of the third session


@dataclass(frozen=True)
class Verdict:
    """The rule's outcome: the winning row, every row's score, and the backbones the scores rest on."""

    winner: str
    scores: dict[str, float]  # whitened kv rows measured on every backbone of the default
    incomplete: dict[str, list[str]]  # rows left out: the backbones they miss
    per_backbone: dict[str, dict[str, float]]  # backbone -> row -> mean over the dev tasks (every complete row)
    backbones: list[str]

    @property
    def pending(self) -> list[str]:
        """What the rule still lacks before its outcome is final: backbones and candidates not measured."""
        lacking = [f"backbone {b}" for b in BACKBONES if b not in self.backbones]
        return lacking + [f"candidate {c}" for c in CANDIDATES if f"kv_{c}_whiten" not in self.scores]


def changes(row: str) -> int:
    """How many knobs a kv row changes from today's default: one per ``_<name>`` part of ``kv_<name>_whiten``."""
    return row.removesuffix("_whiten").count("_")


def dev_means(table: Mapping[str, Any]) -> dict[str, float]:
    """Mean main score over the table's dev tasks of every row that has all of them."""
    if table.get("splits") != "dev":
        raise ValueError(f"{table.get('backbone')}: a {table.get('splits')!r} table; the rule reads dev tables only")
    tasks = list(table["task_types"])
    return {
        row: sum(record["scores"][t] for t in tasks) / len(tasks)
        for row, record in table["rows"].items()
        if all(t in record.get("scores", {}) for t in tasks)
    }


def decide(tables: Sequence[Mapping[str, Any]], margin: float = MARGIN) -> Verdict:
    per_backbone = {table["backbone"]: dev_means(table) for table in tables}
    backbones = [b for b, means in per_backbone.items() if DEFAULT_ROW in means]
    if not backbones:
        raise ValueError(f"no dev table has the default build's row {DEFAULT_ROW!r} on every dev task")
    candidates = {row for b in backbones for row in per_backbone[b] if row.startswith("kv") and row.endswith("_whiten")}
    scores, incomplete = {}, {}
    for row in sorted(candidates):
        missing = [b for b in backbones if row not in per_backbone[b]]
        if missing:
            incomplete[row] = missing
        else:
            scores[row] = sum(per_backbone[b][row] for b in backbones) / len(backbones)
    default = scores[DEFAULT_ROW]
    best = max(scores.values())
    winner = DEFAULT_ROW
    if best > default + margin:
        close = [row for row, score in scores.items() if score >= best - margin]
        winner = min(close, key=lambda row: (changes(row), -scores[row]))
    return Verdict(winner, scores, incomplete, per_backbone, backbones)


def render(verdict: Verdict, tables: Sequence[Mapping[str, Any]], command: str) -> str:
    """The verdict as Markdown: every row's dev mean per backbone, the kv rows' score, the outcome."""
    rows = sorted({row for means in verdict.per_backbone.values() for row in means})
    head = ["row", *verdict.per_backbone, "score (chosen on)", "changes"]
    lines = ["# Default re-check on the MTEB dev splits (experiments/mteb/RULE.md, rule 2)", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{means[row]:.4f}" if row in means else "–" for means in verdict.per_backbone.values()]
        scored = row in verdict.scores
        cells += [f"**{verdict.scores[row]:.4f}**" if scored else "–", str(changes(row)) if scored else ""]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    default = verdict.scores[DEFAULT_ROW]
    final = not verdict.pending
    if verdict.winner == DEFAULT_ROW:
        verb = "stays" if final else "leads"
        outcome = f"today's default ({DEFAULT_ROW}) {verb}: no candidate beats it by more than {MARGIN}"
    else:
        gain = f"+{verdict.scores[verdict.winner] - default:.4f} on the dev mean"
        outcome = f"{verdict.winner} {'replaces the default' if final else 'leads'} ({gain})"
    if not final:
        outcome = f"provisional, {outcome}; not measured yet: {', '.join(verdict.pending)}"
    tasks = sorted({t for table in tables for t in table["task_types"]})
    lines += [
        "",
        f"Score: mean main score over the dev tasks ({', '.join(tasks)}), then over the backbones "
        f"{', '.join(verdict.backbones)} ({len(verdict.backbones)} of 3). Only whitened kv rows are candidates.",
        "",
        f"**Outcome: {outcome}.**",
    ]
    if verdict.incomplete:
        missing = "; ".join(f"{row}: {', '.join(backbones)}" for row, backbones in verdict.incomplete.items())
        lines += ["", f"Not scored (missing backbones): {missing}"]
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(paths: Sequence[Path], out: Path | None, command: str) -> Verdict:
    tables = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    verdict = decide(tables)
    text = render(verdict, tables, command)
    print(text)
    if out is not None:
        record = {"winner": verdict.winner, "scores": verdict.scores, "incomplete": verdict.incomplete,
                  "per_backbone": verdict.per_backbone, "backbones": verdict.backbones, "margin": MARGIN,
                  "command": command, "tables": [t.get("provenance") for t in tables]}  # fmt: skip
        # its own provenance is the code that applied the rule; the tables' runs are under "tables"
        write_result(out.with_suffix(""), record, text)
    return verdict
