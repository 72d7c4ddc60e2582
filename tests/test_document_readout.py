"""The default build's document readout (``mean+last``, weight 0.5, the text's own tokens, the compression template)
against a readout written plainly here, in a model whose top-level weight is another one (0.75).

The expected vectors come from one plain forward of the tiny backbone per text: nothing of kvemb_st computes them,
so a side that silently took the top-level weight (or span, or template) cannot sit on both sides of the
comparison. The method is ``prompteol`` (no re-routing), so the reference needs no attention of ours.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import kvemb_st
from kvemb_st.build import DEFAULT_SIDES

# The default build's document side as docs/results.md ("Documents") states it: spelled out, not read from the code.
COMPRESSION = "Context: {text}\nCompress the context in one word:"
DOCUMENT_WEIGHT, TOP_LEVEL_WEIGHT = 0.5, 0.75
# different lengths, so that a batch is padded; braces and a leading space test the text's span
TEXTS = ["A man is playing a guitar.", "Markets fell.", " Someone plays {an} instrument in the park today, loudly."]


@pytest.fixture(scope="module")
def backbone(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama), AutoModel.from_pretrained(tiny_llama).eval()


def hand_readout(backbone, text: str, template: str, last_weight: float, text_span: bool) -> np.ndarray:
    """One text alone, no padding: the final hidden states, the mean over the text's own tokens (those carrying
    any of its characters; all tokens if not ``text_span``), the last token, each normalised, mixed, normalised."""
    tokenizer, backbone = backbone
    prefix, suffix = template.split("{text}")
    encoded = tokenizer(prefix + text + suffix, return_offsets_mapping=True, return_tensors="pt")
    offsets = encoded.pop("offset_mapping")[0]
    inside = (offsets[:, 0] < len(prefix) + len(text)) & (offsets[:, 1] > len(prefix))
    assert 0 < int(inside.sum()) < len(offsets)  # the template's own tokens really are left out
    with torch.no_grad():
        states = backbone(**encoded).last_hidden_state[0].double()
    mean = states[inside].mean(0) if text_span else states.mean(0)
    last = states[-1]
    mixed = (1 - last_weight) * mean / mean.norm() + last_weight * last / last.norm()
    return (mixed / mixed.norm()).float().numpy()


@pytest.fixture(scope="module")
def document_side() -> dict:
    """The default build's own document side; the readout it must give is spelled out above, not taken from it."""
    side = dict(DEFAULT_SIDES["document"])
    readout = {key: side.get(key) for key in ("template", "pooling", "last_weight", "pool_span", "pool_layers")}
    assert readout == {"template": COMPRESSION, "pooling": "mean+last", "last_weight": DOCUMENT_WEIGHT,
                       "pool_span": "text", "pool_layers": None}  # fmt: skip
    return side


@pytest.fixture(scope="module")
def model(tiny_llama, document_side):
    return kvemb_st.from_base(
        tiny_llama, method="prompteol", pooling="mean+last", last_weight=TOP_LEVEL_WEIGHT,
        sides={"document": document_side, "query": document_side},
    )  # fmt: skip


@pytest.fixture(scope="module")
def expected(backbone) -> np.ndarray:
    return np.stack([hand_readout(backbone, text, COMPRESSION, DOCUMENT_WEIGHT, text_span=True) for text in TEXTS])


def test_document_and_query_sides_read_out_with_their_own_weight_not_the_top_level_one(model, expected, backbone):
    for got in (model.encode_document(TEXTS), model.encode_query(TEXTS), model.encode(TEXTS, prompt_name="document")):
        np.testing.assert_allclose(got, expected, atol=2e-5)
    # one text at a time (no padding) gives the same vectors
    np.testing.assert_allclose(np.concatenate([model.encode_document([t]) for t in TEXTS]), expected, atol=2e-5)
    # what the bug of reading the side with the top-level weight would give: far from the side's vectors
    top_weight = [hand_readout(backbone, text, COMPRESSION, TOP_LEVEL_WEIGHT, text_span=True) for text in TEXTS]
    assert np.abs(np.stack(top_weight) - expected).max() > 1e-2


def test_plain_encode_keeps_the_top_level_weight_template_and_span(model, backbone):
    template = 'This sentence : "{text}" means in one word:"'  # PromptEOL, the prompteol method's template
    want = [hand_readout(backbone, text, template, TOP_LEVEL_WEIGHT, text_span=False) for text in TEXTS]
    np.testing.assert_allclose(model.encode(TEXTS), np.stack(want), atol=2e-5)
