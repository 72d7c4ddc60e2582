"""Over-long inputs: the text is shortened, the template's instruction survives, and the user is told once."""

from __future__ import annotations

import logging

import pytest

import kvemb_st
from kvemb_st.config import PROMPTEOL_TEMPLATE

SUFFIX = PROMPTEOL_TEMPLATE.split("{text}")[1]


@pytest.fixture(scope="module")
def model(tiny_llama):
    return kvemb_st.from_base(tiny_llama, layers=[1, 2], max_seq_length=64)


def _decoded(model, text: str) -> tuple[str, int]:
    module = model[0]
    features = module.preprocess([text])
    return module.tokenizer.decode(features["input_ids"][0]), int(features["attention_mask"].sum())


@pytest.mark.parametrize("words", [100, 1000, 5000])
def test_text_is_truncated_and_instruction_kept(model, words):
    text = " ".join(f"w{i}" for i in range(words))
    decoded, length = _decoded(model, text)
    assert length <= 64
    assert decoded.startswith('This sentence : "w0 w1') and decoded.endswith(SUFFIX)
    assert f"w{words - 1}" not in decoded


def test_text_with_braces_and_template_like_content_is_kept_verbatim(model):
    text = 'a {text} and {0} "quoted" }{'
    decoded, _ = _decoded(model, text)
    assert decoded == PROMPTEOL_TEMPLATE.replace("{text}", text)


def test_truncation_warning_is_shown_once(tiny_llama, caplog):
    model = kvemb_st.from_base(tiny_llama, layers=[1], max_seq_length=32)
    with caplog.at_level(logging.WARNING, logger="kvemb_st.module"):
        model.encode(["long text " * 100, "short"])
        model.encode(["another long text " * 100])
    warnings = [r for r in caplog.records if "exceed max_seq_length" in r.getMessage()]
    assert len(warnings) == 1 and "instruction kept whole" in warnings[0].getMessage()


def test_4096_token_inputs_embed_in_full(tiny_llama):
    model = kvemb_st.from_base(tiny_llama, layers=[1, 3], max_seq_length=4096)
    text = " ".join(f"w{i}" for i in range(1700))  # ~3,400 tokens: fits, no truncation
    features = model[0].preprocess([text])
    assert 3000 < features["input_ids"].shape[1] <= 4096
    embedding = model.encode([text])
    assert embedding.shape == (1, 64) and (embedding == embedding).all()


def test_template_longer_than_max_seq_length_is_a_clear_error(tiny_llama):
    model = kvemb_st.from_base(tiny_llama, layers=[1], max_seq_length=8, template="word " * 20 + "{text}")
    with pytest.raises(ValueError, match="template alone takes .* max_seq_length=8"):
        model.encode(["some text that is long enough to need truncation " * 3])
