"""Per-side settings: ``encode_document`` / ``encode_query`` read out their own way, checked against a plain
hand-written readout, and the settings survive both loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

import kvemb_st
from kvemb_st.config import ConfigError

TEXTS = ["A man is playing a guitar.", "Someone plays an instrument in the park today.", "Markets fell."]
DOC_TEMPLATE = 'This passage : "{text}" means in one word:"'
SIDES = {"document": {"template": DOC_TEMPLATE, "pool_layers": [1], "pool_span": "text", "pooling": "mean"}}


@pytest.fixture(scope="module")
def model(tiny_llama):
    return kvemb_st.from_base(tiny_llama, method="mean", sides=SIDES)


def hand_readout(folder: str, text: str, template: str, layer: int) -> np.ndarray:
    """Mean over the text's own characters' tokens of layer ``layer``'s output, one text alone, no padding."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    backbone = AutoModel.from_pretrained(folder).eval()
    prefix = template.split("{text}")[0]
    formatted = template.replace("{text}", text)
    encoded = tokenizer(formatted, return_offsets_mapping=True, return_tensors="pt")
    offsets = encoded.pop("offset_mapping")[0]
    inside = (offsets[:, 0] < len(prefix) + len(text)) & (offsets[:, 1] > len(prefix))
    with torch.no_grad():
        states = backbone(**encoded, output_hidden_states=True).hidden_states[layer + 1][0]
    vector = states[inside].double().mean(0)
    return (vector / vector.norm()).float().numpy()


def test_document_side_is_the_hand_written_readout(model, tiny_llama):
    got = model.encode_document(TEXTS)
    for text, vector in zip(TEXTS, got):
        np.testing.assert_allclose(vector, hand_readout(tiny_llama, text, DOC_TEMPLATE, 1), atol=2e-5)
    # the same layer with the template's tokens counted, or the final layer, or the default side: all different
    wrong = [kvemb_st.from_base(tiny_llama, method="mean", sides={"document": {**SIDES["document"], **change}})
             for change in ({"pool_span": "all"}, {"pool_layers": [2]})]  # fmt: skip
    for other in [*wrong, kvemb_st.from_base(tiny_llama, method="mean")]:
        assert not np.allclose(other.encode_document(TEXTS), got, atol=1e-3)


def test_a_side_is_chosen_by_task_or_by_its_prompt_and_plain_encode_keeps_the_top_level(model, tiny_llama):
    document = model.encode_document(TEXTS)
    np.testing.assert_array_equal(model.encode(TEXTS, prompt_name="document"), document)
    plain = kvemb_st.from_base(tiny_llama, method="mean")
    np.testing.assert_array_equal(model.encode(TEXTS), plain.encode(TEXTS))
    np.testing.assert_array_equal(model.encode_query(TEXTS), plain.encode(TEXTS))  # no query side: the top level
    assert model[0].prompts == {"document": DOC_TEMPLATE} and model.prompts["document"] == DOC_TEMPLATE
    # an extra prompt goes inside the side's template, before the text, and is not part of the text's span
    prefixed = model.encode_document(TEXTS, prompt="Topic: ")
    assert not np.allclose(prefixed, document, atol=1e-3)
    with_prompt = DOC_TEMPLATE.replace("{text}", "Topic: {text}")
    np.testing.assert_allclose(prefixed[0], hand_readout(tiny_llama, TEXTS[0], with_prompt, 1), atol=2e-5)


def test_sides_round_trip_through_both_loaders(model, tmp_path):
    model.save(str(tmp_path))
    saved = json.loads((tmp_path / "kvemb_config.json").read_text())
    assert saved["sides"] == {"document": {"template": DOC_TEMPLATE, "pool_layers": [1], "pool_span": "text",
                                           "pooling": "mean"}}  # fmt: skip
    assert json.loads((tmp_path / "config_sentence_transformers.json").read_text())["prompts"]["document"] == DOC_TEMPLATE
    for loaded in (SentenceTransformer(str(tmp_path), trust_remote_code=True), kvemb_st.load(str(tmp_path))):
        np.testing.assert_array_equal(loaded.encode_document(TEXTS), model.encode_document(TEXTS))
        np.testing.assert_array_equal(loaded.encode(TEXTS, prompt_name="document"), model.encode_document(TEXTS))
        np.testing.assert_array_equal(loaded.encode(TEXTS), model.encode(TEXTS))


@pytest.mark.parametrize(
    ("sides", "message"),
    [
        ({"passage": {"pooling": "mean"}}, "unknown side 'passage'"),
        ({"document": {"pool_layer": 1}}, "sides.document': unknown key"),
        ({"document": {}}, "non-empty object"),
        ({"document": {"pool_layers": [9]}}, "sides.document.pool_layers.*out of range"),
        ({"document": {"pool_span": "words"}}, "sides.document.pool_span"),
        ({"document": {"last_weight": -1}}, "sides.document.last_weight"),
        ({"document": {"template": "no placeholder"}}, "sides.document.template"),
        ({"query": {"layers": [1]}}, "unknown key"),
    ],
)
def test_bad_sides_in_a_saved_config_name_the_file_and_the_key(model, tmp_path, sides, message):
    model.save(str(tmp_path))
    path = tmp_path / "kvemb_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "sides": sides}))
    with pytest.raises(ConfigError, match=message) as err:
        kvemb_st.load(str(tmp_path))
    assert "kvemb_config.json" in str(err.value)
