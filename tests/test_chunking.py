"""Long inputs: with ``long_inputs="chunk"`` every token of a text reaches its vector (chunks that fit, embedded in
one batch, combined per text); with ``"truncate"`` the warning counts what was cut. References are computed
plainly here: each chunk embedded alone and averaged by hand."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

import kvemb_st
from kvemb_st.chunking import sentence_spans, split_long_texts
from kvemb_st.postprocessing_fit import add_postprocessing
from kvemb_st.config import ECHO_TEMPLATE, PROMPTEOL_TEMPLATE, ConfigError, KVEmbeddingConfig
from kvemb_st import model_card
from kvemb_st.template import Template

BUDGET = 48
SIDES = {"document": {"long_inputs": "chunk"}, "query": {"long_inputs": "chunk", "chunk_weights": "tokens"}}
SHORT = ["A man plays a guitar.", "Markets fell.", ""]


def long_text(last: str = "The very last sentence is about a red kite.", sentences: int = 30) -> str:
    return " ".join(f"Sentence {i} says that the {i}th bird sang early!" for i in range(sentences)) + " " + last


@pytest.fixture(scope="module")
def model(tiny_llama):
    """Plain ``encode`` truncates; ``encode_document`` chunks (equal weights), ``encode_query`` chunks by tokens."""
    return kvemb_st.from_base(tiny_llama, layers=[1, 2], max_seq_length=BUDGET, sides=SIDES)


def tokens(model, text: str) -> int:
    return len(model[0].tokenizer(PROMPTEOL_TEMPLATE.replace("{text}", text))["input_ids"])


def chunks_of(model, text: str) -> list[str]:
    rows, _ = split_long_texts([text], Template.parse(PROMPTEOL_TEMPLATE), model[0].tokenizer, BUDGET)
    return rows


def test_changing_the_last_sentence_changes_the_vector_with_chunk_only(model):
    text, changed = long_text(), long_text("Completely different words close this one, about taxes.")
    assert tokens(model, text) > 5 * BUDGET
    truncated = model.encode([text, changed])
    np.testing.assert_array_equal(truncated[0], truncated[1])  # the end is lost: the silent loss chunking fixes
    chunked = model.encode_document([text, changed])
    assert not np.allclose(chunked[0], chunked[1], atol=1e-4)


def test_text_within_budget_gives_the_identical_vector(model):
    assert all(tokens(model, text) <= BUDGET for text in SHORT)
    np.testing.assert_array_equal(model.encode_document(SHORT), model.encode(SHORT))
    np.testing.assert_array_equal(model.encode_query(SHORT), model.encode(SHORT))


@pytest.mark.parametrize(("encode", "weighted"), [("encode_document", False), ("encode_query", True)])
def test_vector_is_the_mean_of_its_chunks_embedded_alone(model, encode, weighted):
    text = long_text()
    pieces = chunks_of(model, text)
    assert len(pieces) >= 5
    alone = model.encode(pieces)  # each chunk fits: plain encode embeds it whole
    overhead = tokens(model, "")
    weights = np.array([tokens(model, piece) - overhead if weighted else 1 for piece in pieces], dtype=np.float32)
    reference = (alone * weights[:, None]).sum(0)
    reference /= np.linalg.norm(reference)
    np.testing.assert_allclose(getattr(model, encode)([text])[0], reference, atol=1e-5)


@pytest.fixture(scope="module")
def whitened(tiny_llama):
    """Documents chunked and combined after the whitening (by tokens), queries combined before it."""
    sides = {"document": {"long_inputs": "chunk", "chunk_weights": "tokens", "chunk_combine": "after"},
             "query": {"long_inputs": "chunk", "chunk_weights": "tokens"}}  # fmt: skip
    model = kvemb_st.from_base(tiny_llama, layers=[1, 2], max_seq_length=BUDGET, sides=sides)
    calibration = [f"Calibration {i}: the {w} was {v} today." for i, (w, v) in
                   enumerate((w, v) for w in ("kite", "river", "market", "train") for v in ("late", "calm", "new"))]  # fmt: skip
    return add_postprocessing(model, calibration * 2, "whiten")


def test_combined_after_post_processing_averages_each_chunk_post_processed(whitened, model):
    """The reference: each chunk embedded alone (it fits), whitened by the model's module, re-normalised, averaged
    by tokens; combining before the whitening (the query side) whitens the average instead."""
    text = long_text()
    pieces = chunks_of(whitened, text)
    raw = model.encode(pieces)  # the same forward and readout, no post-processing: each chunk's unit raw vector
    whitening = whitened[1]
    overhead = tokens(whitened, "")
    weights = np.array([tokens(whitened, piece) - overhead for piece in pieces], dtype=np.float64)[:, None]
    each = whitening.transform(raw)
    after = (each * weights).sum(0)
    before = (raw * weights).sum(0)
    before = whitening.transform((before / np.linalg.norm(before))[None])[0]
    np.testing.assert_allclose(whitened.encode_document([text])[0], after / np.linalg.norm(after), atol=1e-5)
    np.testing.assert_allclose(whitened.encode_query([text])[0], before, atol=1e-5)
    assert not np.allclose(after / np.linalg.norm(after), before, atol=1e-3)  # the two places differ here


def test_combined_after_without_post_processing_is_combined_before(tiny_llama):
    texts = [long_text(), SHORT[0]]
    vectors = {
        combine: kvemb_st.from_base(tiny_llama, layers=[1, 2], max_seq_length=BUDGET, long_inputs="chunk",
                                    chunk_combine=combine).encode(texts)
        for combine in ("before", "after")
    }  # fmt: skip
    np.testing.assert_allclose(vectors["after"], vectors["before"], atol=1e-6)


def test_combined_after_is_batch_invariant_and_round_trips(whitened, tmp_path):
    text = long_text()
    alone = whitened.encode_document([text])[0]
    mixed = whitened.encode_document([SHORT[0], text, long_text(sentences=12), *SHORT[1:]], batch_size=3)
    np.testing.assert_allclose(mixed[1], alone, atol=1e-5)
    np.testing.assert_allclose(mixed[[0, 3, 4]], whitened.encode_document(SHORT), atol=1e-5)
    whitened.save(str(tmp_path))
    for loaded in (kvemb_st.load(str(tmp_path)), SentenceTransformer(str(tmp_path), trust_remote_code=True)):
        assert loaded[0].config.side("document").chunk_combine == "after"
        np.testing.assert_allclose(loaded.encode_document([text])[0], alone, atol=1e-5)
        np.testing.assert_allclose(loaded.encode([text], prompt_name="document")[0], alone, atol=1e-5)


def test_batch_invariance(model):
    text = long_text()
    alone = model.encode_document([text])[0]
    mixed = model.encode_document([SHORT[0], text, long_text(sentences=12), *SHORT[1:]], batch_size=3)
    np.testing.assert_allclose(mixed[1], alone, atol=1e-5)
    np.testing.assert_allclose(mixed[[0, 3, 4]], model.encode(SHORT), atol=1e-5)


def test_token_embeddings_stay_one_entry_per_text(model):
    text = long_text()
    out = model.encode_document([SHORT[0], text], output_value="token_embeddings")
    pieces = chunks_of(model, text)
    assert len(out) == 2 and len(out[0]) == tokens(model, SHORT[0])
    assert len(out[1]) == sum(tokens(model, piece) for piece in pieces)


@pytest.mark.parametrize(
    "text",
    [
        long_text(),
        "word " * 400,  # one sentence far over the budget: split by tokens
        "数据" * 300,  # no spaces, no sentence ends
        "Line one\n\n  line two.\tThree?  " * 40,
        "   \n  " * 200,  # only whitespace: one empty chunk
    ],
    ids=["sentences", "one-long-sentence", "no-spaces", "line-breaks", "whitespace"],
)
@pytest.mark.parametrize("template", [PROMPTEOL_TEMPLATE, ECHO_TEMPLATE], ids=["prompteol", "echo"])
def test_chunks_fit_and_cover_the_text(model, text, template):
    tokenizer = model[0].tokenizer
    parsed = Template.parse(template, template.count("{text}"))
    rows, plan = split_long_texts(["short", text], parsed, tokenizer, BUDGET)
    assert rows[0] == "short" and plan.owners[0] == 0 and set(plan.owners[1:]) == {1}
    pieces = rows[1:]
    assert all(len(tokenizer(template.replace("{text}", piece))["input_ids"]) <= BUDGET for piece in pieces)
    assert "".join("".join(pieces).split()) == "".join(text.split())  # nothing but whitespace is left out
    position = 0
    for piece in pieces:  # in order, each a slice of the text
        position = text.index(piece, position) + len(piece)


def test_chunks_end_at_sentence_ends(model):
    assert all(piece.endswith(("!", ".")) for piece in chunks_of(model, long_text()))
    text = 'He said "Stop." Then (he left!) and\nthe rest. Dr. Who 3.5 ok'
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        'He said "Stop."', "Then (he left!)", "and", "the rest.", "Dr.", "Who 3.5 ok"
    ]


@pytest.mark.parametrize(
    ("knobs", "key"),
    [
        ({"long_inputs": "split"}, "'long_inputs'"),
        ({"chunk_weights": "mean"}, "'chunk_weights'"),
        ({"sides": {"document": {"long_inputs": True}}}, "'sides.document.long_inputs'"),
        ({"sides": {"query": {"chunk_weights": "length"}}}, "'sides.query.chunk_weights'"),
        ({"chunk_combine": "during"}, "'chunk_combine'"),
        ({"sides": {"document": {"chunk_combine": 1}}}, "'sides.document.chunk_combine'"),
    ],
)
def test_bad_values_are_clear_errors(knobs, key):
    with pytest.raises(ConfigError, match=f"{key}: must be one of"):
        KVEmbeddingConfig(base_model="some/model", method="mean", **knobs)
    with pytest.raises(ConfigError, match=f"kvemb_config.json: key {key}"):
        KVEmbeddingConfig.from_dict({"base_model": "some/model", "method": "mean", **knobs}, source="kvemb_config.json")


def test_round_trip_keeps_the_knobs_in_both_loaders(model, tmp_path):
    model.save(str(tmp_path))
    saved = json.loads((tmp_path / "kvemb_config.json").read_text())
    assert saved["long_inputs"] == "truncate" and saved["sides"] == SIDES
    texts = [long_text(), SHORT[0]]
    expected = model.encode_document(texts), model.encode_query(texts), model.encode(texts)
    for loaded in (kvemb_st.load(str(tmp_path)), SentenceTransformer(str(tmp_path), trust_remote_code=True)):
        assert loaded[0].config.sides == SIDES
        got = loaded.encode_document(texts), loaded.encode_query(texts), loaded.encode(texts)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_allclose(loaded.encode(texts, prompt_name="document"), expected[0], atol=1e-6)


def test_ray_embedder_chunks_as_encode_document(model, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pytest.importorskip("ray.data")
    from kvemb_st.ray import Embedder

    model.save(str(tmp_path))
    texts = [long_text(), *SHORT]
    out = Embedder(str(tmp_path), prompt_name="document", encode_batch_size=2)(pa.table({"text": texts}))
    vectors = np.stack(out.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(vectors, model.encode_document(texts), atol=1e-5)
    assert not np.allclose(vectors[0], model.encode(texts[:1])[0], atol=1e-4)  # chunked, not truncated


def test_model_card_says_what_happens_to_long_texts(monkeypatch):
    # this checkout's template: an editable install may map the data package kvemb_st.model_cards to another one
    template = Path(__file__).resolve().parent.parent / "model_cards" / "kvemb_model_card.md"
    monkeypatch.setattr(model_card, "TEMPLATE", template)
    config = KVEmbeddingConfig(base_model="some/model", method="mean", sides=SIDES)
    card = model_card.render_model_card(
        config, dimension=64, num_layers=4, model_id="me/model", command="kvemb build", has_plot=False
    )
    assert "a longer text is truncated" in card
    assert "`encode_document` side" in card and "averaged with equal weights" in card
    assert "averaged weighted by their tokens" in card and "post-processed first" not in card
    after = KVEmbeddingConfig(base_model="some/model", method="mean", sides={"document": {**SIDES["document"],
                                                                                            "chunk_combine": "after"}})  # fmt: skip
    card = model_card.render_model_card(
        after, dimension=64, num_layers=4, model_id="me/model", command="kvemb build", has_plot=False
    )
    assert "averaged with equal weights, each post-processed first" in card


def test_truncation_warning_counts_texts_and_tokens(tiny_llama, caplog):
    model = kvemb_st.from_base(tiny_llama, layers=[1], max_seq_length=32)
    texts = ["long text " * 50, "a longer text " * 80, "short"]
    full = [tokens(model, text) for text in texts]
    with caplog.at_level(logging.WARNING, logger="kvemb_st.module"):
        kept = model[0].preprocess(texts)["attention_mask"].sum(1).tolist()
        model.encode(texts)
        model.encode(["long text " * 50] * 5)  # 9 truncated texts so far: no new warning
        model.encode(["long text " * 50])  # the 10th: another
    dropped = sum(f - k for f, k in zip(full, kept) if f > 32)
    assert dropped > 100
    messages = [r.getMessage() for r in caplog.records if "exceed max_seq_length" in r.getMessage()]
    assert len(messages) == 2
    assert messages[0].startswith("2 text(s) in this batch") and f"{dropped} token(s) were cut" in messages[0]
    assert "10 text(s) and" in messages[1]
