"""Issue 26's targets read off one backbone's MTEB test table: does the default build beat every baseline?

RULE.md's reporting rule: where the default build loses to a baseline *with the same post-processing*, say where and
by how much. So each post-processing (none, whiten) is compared on its own, per task type (STS, retrieval,
classification) and overall, always over the same tasks: a baseline's type mean counts only when it has every task of
the type, and a baseline that lacks one is listed as not measured, never dropped silently, so a target can only be
called met against baselines that were all measured. The moonshot is the overall mean beating the best complete
baseline by 0.02. On a test table the same comparisons are made again over the held-out tasks alone (RULE.md: every
task but the dev ones), which no default was chosen on. Nothing is computed here that mteb computed: the inputs are
mteb's main scores in the table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvemb_lab.evaluation import markdown_table
from kvemb_lab.mteb_table import BASELINES, POSTS, TASK_TYPES, held_out_tasks, row_name, type_means

MOONSHOT = 0.02  # the overall margin over the best baseline
KINDS = (*TASK_TYPES, "overall")
ALL, HELD_OUT = "all", "held out"  # the tasks a comparison averages over


@dataclass
class Comparison:
    """The default row against the baselines of one post-processing on one task type (or ``overall``)."""

    kind: str
    post: str
    default: float | None
    baselines: dict[str, float] = field(default_factory=dict)  # measured on every task of the kind
    missing: list[str] = field(default_factory=list)  # baselines lacking a task of the kind
    tasks: str = ALL  # ALL of the table's tasks, or HELD_OUT: those no default was chosen on

    @property
    def best(self) -> tuple[str, float] | None:
        return max(self.baselines.items(), key=lambda item: item[1]) if self.baselines else None

    @property
    def margin(self) -> float | None:
        """Default minus the best measured baseline (negative: the default loses)."""
        best = self.best
        return None if best is None or self.default is None else self.default - best[1]

    @property
    def verdict(self) -> str:
        if self.default is None:
            return "default not measured"
        if self.margin is None:
            return "no baseline measured"
        if self.margin <= 0:
            return "misses"  # a measured baseline is ahead: no missing one can change that
        return "leads so far" if self.missing else "met"

    def record(self) -> dict[str, Any]:
        """The comparison as written to JSON: its fields and what they decide."""
        return asdict(self) | {"margin": self.margin, "verdict": self.verdict}


def read_table(path: Path, default: str) -> dict[str, Any]:
    """A backbone's table.json (``run_table.py``), refused with a ``ValueError`` that names its rows when it has no
    default row ``default`` -- a misspelt row would otherwise read as "default not measured" everywhere."""
    table = json.loads(path.read_text(encoding="utf-8"))
    if default not in table["rows"]:
        raise ValueError(f"{path} has no row {default!r}; its rows: {', '.join(table['rows'])}")
    return table


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """The options of every script that reads targets off test tables (``targets.py``, ``summary.py``)."""
    parser.add_argument("--default", default="kv", help="the default build's row without its _whiten suffix")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.json")


def compare(table: Mapping[str, Any], default: str = "kv") -> list[Comparison]:
    """One :class:`Comparison` per post-processing and kind, over all tasks and (test splits) the held-out ones;
    ``default`` is the default build's method row (``kv``, or ``kv_<candidate>`` where the table's default build
    was a candidate row). A kind with no held-out task has no held-out comparison."""
    types, rows = table["task_types"], table["rows"]
    scopes = {ALL: types}
    if table["splits"] == "test":
        scopes[HELD_OUT] = {name: types[name] for name in held_out_tasks(types)}
    found = []
    for scope, scoped in scopes.items():
        means = {row: type_means(record.get("scores", {}), scoped) for row, record in rows.items()}
        kinds = [kind for kind in KINDS if kind == "overall" or kind in scoped.values()]
        for post in POSTS:
            for kind in kinds:
                result = Comparison(kind, post, means.get(row_name(default, post), {}).get(kind), tasks=scope)
                for method in BASELINES:
                    value = means.get(row_name(method, post), {}).get(kind)
                    if value is None:
                        result.missing.append(method)
                    else:
                        result.baselines[method] = value
                found.append(result)
    return found


def render(table: Mapping[str, Any], comparisons: list[Comparison], default: str, command: str) -> str:
    """The comparisons as Markdown, one line per post-processing and kind, then the moonshot, then the same
    comparisons over the held-out tasks."""
    lines = [f"# MTEB targets: {table['backbone']} ({table['splits']} splits), default row `{default}`", ""]
    lines += _comparison_table([c for c in comparisons if c.tasks == ALL]).splitlines()
    whitened = next(c for c in comparisons if (c.tasks, c.post, c.kind) == (ALL, "whiten", "overall"))
    margin = whitened.margin
    if margin is None:
        moonshot = "not measurable yet"
    elif margin < MOONSHOT:  # more baselines can only raise the best one: missed already
        moonshot = f"not reached ({margin:+.4f})"
    else:
        missing = ", ".join(whitened.missing)
        moonshot = f"ahead so far ({margin:+.4f}; not measured: {missing})" if missing else "reached"
    lines += ["", f"Moonshot (whitened overall mean, +{MOONSHOT} over the best baseline): **{moonshot}**.", ""]
    held_out = [c for c in comparisons if c.tasks == HELD_OUT]
    if held_out:
        names = held_out_tasks(table["task_types"])
        lines += [f"## Held out: the {len(names)} tasks no default was chosen on", "", ", ".join(names), ""]
        lines += [*_comparison_table(held_out).splitlines(), ""]
    lines += ["A baseline counts on a type only when it has every task of it; `leads so far`: ahead of the baselines "
              "measured, with some not measured.", "", f"Command: `{command}`", ""]  # fmt: skip
    return "\n".join(lines)


def render_summary(comparisons: Mapping[str, list[Comparison]], default: str, command: str) -> str:
    """Every backbone's verdicts side by side (``comparisons`` by backbone, from :func:`compare`): one table per
    post-processing and scope, a row per backbone, a cell per kind -- the default build minus the best baseline,
    which is named, and the verdict wherever it is not ``met``. Cross-backbone claims ("missed on classification
    twice") are read here, not assembled by hand from several files."""
    lines = [f"# MTEB targets on every backbone, default row `{default}`", ""]
    for scope in (ALL, HELD_OUT):
        for post in POSTS[::-1]:  # whitened first: the folder as built
            found = {name: {c.kind: c for c in listed if (c.tasks, c.post) == (scope, post)}
                     for name, listed in comparisons.items()}  # fmt: skip
            kinds = [kind for kind in KINDS if any(kind in cells for cells in found.values())]
            if not kinds:
                continue
            rows = [{"backbone": name} | {kind: _summary_cell(cells.get(kind)) for kind in kinds}
                    for name, cells in found.items()]  # fmt: skip
            lines += [f"## {scope.capitalize()} tasks, post-processing `{post}`", "",
                      markdown_table(rows, ["backbone", *kinds])]  # fmt: skip
    lines += ["A cell: the default build minus the best baseline with the same post-processing (negative: it loses), "
              "that baseline, and the verdict unless `met`.", "", f"Command: `{command}`", ""]  # fmt: skip
    return "\n".join(lines)


def _summary_cell(comparison: Comparison | None) -> str:
    if comparison is None:
        return "–"
    if comparison.margin is None:  # no default or no baseline measured
        return comparison.verdict
    cell = f"{comparison.margin:+.4f} vs {comparison.best[0]}"
    return cell if comparison.verdict == "met" else f"{cell} (**{comparison.verdict}**)"


def _comparison_table(comparisons: list[Comparison]) -> str:
    def number(value: float | None, sign: bool = False) -> str:
        return "–" if value is None else (f"{value:+.4f}" if sign else f"{value:.4f}")

    rows = [{"post": c.post, "type": c.kind, "default": number(c.default),
             "best baseline": "–" if c.best is None else f"{c.best[0]} {c.best[1]:.4f}",
             "margin": number(c.margin, sign=True), "verdict": c.verdict, "not measured": ", ".join(c.missing)}
            for c in comparisons]  # fmt: skip
    return markdown_table(rows, ["post", "type", "default", "best baseline", "margin", "verdict", "not measured"])
