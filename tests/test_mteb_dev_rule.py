"""RULE.md's rule 2 (lab/kvemb_lab/mteb_dev_rule.py): the margin, the fewest-changes tie break, the backbones."""

from __future__ import annotations

import json

import pytest

rule = pytest.importorskip("kvemb_lab.mteb_dev_rule", reason="the lab package is not installed (pip install -e ./lab)")

TASKS = {"STSBenchmark": "STS", "Banking77Classification": "Classification"}


def table(backbone: str, rows: dict[str, tuple[float, float]], splits: str = "dev") -> dict:
    return {"backbone": backbone, "splits": splits, "task_types": TASKS,
            "rows": {row: {"scores": dict(zip(TASKS, scores))} for row, scores in rows.items()}}  # fmt: skip


def test_the_default_stays_unless_a_candidate_beats_it_by_more_than_the_margin():
    close = rule.decide([table("a", {"kv_whiten": (0.6, 0.6), "kv_bias1_whiten": (0.604, 0.604)})])
    assert close.winner == "kv_whiten" and close.scores["kv_bias1_whiten"] == pytest.approx(0.604)
    clear = rule.decide([table("a", {"kv_whiten": (0.6, 0.6), "kv_bias1_whiten": (0.61, 0.61)})])
    assert clear.winner == "kv_bias1_whiten"


def test_among_candidates_near_the_best_the_one_with_fewest_changes_wins_and_raw_rows_never_do():
    rows = {"kv_whiten": (0.6, 0.6), "kv_bias1_window10_whiten": (0.63, 0.63), "kv_bias1_whiten": (0.627, 0.627),
            "kv_window10_whiten": (0.62, 0.62), "kv_bias1": (0.9, 0.9), "echo_whiten": (0.95, 0.95)}  # fmt: skip
    verdict = rule.decide([table("a", rows)])
    assert verdict.winner == "kv_bias1_whiten"  # within 0.005 of the best, one change instead of two
    assert set(verdict.scores) == {"kv_whiten", "kv_bias1_window10_whiten", "kv_bias1_whiten", "kv_window10_whiten"}


def test_scores_average_the_backbones_and_a_row_missing_one_is_not_scored():
    a = table("a", {"kv_whiten": (0.6, 0.6), "kv_bias1_whiten": (0.7, 0.7), "kv_docside_whiten": (0.9, 0.9)})
    b = table("b", {"kv_whiten": (0.6, 0.6), "kv_bias1_whiten": (0.5, 0.5), "kv_docside_whiten": (0.9, None)})
    b["rows"]["kv_docside_whiten"]["scores"].pop("Banking77Classification")
    verdict = rule.decide([a, b])
    assert verdict.scores["kv_bias1_whiten"] == pytest.approx(0.6) and verdict.winner == "kv_whiten"
    assert verdict.incomplete == {"kv_docside_whiten": ["b"]} and verdict.backbones == ["a", "b"]
    text = rule.render(verdict, [a, b], "cmd")
    assert "| kv_bias1_whiten | 0.7000 | 0.5000 | **0.6000** | 1 |" in text
    assert "provisional, today's default (kv_whiten) leads" in text and "kv_docside_whiten: b" in text
    assert "backbone qwen25, candidate window10, candidate docside, candidate broadmix" in text


def test_the_outcome_is_final_only_with_every_backbone_and_candidate():
    rows = {f"kv_{c}_whiten": (0.6, 0.6) for c in rule.CANDIDATES}
    rows |= {"kv_whiten": (0.6, 0.6), "kv_bias1_whiten": (0.7, 0.7)}
    tables = [table(b, rows) for b in rule.BACKBONES]
    assert rule.decide(tables).pending == []
    assert "**Outcome: kv_bias1_whiten replaces the default (+0.1000 on the dev mean).**" in rule.render(
        rule.decide(tables), tables, "cmd")
    partial = rule.decide(tables[:2])
    assert partial.pending == ["backbone qwen25"] and partial.winner == "kv_bias1_whiten"
    assert "provisional, kv_bias1_whiten leads (+0.1000 on the dev mean); not measured yet: backbone qwen25" in (
        rule.render(partial, tables[:2], "cmd"))


def test_a_test_split_table_is_refused():
    with pytest.raises(ValueError, match="dev tables only"):
        rule.decide([table("a", {"kv_whiten": (0.6, 0.6)}, splits="test")])


def test_the_decision_files_carry_the_tables_and_their_own_provenance(tmp_path):
    written = table("a", {"kv_whiten": (0.6, 0.6), "kv_bias1_whiten": (0.7, 0.7)}) | {"provenance": {"commit": "abc"}}
    path = tmp_path / "table_dev.json"
    path.write_text(json.dumps(written))
    rule.main([path], tmp_path / "choice", "cmd")
    record = json.loads((tmp_path / "choice.json").read_text())
    assert record["winner"] == "kv_bias1_whiten" and record["tables"] == [{"commit": "abc"}]
    assert set(record["provenance"]) == {"commit", "dirty", "versions", "assets"}
    assert f"Provenance: `{json.dumps(record['provenance'])}`" in (tmp_path / "choice.md").read_text()
