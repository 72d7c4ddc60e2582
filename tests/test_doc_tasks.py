"""Document task loaders, the passkey task, the general calibration set and the k-NN metric.

Budget: < 20 s (file reads, the real SmolLM2 tokenizer, no model).
"""

from __future__ import annotations

import io
import pickle
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

import kvemb_st
from kvemb_st.calibration import DEFAULT_CALIBRATION_FILE, calibration_hash, read_calibration_file

from kvemb_lab import make_calibration_set
from kvemb_lab.assets import load_sts_b
from kvemb_lab.calibration_sets import calibration_texts
from kvemb_lab.doc_tasks import (
    CITIES,
    build_passkey_task,
    clean_newsgroup_post,
    gensim_data_file,
    knn_accuracy,
    load_lee,
    load_newsgroup_retrieval,
    load_newsgroups,
    passkey_fillers,
)
from kvemb_lab.general_calibration import general_calibration_texts, split_sentences


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def fillers():
    return passkey_fillers()


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_lee_has_50_documents_and_every_pair_scored_once():
    task = load_lee()
    assert len(task.texts) == len(set(task.texts)) == 50
    assert len(task.pairs) == 50 * 49 // 2
    assert {(i, j) for i, j, _ in task.pairs} == {(i, j) for i in range(50) for j in range(i + 1, 50)}
    assert all(0.0 <= score <= 1.0 for _, _, score in task.pairs)
    assert task.text_pairs()[0] == (task.texts[0], task.texts[1], task.pairs[0][2])


def test_newsgroups_splits_are_disjoint_stratified_halves_without_headers():
    everything = load_newsgroups("all")
    dev, test = load_newsgroups("dev"), load_newsgroups("test")
    assert everything.label_names == ("alt.atheism", "sci.space")
    assert len(everything.texts) == 200 and sorted(set(everything.labels)) == [0, 1]
    assert len(dev.texts) == len(test.texts) == 100 and sum(dev.labels) == sum(test.labels) == 50
    assert sorted(dev.texts + test.texts) == sorted(everything.texts)
    assert not set(dev.texts) & set(test.texts)
    assert dev == load_newsgroups("dev") and dev != load_newsgroups("dev", seed=1)
    assert not any(t.startswith(("From:", "Newsgroups:")) or "Newsgroups: alt" in t for t in everything.texts)
    with pytest.raises(ValueError, match="split"):
        load_newsgroups("train")


def test_newsgroup_post_keeps_the_body_only():
    post = ("From: a@b.c\nNewsgroups: sci.space\nSubject: orbits\n\nIn article <1@x> b@c writes:\n> quoted line\n"
            "The shuttle  flies\nlow.\n\n--\nJohn, signature\n")
    assert clean_newsgroup_post(post) == "The shuttle flies low."


GENERAL_HASH = "sha256:4fbdb9c5529d1d3724fb1263fcab211941e483e94e2890faf269cc6657037819"  # as once shipped


def test_general_calibration_is_built_from_gensim_reproducibly_and_overlaps_no_evaluation_set(fillers):
    texts = calibration_texts("general")
    assert texts == general_calibration_texts() and calibration_hash(texts) == GENERAL_HASH  # same texts as before
    assert not (Path(kvemb_st.__file__).parent / "data" / "calibration_general.txt").exists()  # never shipped
    assert len(texts) == len(set(texts)) == 512
    assert sum(len(t.split()) > 40 for t in texts) >= 200 and sum(len(t.split()) < 40 for t in texts) >= 200
    sentences = {s for t in texts for s in split_sentences(t)}
    documents = [*load_lee().texts, *load_newsgroups("all").texts]
    assert not any(s in doc for doc in documents for s in sentences)
    evaluated = {s for split in ("dev", "test") for p in load_sts_b(split) for s in p[:2]} | set(fillers)
    assert not sentences & evaluated and not set(texts) & evaluated
    assert not set(read_calibration_file(DEFAULT_CALIBRATION_FILE)) & set(fillers)


@pytest.mark.parametrize("length", [64, 300])
def test_passkey_documents_have_the_exact_length_and_the_needle_at_the_stated_depth(tokenizer, fillers, length):
    task = build_passkey_task(tokenizer, length, n_docs=6, seed=3, fillers=fillers)
    assert task.length == length and len(task.documents) == 6
    for doc, needle, query, depth in zip(task.documents, task.needles, task.queries, task.depths):
        assert n_tokens(tokenizer, doc) == length
        assert doc.count(needle) == 1 and 0.0 <= depth < 1.0
        person = query.removeprefix("What is the pass key for ").removesuffix("?")
        assert needle.startswith(f"{person}'s pass key is ")
        before = doc[: doc.index(needle)].rstrip()
        assert abs(n_tokens(tokenizer, before) - depth * length) <= 1  # a space may merge into the needle's token
    sentences = [s for doc in task.documents for s in fillers if f" {s} " in f" {doc} "]
    assert len(sentences) == len(set(sentences))  # no filler repeats across documents of one task
    assert len(set(task.queries)) == 6
    retrieval = task.retrieval()
    assert all(retrieval.corpus[next(iter(retrieval.relevant[q]))] == task.documents[int(q[1:])] for q in retrieval.queries)


@pytest.mark.parametrize("length", [96, 300])
def test_needle_documents_hide_one_fact_and_ask_about_it_in_other_words(tokenizer, fillers, length):
    task = build_passkey_task(tokenizer, length, n_docs=5, seed=2, fillers=fillers, kind="needle")
    cities = []
    for doc, needle, query, depth in zip(task.documents, task.needles, task.queries, task.depths):
        assert n_tokens(tokenizer, doc) == length and doc.count(needle) == 1 and 0.0 <= depth < 1.0
        city = query.removeprefix("What is the best thing to do in ").removesuffix("?")
        assert needle.startswith(f"The best thing to do in {city} is to ") and city in CITIES
        assert sum(city in other for other in task.documents) == 1  # the city names one document only
        cities.append(city)
    assert len(set(cities)) == 5 and len({n.split(" is to ")[1] for n in task.needles}) == 5
    passkey = build_passkey_task(tokenizer, length, n_docs=5, seed=2, fillers=fillers)
    assert passkey.documents != task.documents  # kinds draw their own documents


def test_passkey_task_is_deterministic_in_its_seed(tokenizer, fillers):
    task = build_passkey_task(tokenizer, 128, n_docs=4, seed=0, fillers=fillers)
    assert task == build_passkey_task(tokenizer, 128, n_docs=4, seed=0, fillers=fillers)
    other = build_passkey_task(tokenizer, 128, n_docs=4, seed=1, fillers=fillers)
    assert other.documents != task.documents and other.depths != task.depths


def test_passkey_bad_arguments_are_clear_errors(tokenizer, fillers):
    with pytest.raises(ValueError, match="too short"):
        build_passkey_task(tokenizer, 16, n_docs=2, fillers=fillers)
    with pytest.raises(ValueError, match="n_docs"):
        build_passkey_task(tokenizer, 128, n_docs=1, fillers=fillers)
    with pytest.raises(ValueError, match="too few"):
        build_passkey_task(tokenizer, 512, n_docs=4, fillers=fillers[:20])
    with pytest.raises(ValueError, match="unknown needle kind 'haystack'"):
        build_passkey_task(tokenizer, 128, n_docs=2, fillers=fillers, kind="haystack")
    with pytest.raises(ValueError, match="n_docs must be between 2 and 24 for 'needle'"):
        build_passkey_task(tokenizer, 128, n_docs=25, fillers=fillers, kind="needle")


def test_knn_accuracy_matches_a_hand_computation():
    # 1-D angles on the unit circle: class 0 near 0 rad, class 1 near pi/2, point 4 (class 0) sits among class 1
    angles = np.array([0.0, 0.1, 0.2, 1.5, 1.45, 1.6])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1.0], [2.0], [1.0], [3.0], [1.0], [1.0]])
    labels = [0, 0, 0, 1, 0, 1]
    # k=1: nearest others -> 0:1, 1:0|2, 2:1, 3:4 (wrong), 4:3 (wrong), 5:3  => 4/6
    assert knn_accuracy(vectors, labels, k=1) == pytest.approx(4 / 6)
    # k=3: point 4's neighbours 3,5 (class 1) and 2 (class 0) -> 1, wrong; point 3: 4,5,2 -> 0 (wrong, 2 of 3);
    # point 5: 3,4,2 -> 0 (wrong); points 0-2 right => 3/6
    assert knn_accuracy(vectors, labels, k=3) == pytest.approx(3 / 6)
    # a 1-1 tie (k=2) goes to the label of the nearest neighbour: point 3 -> 4 (0) and 5 (1) -> 0, wrong
    assert knn_accuracy(vectors, labels, k=2) == pytest.approx(np.mean([1, 1, 1, 0, 0, 1]))
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(vectors, labels, k=6)
    with pytest.raises(ValueError, match="one label per"):
        knn_accuracy(vectors, labels[:-1])


def _raw_posts() -> list[str]:
    """The posts read straight from gensim's file, without the package's loader (only ``data`` is needed)."""
    class Loose(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("sklearn"):
                return dict
            return super().find_class(module.replace("numpy.core", "numpy._core").replace("__builtin__", "builtins")
                                      .replace("copy_reg", "copyreg"), name)  # fmt: skip

    bunch = Loose(io.BytesIO(zlib.decompress(gensim_data_file("mini_newsgroup").read_bytes())), encoding="latin1").load()
    return list(bunch["data"])


def test_retrieval_qrels_match_the_subject_lines_of_the_raw_file():
    posts = _raw_posts()
    subjects = []
    for post in posts:
        match = re.search(r"^Subject:(.*)$", post.split("\n\n")[0], re.MULTILINE)
        subject = match.group(1).strip() if match else ""
        while subject.lower().startswith("re:"):
            subject = subject[3:].strip()
        subjects.append(" ".join(subject.split()))
    whole = load_newsgroup_retrieval("all")
    by_text = {text: q for q, text in whole.queries.items()}
    expected = {}
    for i, (post, subject) in enumerate(zip(posts, subjects)):
        if subject and clean_newsgroup_post(post):
            expected.setdefault(subject, set()).add(f"d{i}")
    assert set(by_text) == set(expected) and len(expected) > 100
    for subject, docs in expected.items():
        assert whole.relevant[by_text[subject]] == docs
        assert all(whole.corpus[d] == clean_newsgroup_post(posts[int(d[1:])]) for d in docs)
    assert max(len(docs) for docs in expected.values()) >= 4  # some subjects have several posts
    dev, test = load_newsgroup_retrieval("dev"), load_newsgroup_retrieval("test")
    assert not set(dev.queries.values()) & set(test.queries.values())
    assert set(dev.queries.values()) | set(test.queries.values()) == set(expected)
    assert dev.corpus == test.corpus == whole.corpus
    assert not any(re.match(r"(?i)re:", q) for q in whole.queries.values())


def test_shipped_calibration_sets_are_the_scripts_output_from_sts_b_train_only():
    sentences = calibration_texts("sts-b-train")
    paragraphs = calibration_texts("sts-b-train-paragraphs")
    assert paragraphs == make_calibration_set.sts_b_train_paragraphs(set(sentences))  # reproducible, up to date
    assert len(paragraphs) == len(set(paragraphs)) == 256 and min(len(p.split()) for p in paragraphs) >= 15
    joined = "\n".join(paragraphs)
    evaluated = {t for split in ("dev", "test") for pair in load_sts_b(split) for t in pair[:2] if len(t.split()) >= 12}
    train = {t for pair in load_sts_b("train") for t in pair[:2]}
    assert not [t for t in evaluated - train if t in joined]
    documents = [*load_lee().texts, *load_newsgroups("all").texts]
    assert not set(paragraphs) & set(documents)
