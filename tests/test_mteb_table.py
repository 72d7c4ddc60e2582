"""The MTEB table runner (lab/kvemb_lab/mteb_table.py): cached raw vectors, whitening from them, the aggregation.

Needs the team's data folder ``shared/mteb`` (beside the repository, or ``KVEMB_MTEB_DATA``) for the runs; skipped
without it. A tiny random model and 12-example slices of BIOSSES (STS: the default side) and SciFact (retrieval:
the query and document sides). Budget: ~1 min.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import kvemb_st
from kvemb_st.benchmark.local_tasks import Sampling
from kvemb_st.benchmark.run import load_tasks, run_tasks
from kvemb_st.build import build
from kvemb_st.module import KVEmbedding

mteb = pytest.importorskip("mteb")
table_module = pytest.importorskip("kvemb_lab.mteb_table", reason="the lab package is not installed (pip install -e ./lab)")
TablePlan, fit_build_whitening, render_markdown, run_table, type_means = (
    table_module.TablePlan, table_module.fit_build_whitening, table_module.render_markdown, table_module.run_table,
    table_module.type_means,
)  # fmt: skip

DATA = Path(os.environ.get("KVEMB_MTEB_DATA") or Path(__file__).resolve().parents[2] / "shared" / "mteb")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no offline MTEB data at {DATA} (the team's shared/mteb)")
CARD = "---\nlibrary_name: sentence-transformers\n---\n"  # identity.py reads a card's metadata: it needs a header
SLICE = Sampling(max_examples=12, seed=3)
TASKS = ("BIOSSES", "SciFact")


@pytest.fixture(scope="module")
def kv_folder(tiny_llama, tmp_path_factory):
    """A default build (its sides, its whitening with document statistics) of the tiny model."""
    folder = tmp_path_factory.mktemp("build") / "tiny-kvemb"
    with pytest.MonkeyPatch.context() as patch:  # the card plays no part here (and its template is the install's)
        patch.setattr("kvemb_st.build.render_model_card", lambda *args, **kwargs: CARD)
        build(tiny_llama, folder, layers="1-2", cache_dir=folder.parent, progress=False)
    return folder


def plan(tiny_llama, kv_folder, output, cache_dir) -> TablePlan:
    return TablePlan(
        backbone="tiny", base_folder=Path(tiny_llama), kv_folder=kv_folder, data_dir=DATA, output=output,
        cache_dir=cache_dir, command="test", methods=("kv", "mean", "last"), tasks=TASKS, sampling=SLICE,
    )  # fmt: skip


@pytest.fixture
def forward_calls(monkeypatch):
    calls = []
    forward = KVEmbedding.forward

    def counted(self, features, *args, **kwargs):
        calls.append(len(features["input_ids"]))
        return forward(self, features, *args, **kwargs)

    monkeypatch.setattr(KVEmbedding, "forward", counted)
    return calls


def direct_scores(model) -> dict[str, float]:
    """The model run by mteb as a user runs it: no cache, its own pipeline (post-processing in the forward pass)."""
    return run_tasks(model, load_tasks(TASKS, DATA, SLICE), None, sampling=SLICE, show_progress_bar=False).scores


@needs_data
def test_rows_from_cached_raw_vectors_equal_the_models_run_directly_and_a_rerun_embeds_nothing(
    tiny_llama, kv_folder, tmp_path, forward_calls
):
    first = run_table(plan(tiny_llama, kv_folder, tmp_path / "a", tmp_path / "cache"), log=lambda line: None)
    assert set(first.rows) == {"kv", "kv_whiten", "mean", "mean_whiten", "last", "last_whiten"}
    assert sum(first.rows["last"]["embedded"].values()) == 0  # read out of mean's forward pass (one plain forward)
    assert {record["command"] for record in first.rows.values()} == {"test"}  # each row names the run that wrote it
    assert forward_calls  # the first run embedded
    rows = {row: record["scores"] for row, record in first.rows.items()}

    # the whitened rows, from cached raw vectors + PostProcessing per side, are the whitened models' own scores
    built = kvemb_st.load(str(kv_folder))  # the folder as is: its own whitening inside the pipeline
    mean = fit_build_whitening(kvemb_st.from_base(tiny_llama, method="mean"))
    unwhitened = kvemb_st.load(str(kv_folder))
    del unwhitened[-1]
    last = fit_build_whitening(kvemb_st.from_base(tiny_llama, method="last"))
    for row, model in (("kv_whiten", built), ("mean_whiten", mean), ("kv", unwhitened), ("last_whiten", last)):
        assert rows[row] == pytest.approx(direct_scores(model), abs=1e-6), row
    assert rows["kv_whiten"] != pytest.approx(rows["kv"], abs=1e-3)  # whitening did change the scores
    assert first.rows["kv_whiten"]["revision"] == built.model_card_data.base_model_revision
    assert first.rows["kv_whiten"]["recipe"] == table_module.row_recipe("kv", built, "unused")
    # a baseline's whitened row is resumed by its raw model (its whitening is refitted by every run)
    mean, whitened = first.rows["mean"], first.rows["mean_whiten"]
    assert whitened["recipe"] == mean["revision"] != whitened["revision"]

    # a second run (fresh output, same cache): every text comes from the cache, the scores are the same
    forward_calls.clear()
    second = run_table(plan(tiny_llama, kv_folder, tmp_path / "b", tmp_path / "cache"), log=lambda line: None)
    assert forward_calls == []
    assert {row: record["scores"] for row, record in second.rows.items()} == rows
    assert all(sum(record["embedded"].values()) == 0 for record in second.rows.values())

    # the same command again resumes: finished tasks are kept, none is run again
    written = json.loads((tmp_path / "b" / "table.json").read_text(encoding="utf-8"))
    again = run_table(plan(tiny_llama, kv_folder, tmp_path / "b", tmp_path / "cache"), log=lambda line: None)
    assert again.rows == written["rows"]
    # every task of the table is a column, also those this run did not measure: a type's mean waits for all of its
    # tasks (SciFact is the only retrieval task; BIOSSES is one STS task of eight)
    assert len(written["task_types"]) == 14 and {"BIOSSES", "SciFact", "ImdbClassification"} <= set(written["task_types"])
    assert written["means"]["kv"] == {"STS": None, "Retrieval": rows["kv"]["SciFact"], "Classification": None,
                                      "overall": None}
    # mteb's own result files per row, and the merged summary names every task
    summaries = sorted((tmp_path / "b" / "kv_whiten").rglob("kvemb_summary.json"))
    assert len(summaries) == 1 and set(json.loads(summaries[0].read_text())["scores"]) == set(TASKS)
    assert {p.name for p in summaries[0].parent.glob("*.json")} >= {"BIOSSES.json", "SciFact.json"}
    assert "/work" not in json.dumps(written) and "/tmp" not in json.dumps(written)  # names, never machine paths


def test_the_cache_keeps_each_side_apart(tiny_llama, tmp_path):
    """The same texts through the default, query and document sides: each side's own vectors, cached or not."""
    from kvemb_lab.vector_cache import CachedEncode

    sides = {"query": {"template": 'Query: "{text}" means in one word:"'}, "document": {"template": '"{text}" means:"'}}
    texts = ["a cat sat on the mat", "stock prices fell sharply", "a cat sat on the mat"]
    reference = kvemb_st.from_base(tiny_llama, layers="1-2", sides=sides)
    cached = kvemb_st.from_base(tiny_llama, layers="1-2", sides=sides)
    encode = CachedEncode(cached, tmp_path)
    for _ in range(2):  # the second round reads every vector from the cache
        for call in ("encode", "encode_query", "encode_document"):
            assert getattr(cached, call)(texts) == pytest.approx(getattr(reference, call)(texts), abs=1e-5), call
    assert (encode.counts.embedded, encode.counts.cached) == (6, 3 + 9)  # 2 unique texts x 3 sides; then all cached
    with pytest.raises(ValueError, match="does not support precision='int8'"):
        cached.encode(texts, precision="int8")


def test_type_means_and_the_markdown_table():
    types = {"STS12": "STS", "STS13": "STS", "SciFact": "Retrieval", "Banking77Classification": "Classification",
             "EmotionClassification": "Classification"}  # fmt: skip
    scores = {"STS12": 0.5, "STS13": 0.7, "SciFact": 0.2, "Banking77Classification": 0.6, "EmotionClassification": 0.4}
    assert type_means(scores, types) == pytest.approx(
        {"STS": 0.6, "Retrieval": 0.2, "Classification": 0.5, "overall": 0.48}
    )
    partial = type_means({k: v for k, v in scores.items() if k != "STS13"}, types)
    assert partial["STS"] is None and partial["overall"] is None and partial["Retrieval"] == pytest.approx(0.2)
    data = {
        "backbone": "tiny", "splits": "test", "command": "cmd", "sampling": {"max_examples": 1000, "seed": 0},
        "task_types": types, "rows": {"kv": {"scores": scores, "seconds": {"STS12": 2.0}, "embedded": {"STS12": 5}}},
        "means": {"kv": type_means(scores, types)}, "provenance": {"commit": "abc"},
    }  # fmt: skip
    text = render_markdown(data)
    assert "| kv | 0.5000 | 0.7000 | 0.2000 | 0.6000 | 0.4000 | 0.6000 | 0.2000 | 0.5000 | 0.4800 |" in text
    assert "| row | STS12 | STS13* | SciFact* | Banking77 | Emotion | STS | Retrieval | Classification | overall |" in text
    assert "*: held out, never chosen on" in text
    dev = render_markdown(data | {"splits": "dev"})  # on the dev splits nothing is held out
    assert "| row | STS12 | STS13 | SciFact | Banking77 | Emotion |" in dev and "held out" not in dev


def test_two_runs_of_one_table_keep_each_others_rows(tmp_path):
    """Two candidate builds scored at once into one table: each task recorded re-reads the rows the other wrote."""
    Table = table_module.Table
    args = ("tiny", tmp_path, tmp_path, tmp_path, tmp_path / "out", tmp_path, "cmd")
    first = Table(TablePlan(*args, tasks=TASKS, kv_row="kv_a"))
    second = Table(TablePlan(*args, tasks=TASKS, kv_row="kv_b"))
    first.record("kv_a", "a", "r1", "BIOSSES", 0.5, 1.0, 3)
    second.record("kv_b", "b", "r2", "BIOSSES", 0.6, 1.0, 3)
    first.record("kv_a", "a", "r1", "SciFact", 0.2, 1.0, 3)  # started before kv_b existed; must not drop it
    rows = json.loads(first.json_path.read_text(encoding="utf-8"))["rows"]
    assert rows["kv_a"]["scores"] == {"BIOSSES": 0.5, "SciFact": 0.2} and rows["kv_b"]["scores"] == {"BIOSSES": 0.6}
    assert sorted(path.name for path in first.json_path.parent.iterdir()) == ["table.json", "table.md"]


def test_a_plan_refuses_a_held_out_task_on_dev_splits(tmp_path):
    with pytest.raises(ValueError, match=r"STS13.*dev tasks"):
        TablePlan("tiny", tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, "cmd", tasks=("STS13",), splits="dev")


@needs_data
def test_dev_plans_score_the_validation_splits_where_rule_md_says(tmp_path):
    dev = TablePlan("tiny", tmp_path, tmp_path, DATA, tmp_path / "out", tmp_path, "cmd", splits="dev")
    assert dev.tasks == ("STSBenchmark", "STS12", "SICK-R", "Banking77Classification", "EmotionClassification")
    assert dev.mode == "table_dev" and dev.row_dir("kv") == tmp_path / "out" / "dev" / "kv"
    splits = {name: list(dev.load_task(name)[0].eval_splits) for name in ("STSBenchmark", "EmotionClassification", "STS12")}
    assert splits == {"STSBenchmark": ["validation"], "EmotionClassification": ["validation"], "STS12": ["test"]}


def test_a_candidate_builds_rows_carry_its_name_and_bad_names_are_refused(tmp_path):
    from kvemb_lab.mteb_table import row_of

    args = ("tiny", tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, "cmd")
    candidate = TablePlan(*args, kv_row="kv_bias1", splits="dev")
    assert [row_of(candidate, m, p) for m in ("kv", "mean") for p in ("none", "whiten")] == [
        "kv_bias1", "kv_bias1_whiten", "mean", "mean_whiten"
    ]  # fmt: skip
    for bad in ("bias1", "kv_whiten", "kv_none", "kv-bias", "mean"):
        with pytest.raises(ValueError, match="kv_row"):
            TablePlan(*args, kv_row=bad)


def test_two_folders_with_the_same_raw_model_share_one_cache_file(tiny_llama, tmp_path):
    """The raw model's content revision is the cache's key: a build that differs only in its post-processing (or
    its folder name) reads the vectors another already embedded; another knob gets a file of its own."""
    from kvemb_lab.vector_cache import CachedEncode

    first, renamed, other = (kvemb_st.from_base(tiny_llama, layers=layers) for layers in ("1-2", "1-2", "1"))
    renamed.model_card_data.model_name = "another-folder"
    texts = ["a cat sat on the mat", "stock prices fell sharply"]
    first_cache = CachedEncode(first, tmp_path)
    first.encode(texts)
    shared = CachedEncode(renamed, tmp_path)
    renamed.encode(texts)
    assert shared.cache.path == first_cache.cache.path and shared.counts.embedded == 0
    assert CachedEncode(other, tmp_path).cache.path != first_cache.cache.path


def test_a_row_filled_over_two_commits_names_the_commit_behind_each_score(tmp_path):
    """A table's ``provenance`` is its last run's; each score keeps the commit that measured it."""
    Table = table_module.Table
    plan = TablePlan("tiny", tmp_path, tmp_path, tmp_path, tmp_path / "out", tmp_path, "cmd", tasks=TASKS)
    Table(plan, provenance={"commit": "aaa111", "dirty": False}).record("kv", "m", "r1", "BIOSSES", 0.5, 1.0, 3)
    Table(plan, provenance={"commit": "bbb222", "dirty": True}).record("kv", "m", "r1", "SciFact", 0.2, 1.0, 3)
    data = json.loads(Table(plan).json_path.read_text(encoding="utf-8"))
    assert data["rows"]["kv"]["commits"] == {"BIOSSES": "aaa111", "SciFact": "bbb222+dirty"}
    assert data["provenance"]["commit"] == "bbb222"  # the table's own: the last run's
    assert "| kv | m | r1 | 2 | 6 | aaa111, bbb222+dirty |" in render_markdown(data)


def test_a_baseline_whitened_on_another_machine_resumes_and_a_rebuilt_kv_folder_does_not(tmp_path):
    """The statistics of a refitted whitening can differ in their last bits (another revision): a whitened baseline
    row keeps its scores, each with its own revision; a kv folder whose content changed starts its row again."""
    Table = table_module.Table
    plan = TablePlan("tiny", tmp_path, tmp_path, tmp_path, tmp_path / "out", tmp_path, "cmd", tasks=TASKS)
    before = {"echo": {"model": "m", "revision": "raw1", "scores": {"BIOSSES": 0.4}},  # written before recipes
              "echo_whiten": {"model": "m", "revision": "wh1", "scores": {"BIOSSES": 0.5}},
              "kv_whiten": {"model": "k", "revision": "kv1", "scores": {"BIOSSES": 0.6}}}  # fmt: skip
    plan.output.mkdir()
    (plan.output / "table.json").write_text(json.dumps({"splits": "test", "sampling": plan.sampling.record(),
                                                        "rows": before}))  # fmt: skip
    table = Table(plan)
    table.resume()
    assert table.rows["echo_whiten"]["recipe"] == "raw1" and table.rows["kv_whiten"]["recipe"] == "kv1"
    recipe = table_module.row_recipe("echo", None, "raw1")  # the whitened row of a baseline: its raw revision
    assert table.done("echo_whiten", recipe, "BIOSSES") and not table.done("echo_whiten", recipe, "SciFact")
    table.record("echo_whiten", "m", "wh2", "SciFact", 0.3, 1.0, 3, recipe)
    table.record("kv_whiten", "k", "kv2", "SciFact", 0.2, 1.0, 3, "kv-another-build")
    rows = json.loads(table.json_path.read_text(encoding="utf-8"))["rows"]
    assert rows["echo_whiten"]["scores"] == {"BIOSSES": 0.5, "SciFact": 0.3}
    assert rows["echo_whiten"]["revisions"] == {"BIOSSES": "wh1", "SciFact": "wh2"}
    assert rows["kv_whiten"]["scores"] == {"SciFact": 0.2} and rows["kv_whiten"]["revisions"] == {"SciFact": "kv2"}
    assert "| echo_whiten | m | wh1, wh2 |" in table.json_path.with_suffix(".md").read_text(encoding="utf-8")


def test_a_kv_rows_recipe_ignores_the_bits_a_build_measures_but_never_a_knob(kv_folder):
    """The same build made on another machine: another ID curve and statistics in their last bits (another
    revision), one recipe; another knob, another recipe."""
    from dataclasses import replace

    from kvemb_st.benchmark.identity import content_revision

    built, again, raw, other = (kvemb_st.load(str(kv_folder)) for _ in range(4))
    selection = again[0].config.layer_selection
    selection["id_curve"] = [value * (1 + 1e-9) for value in selection["id_curve"]]
    selection["spread"] *= 1 + 1e-9
    for tensor in again[-1].state_dict().values():
        tensor.mul_(1 + 1e-6)
    assert content_revision(again) != content_revision(built)
    recipe = table_module.row_recipe
    del raw[-1]  # the unwhitened row
    assert recipe("kv", again, "r") == recipe("kv", built, "r") != recipe("kv", raw, "r")
    again[0].config = replace(again[0].config, prefix_bias=again[0].config.prefix_bias + 1)
    next(m for m in other[-1].modules() if isinstance(m, table_module.PostProcessing)).calibration = {"hash": "x"}
    assert len({recipe("kv", model, "r") for model in (built, again, other)}) == 3  # a knob, a calibration set
    assert recipe("echo", built, "r") == "r"  # a baseline: its raw revision
