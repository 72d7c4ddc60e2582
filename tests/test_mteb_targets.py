"""Issue 26's targets (lab/kvemb_lab/mteb_targets.py): same post-processing, complete types only, misses named."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

LAB_MISSING = "the lab package is not installed (pip install -e ./lab)"
targets = pytest.importorskip("kvemb_lab.mteb_targets", reason=LAB_MISSING)

TYPES = {"STS12": "STS", "STS13": "STS", "SciFact": "Retrieval", "Banking77Classification": "Classification"}


def table(rows: dict[str, dict[str, float]]) -> dict:
    return {"backbone": "tiny", "splits": "test", "task_types": TYPES,
            "rows": {row: {"scores": scores} for row, scores in rows.items()}}  # fmt: skip


def every(value: float) -> dict[str, float]:
    return dict.fromkeys(TYPES, value)


def found(comparisons, post: str, kind: str):
    return next(c for c in comparisons if (c.tasks, c.post, c.kind) == (targets.ALL, post, kind))


def test_met_only_against_every_baseline_with_the_same_post_processing():
    rows = {"kv": every(0.5), "kv_whiten": every(0.7)}
    rows |= {m: every(0.4) for m in targets.BASELINES} | {f"{m}_whiten": every(0.65) for m in targets.BASELINES}
    rows["echo"] = every(0.9)  # a raw baseline beating the whitened default is not the whitened comparison
    comparisons = targets.compare(table(rows))
    whitened = found(comparisons, "whiten", "overall")
    assert whitened.verdict == "met" and whitened.margin == pytest.approx(0.05) and not whitened.missing
    raw = found(comparisons, "none", "STS")
    assert raw.verdict == "misses" and raw.best == ("echo", 0.9) and raw.margin == pytest.approx(-0.4)


def test_a_baseline_missing_a_task_of_a_type_is_named_and_never_counted_on_it():
    rows = {"kv_bias1_whiten": every(0.6), "echo_whiten": every(0.5), "prompteol_whiten": every(0.7)}
    del rows["prompteol_whiten"]["SciFact"]  # prompteol beats the default, but lacks the retrieval task
    comparisons = targets.compare(table(rows), default="kv_bias1")
    retrieval = found(comparisons, "whiten", "Retrieval")
    assert retrieval.verdict == "leads so far" and retrieval.best == ("echo", 0.5)
    assert retrieval.missing == ["mean", "last", "prompteol", "token_prepending"]
    assert found(comparisons, "whiten", "STS").verdict == "misses"  # a measured baseline beats it: missed already
    assert found(comparisons, "none", "STS").verdict == "default not measured"
    text = targets.render(table(rows), comparisons, "kv_bias1", "cmd")  # prompteol lacks SciFact: not in overall
    assert "**ahead so far (+0.1000; not measured: mean, last, prompteol, token_prepending)**" in text
    behind = {"kv_whiten": every(0.5), "echo_whiten": every(0.6)}
    assert "**not reached (-0.1000)**" in targets.render(  # missing baselines cannot rescue it
        table(behind), targets.compare(table(behind)), "kv", "cmd")


def test_the_command_writes_the_comparison_with_its_provenance(tmp_path, capsys):
    rows = {"kv_whiten": every(0.7), "kv": every(0.5)} | {f"{m}_whiten": every(0.65) for m in targets.BASELINES}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table(rows)))
    script = Path(__file__).resolve().parents[1] / "experiments" / "mteb" / "targets.py"
    done = subprocess.run([sys.executable, str(script), str(path), "--out", str(tmp_path / "targets")],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "| whiten | overall | 0.7000 | mean 0.6500 | +0.0500 | met |  |" in done.stdout
    assert "**reached**" in done.stdout
    record = json.loads((tmp_path / "targets.json").read_text())
    assert f"Provenance: `{json.dumps(record['provenance'])}`" in (tmp_path / "targets.md").read_text()
    with pytest.raises(SystemExit) as refused:  # in-process: a second interpreter would only repeat the imports
        runpy.run_path(str(script))["main"]([str(path), "--default", "kv_nope"])
    stderr = capsys.readouterr().err
    assert refused.value.code == 2 and "no row 'kv_nope'" in stderr and "kv_whiten" in stderr


def test_held_out_comparisons_average_only_the_tasks_no_default_was_chosen_on():
    rows = {"kv_whiten": every(0.6), "echo_whiten": every(0.5)}
    rows["echo_whiten"]["STS12"] = 0.9  # a dev task: echo wins STS over all tasks, not over the held-out STS13
    comparisons = targets.compare(table(rows))
    held_out = {(c.post, c.kind): c for c in comparisons if c.tasks == targets.HELD_OUT}
    assert found(comparisons, "whiten", "STS").verdict == "misses"
    sts = held_out["whiten", "STS"]
    assert sts.verdict == "leads so far" and sts.margin == pytest.approx(0.1)
    assert ("whiten", "Classification") not in held_out  # Banking77 is a dev task: no held-out classification
    assert held_out["whiten", "overall"].default == pytest.approx(0.6)  # STS13 and SciFact
    text = targets.render(table(rows), comparisons, "kv", "cmd")
    assert "## Held out: the 2 tasks no default was chosen on\n\nSTS13, SciFact\n" in text
    dev = targets.compare(table(rows) | {"splits": "dev"})  # on dev splits every task is a dev task
    assert {c.tasks for c in dev} == {targets.ALL} and "Held out" not in targets.render(
        table(rows) | {"splits": "dev"}, dev, "kv", "cmd")


def test_the_summary_sets_the_backbones_side_by_side_and_names_every_miss(tmp_path):
    ahead = {"kv_bias1_whiten": every(0.7), "echo_whiten": every(0.6), "kv_bias1": every(0.5)}
    behind = {"kv_bias1_whiten": every(0.5), "echo_whiten": every(0.6)} | {m: every(0.4) for m in targets.BASELINES}
    behind["kv_bias1"] = every(0.45)
    paths = []
    for name, rows in (("ahead", ahead), ("behind", behind)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(table(rows) | {"backbone": name}))
    script = Path(__file__).resolve().parents[1] / "experiments" / "mteb" / "summary.py"
    main = runpy.run_path(str(script))["main"]
    assert main([*map(str, paths), "--default", "kv_bias1", "--out", str(tmp_path / "summary")]) == 0
    text = (tmp_path / "summary.md").read_text()
    whitened = text.split("## All tasks, post-processing `whiten`")[1].split("##")[0]
    assert "| backbone | STS | Retrieval | Classification | overall |" in whitened
    assert "| ahead | +0.1000 vs echo (**leads so far**) |" in whitened  # the other baselines were never run
    assert "| behind | -0.1000 vs echo (**misses**) | -0.1000 vs echo (**misses**) |" in whitened
    raw = text.split("## All tasks, post-processing `none`")[1].split("##")[0]
    assert "| ahead | no baseline measured | no baseline measured |" in raw
    assert "| behind | +0.0500 vs mean | +0.0500 vs mean |" in raw  # the first of equal baselines is named
    held_out = text.split("## Held out tasks, post-processing `whiten`")[1].split("##")[0]
    assert "| backbone | STS | Retrieval | overall |" in held_out  # Banking77 is a dev task: no classification
    record = json.loads((tmp_path / "summary.json").read_text())
    assert set(record["backbones"]) == {"ahead", "behind"} and record["default"] == "kv_bias1"
    with pytest.raises(SystemExit):  # one backbone's table given twice would hide the other's row
        main([str(paths[0]), str(paths[0]), "--default", "kv_bias1"])
