"""The long-documents experiment scores chunk combinations from the module's own chunk rows: combined ``before`` the
post-processing it equals what a saved model with ``long_inputs="chunk"`` returns; ``after`` it equals the
combination written plainly here (each row post-processed, the unit vectors averaged)."""

from __future__ import annotations

import numpy as np
import pytest

import kvemb_st
from kvemb_st.postprocessing_fit import add_postprocessing
from kvemb_st.side_router import route_of

from kvemb_lab.long_documents import chunk_rows, with_setting

SIDES = {"query": {"template": "Query: {text}\nIn one word:"},
         "document": {"template": "Passage: {text}\nIn one word:", "pooling": "mean+last", "pool_span": "text"}}  # fmt: skip
SENTENCES = ["The river rose in the night.", "Farmers moved their cattle uphill!", "Nobody expected the rain to last?",
             "By morning the bridge was closed.", "Schools stayed shut for a week.", "The army brought sandbags."]  # fmt: skip
TEXTS = [" ".join(SENTENCES * 3), "A short one.", " ".join(reversed(SENTENCES * 2)), "Another short text here."]
BUDGET = 40


@pytest.fixture(scope="module")
def folder(tiny_llama, tmp_path_factory):
    model = kvemb_st.from_base(tiny_llama, layers="2-3", sides=SIDES, max_seq_length=BUDGET)
    calibration = [f"Calibration sentence {i} about {w}." for i, w in enumerate(["rain", "tea", "chess", "trains"] * 6)]
    add_postprocessing(model, calibration, "whiten", document_texts=calibration, document_statistics=True)
    path = tmp_path_factory.mktemp("long") / "truncate"
    model.save(str(path))
    return path


@pytest.mark.parametrize("weighting", ["equal", "tokens"])
def test_combined_before_post_processing_is_what_the_chunking_model_returns(folder, tmp_path, weighting):
    chunked = kvemb_st.load(str(with_setting(folder, tmp_path / "chunk", "document", long_inputs="chunk",
                                                  chunk_weights=weighting)))  # fmt: skip
    rows = chunk_rows(chunked, TEXTS, batch_size=3)  # batches split the texts differently than encode does
    assert rows.long == 2 and len(rows.vectors) > len(TEXTS)
    post = route_of(chunked[1], "document")
    expected = chunked.encode_document(TEXTS, batch_size=2, convert_to_numpy=True)
    np.testing.assert_allclose(rows.combine(weighting, post, "before"), expected, atol=2e-5)
    truncating = kvemb_st.load(str(folder)).encode_document(TEXTS, batch_size=2, convert_to_numpy=True)
    assert not np.allclose(truncating[0], expected[0], atol=1e-3)  # the long text reads past the budget
    np.testing.assert_allclose(truncating[1], expected[1], atol=2e-5)  # a text that fits is one row either way


def test_combined_after_post_processing_averages_the_post_processed_rows(folder, tmp_path):
    chunked = kvemb_st.load(str(with_setting(folder, tmp_path / "chunk", "document", long_inputs="chunk")))
    rows = chunk_rows(chunked, TEXTS)
    post = route_of(chunked[1], "document")
    got = rows.combine("tokens", post, "after")
    owners, weights, vectors = np.array(rows.plan.owners), np.array(rows.plan.weights), rows.vectors.numpy()
    for i in range(len(TEXTS)):
        mine = np.flatnonzero(owners == i)
        each = post.transform(vectors[mine])  # unit rows, post-processed and re-normalised
        mean = (each * weights[mine, None]).sum(0)
        np.testing.assert_allclose(got[i], mean / np.linalg.norm(mean), atol=1e-5)
    assert not np.allclose(got[0], rows.combine("tokens", post, "before")[0], atol=1e-3)
