"""What encode does with odd inputs: a documented vector or a ValueError naming the item -- never NaN."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

import kvemb_st


@pytest.fixture(scope="module")
def model(tiny_llama):
    return kvemb_st.from_base(tiny_llama, layers=[1, 2])


def test_empty_and_whitespace_strings_get_the_template_only_vector(model):
    embeddings = model.encode(["", "   ", "\n\t", "text"])
    assert np.isfinite(embeddings).all()
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert abs(embeddings[0] - embeddings[1]).max() > 0  # whitespace is text, not stripped


@pytest.mark.parametrize(
    "bad,type_name",
    [(None, "NoneType"), (3, "int"), (2.5, "float"), ({"text": "x"}, "dict"), (b"bytes", "bytes"), (("a", "b"), "tuple")],
)
def test_non_string_item_names_its_index_and_type(model, bad, type_name):
    inputs = ["first", "a much longer second sentence", bad, "fourth"]
    with pytest.raises(ValueError, match=rf"position 2 in the inputs is {type_name} .*not str"):
        model.encode(inputs)


def test_plain_sentence_transformer_path_also_raises_value_error(model, tmp_path):
    model.save(str(tmp_path))
    plain = SentenceTransformer(str(tmp_path), trust_remote_code=True)
    with pytest.raises(ValueError, match="is NoneType .*not str"):
        plain.encode(["ok", None])


def test_empty_list_gives_empty_result_and_single_string_one_vector(model):
    assert model.encode([]).shape == (0,)
    single = model.encode("just one")
    assert single.shape == (64,)
    np.testing.assert_array_equal(single, model.encode(["just one"])[0])
