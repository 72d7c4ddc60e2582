"""mteb's own tasks fed from the offline copy, end to end through mteb's evaluator and ``kvemb eval``.

Needs the team's data folder ``shared/mteb`` (beside the repository, or ``KVEMB_MTEB_DATA``); skipped without
it, since the data is never shipped with the package. Budget: ~20 s (a tiny random model, slices of BIOSSES
and SciFact, BIOSSES whole for the command).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

import kvemb_st
from kvemb_st.benchmark.local_tasks import LOCAL_TASKS, Sampling, load_local_task
from kvemb_st.benchmark.run import SUMMARY_FILE, load_tasks, run_tasks
from kvemb_st.cli import main

mteb = pytest.importorskip("mteb")  # optional extra (`kvemb-st[mteb]`, in the test extra)

DATA = Path(os.environ.get("KVEMB_MTEB_DATA") or Path(__file__).resolve().parents[2] / "shared" / "mteb")
pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"no offline MTEB data at {DATA} (the team's shared/mteb; or set KVEMB_MTEB_DATA)"
)
KNOWN_DIFFERENCES = {("TweetSentimentExtractionClassification", "train", "default"): 1}  # MTEB's one empty text


def local_counts(task) -> dict[tuple[str, str], int]:
    """(split, subset) -> rows, read from the layout the task's class evaluates (documents for retrieval)."""
    data = task.dataset
    if "default" in data and isinstance(data["default"], dict):  # retrieval: subset -> split -> parts
        return {(split, "documents"): len(parts["corpus"]) for split, parts in data["default"].items()} | {
            (split, "queries"): len(parts["queries"]) for split, parts in data["default"].items()
        }
    if task.metadata.is_multilingual:
        return {(split, subset): len(ds) for subset, splits in data.items() for split, ds in splits.items()}
    return {(split, "default"): len(ds) for split, ds in data.items()}


def mteb_count(stats: dict, split: str, subset: str) -> int:
    if subset in ("documents", "queries"):
        return stats[split][f"num_{subset}"]
    if subset != "default":
        return stats[split]["hf_subset_descriptive_stats"][subset]["num_samples"]
    return stats[split]["num_samples"]


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_every_local_task_loads_with_mtebs_sample_counts(name):
    task, origin = load_local_task(name, DATA, eval_splits=["test", "validation"] if name == "STSBenchmark" else None)
    assert task.data_loaded and origin.files and all(v.startswith("sha256:") for v in origin.files.values())
    stats = task.metadata.descriptive_stats
    for (split, subset), rows in local_counts(task).items():
        if split in stats:  # MTEB's stats omit some splits it does not evaluate (STSBenchmark validation)
            assert rows + KNOWN_DIFFERENCES.get((name, split, subset), 0) == mteb_count(stats, split, subset)


def test_amazon_counterfactual_is_scored_as_mtebs_english_benchmark_scores_it():
    """MTEB(eng, v1) scores its test split, English only: the local copy's en-ext subset is never read."""
    task, origin = load_local_task("AmazonCounterfactualClassification", DATA)
    assert (task.eval_splits, task.hf_subsets, list(task.dataset)) == (["test"], ["en"], ["en"])
    assert not any("en-ext" in name for name in origin.files)


def test_mtebs_evaluator_end_to_end_on_slices(tiny_llama, tmp_path):
    model = kvemb_st.from_base(tiny_llama, layers="1-2", sides={"document": {"template": 'Passage: "{text}" means:"'}})
    sampling = Sampling(max_examples=12, seed=3)
    loaded = load_tasks(["BIOSSES", "SciFact"], DATA, sampling)
    corpus = loaded[1][0].dataset["default"]["test"]["corpus"]
    assert len(loaded[0][0].dataset["test"]) == 12 and len(corpus) >= 12  # relevant documents always kept
    summary = run_tasks(model, loaded, tmp_path, sampling=sampling, show_progress_bar=False)
    assert set(summary.scores) == {"BIOSSES", "SciFact"} and all(math.isfinite(s) for s in summary.scores.values())
    # mteb's layout, in an experiment folder of its own: a slice is never mistaken for the whole task
    folder = tmp_path / "results" / summary.model.replace("/", "__") / summary.revision / "experiments"
    folder = folder / "max_examples_12__seed_3"
    assert summary.folder == folder
    for name, score in summary.scores.items():
        on_disk = mteb.TaskResult.from_disk(folder / f"{name}.json").get_score()
        assert on_disk == pytest.approx(score, abs=1e-6)  # mteb rounds on disk
    assert json.loads((folder / "model_meta.json").read_text())["revision"] == summary.revision
    written = (folder / SUMMARY_FILE).read_text()
    assert str(DATA) not in written and json.loads(written)["sampling"]["max_examples"] == 12
    assert json.loads(written)["data"]["SciFact"]["source"] == DATA.resolve().name


def test_kvemb_eval_prints_the_table_and_writes_the_card(tiny_llama, tmp_path, capsys):
    folder = tmp_path / "kv-tiny"
    kvemb_st.from_base(tiny_llama, layers="1-2").save(str(folder))
    argv = ["eval", str(folder), "--tasks", "BIOSSES", "--data-dir", str(DATA), "--output", str(tmp_path / "out"), "--card"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "BIOSSES" in out and "cosine_spearman" in out and "model card:" in out
    (summary,) = (tmp_path / "out").rglob(SUMMARY_FILE)
    recorded = json.loads(summary.read_text())["command"]
    assert recorded == f"kvemb eval kv-tiny --tasks BIOSSES --data-dir {DATA.resolve().name} --card"  # no machine path
    from huggingface_hub import metadata_load

    (entry,) = [r for r in metadata_load(folder / "README.md")["model-index"][0]["results"]]
    assert entry["dataset"]["type"] == "mteb/biosses-sts" and entry["metrics"][0]["type"] == "cosine_spearman"
