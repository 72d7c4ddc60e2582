"""Which side each of mteb's calls uses, recorded where it arrives: the ``task`` the KVEmbedding module receives.

The rule through mteb 2.x (its SentenceTransformer wrapper): retrieval queries go through ``encode_query``
(``task="query"``: the query side), the corpus through ``encode_document`` (``task="document"``: the document
side); STS and classification call plain ``encode`` (no task: the top-level settings, the default side). A
model with a document side only (what ``kvemb build`` writes) embeds queries with the default side.
Budget: ~20 s (mteb's mock tasks, a tiny random model loaded three ways, no data files).
"""

from __future__ import annotations

import pytest
from sentence_transformers import SentenceTransformer

import kvemb_st

mteb = pytest.importorskip("mteb")  # optional extra (`kvemb-st[mteb]`, in the test extra)
from mteb.mocks import MockClassificationTask, MockRetrievalTask, MockSTSTask  # noqa: E402

QUERY = 'Query: "{text}" means in one word:"'
DOCUMENT = 'Passage: "{text}" means in one word:"'


def spy_sides(model, monkeypatch) -> list[tuple[str, str | None, str | None]]:
    """(text, task received, side used) for every text the model's KVEmbedding module preprocesses."""
    module, calls = model[0], []
    original = module.preprocess

    def preprocess(inputs, prompt=None, task=None, **kwargs):
        side = module.side_for(prompt, task)[0]
        side = side if side in module.config.sides else None  # a task without a side of its own reads out like encode
        calls.extend((text, task, side) for text in inputs)
        return original(inputs, prompt=prompt, task=task, **kwargs)

    monkeypatch.setattr(module, "preprocess", preprocess)
    return calls


def retrieval_texts(task) -> tuple[set[str], set[str]]:
    task.load_data()
    split = task.dataset["default"]["test"]
    corpus = {(f"{title} {text}").strip() for title, text in zip(split["corpus"]["title"], split["corpus"]["text"])}
    return set(split["queries"]["text"]), corpus


@pytest.fixture(scope="module", params=["from_base", "kvemb_st.load", "SentenceTransformer"])
def both_sides(request, tiny_llama, tmp_path_factory):
    """A model with a query and a document side, as each of the three ways a user gets one hands it to mteb."""
    sides = {"query": {"template": QUERY}, "document": {"template": DOCUMENT}}
    model = kvemb_st.from_base(tiny_llama, layers="1-2", sides=sides)
    if request.param == "from_base":
        return model
    folder = tmp_path_factory.mktemp("both-sides")
    model.save(str(folder))
    if request.param == "kvemb_st.load":
        return kvemb_st.load(str(folder))
    return SentenceTransformer(str(folder), trust_remote_code=True)


def test_retrieval_queries_use_the_query_side_and_the_corpus_the_document_side(both_sides, monkeypatch):
    calls = spy_sides(both_sides, monkeypatch)
    task = MockRetrievalTask()
    queries, corpus = retrieval_texts(task)
    mteb.evaluate(both_sides, task, cache=None, show_progress_bar=False)
    used = {text: (task_, side) for text, task_, side in calls}
    assert set(used) == queries | corpus and not queries & corpus
    assert {used[q] for q in queries} == {("query", "query")}
    assert {used[d] for d in corpus} == {("document", "document")}


@pytest.mark.parametrize("task", [MockSTSTask(), MockClassificationTask()], ids=["sts", "classification"])
def test_sts_and_classification_use_the_default_side(both_sides, monkeypatch, task):
    calls = spy_sides(both_sides, monkeypatch)
    mteb.evaluate(both_sides, task, cache=None, show_progress_bar=False)
    assert calls and {(task_, side) for _, task_, side in calls} == {(None, None)}


def test_a_model_with_a_document_side_only_embeds_queries_with_the_default_side(tiny_llama, monkeypatch):
    model = kvemb_st.from_base(tiny_llama, layers="1-2", sides={"document": {"template": DOCUMENT}})
    calls = spy_sides(model, monkeypatch)
    task = MockRetrievalTask()
    queries, corpus = retrieval_texts(task)
    mteb.evaluate(model, task, cache=None, show_progress_bar=False)
    used = {text: side for text, _, side in calls}
    assert {used[q] for q in queries} == {None} and {used[d] for d in corpus} == {"document"}


def test_mteb_raises_no_warning_about_the_model(both_sides, caplog):
    """mteb warns about a model it cannot describe (name, embedding parameters, prompts without a query/document
    pair, output dtypes): none of that for ours, given bare or through ``kvemb_st.mteb_model``. What is left is
    mteb's own internal noise (:data:`MTEB_INTERNAL_WARNINGS`), the same for every model."""
    import re
    import warnings

    from kvemb_st.benchmark import MTEB_INTERNAL_WARNINGS

    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", logger="mteb"):
        warnings.simplefilter("always")
        for model in (both_sides, kvemb_st.mteb_model(both_sides)):
            for task in (MockSTSTask(), MockRetrievalTask()):
                mteb.evaluate(model, task, cache=None, show_progress_bar=False)
    messages = [str(w.message) for w in caught]
    assert [m for m in messages if not any(re.search(internal, m) for internal in MTEB_INTERNAL_WARNINGS)] == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("mteb") and r.levelname != "INFO"] == []
