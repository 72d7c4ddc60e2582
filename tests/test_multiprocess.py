"""A saved KV-Embedding model in ST's multi-process pool, and loaded with a dtype / device_map.

The pool spawns fresh interpreters that unpickle the model: the re-routing attention must be registered
there by the import of ``kvemb_st`` alone. Budget: < 60 s for this file. A single pool of two CPU workers
serves every pool call, since each worker's fresh import of torch/transformers/ST is the bulk of the cost;
``encode(texts, device=[...])`` starts that very same pool internally.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import sentence_transformers.base.model as st_model
from sentence_transformers import SentenceTransformer

import kvemb_st

TEXTS = [f"document {i}: " + "a {braced} word " * (i % 5) for i in range(14)] + ["", "   ", "the end"]
LONG = " ".join(f"Sentence {i} of a document over the budget." for i in range(120))  # ~1,200 tokens: chunked


@pytest.fixture(scope="module")
def folder(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("kvemb-mp")
    sides = {"document": {"long_inputs": "chunk"}}
    kvemb_st.from_base(tiny_llama, layers=[1, 2], query_template="Query: {text} in one word:", sides=sides).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def model(folder):
    return kvemb_st.load(folder)


@pytest.fixture(scope="module")
def reference(model):
    return model.encode(TEXTS, batch_size=4)


def test_pool_vectors_equal_single_process(model, reference, tiny_llama):
    query_reference = model.encode_query(TEXTS, batch_size=4)
    documents = [LONG, *TEXTS[:5]]
    document_reference = model.encode_document(documents, batch_size=4)
    assert not np.allclose(document_reference[0], model.encode([LONG])[0], atol=1e-4), "chunk must differ from truncate"
    plain = kvemb_st.from_base(tiny_llama, method="prompteol").encode(TEXTS, batch_size=4)
    assert not np.allclose(plain, reference, atol=1e-3), "re-routing must change the vectors for this test to mean anything"

    pool = model.start_multi_process_pool(["cpu", "cpu"])
    try:
        vectors = model.encode(TEXTS, pool=pool, chunk_size=3, batch_size=4)
        assert vectors.dtype == np.float32
        queries = model.encode_query(TEXTS, pool=pool, chunk_size=3, batch_size=4)
        chunked = model.encode_document(documents, pool=pool, chunk_size=3, batch_size=4)
    finally:
        model.stop_multi_process_pool(pool)
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    np.testing.assert_allclose(queries, query_reference, atol=1e-5)
    np.testing.assert_allclose(chunked, document_reference, atol=1e-5)  # long_inputs="chunk" holds in the workers


def test_bf16_backbone_gives_float32_vectors(folder, reference):
    # dtype given as a string, as in a JSON config; torch dtypes through from_base are in test_dtypes.py
    model = kvemb_st.load(folder, model_kwargs={"dtype": "bfloat16"})
    assert model[0].auto_model.dtype == torch.bfloat16
    vectors = model.encode(TEXTS, batch_size=4)
    tensor = model.encode(TEXTS[:3], convert_to_tensor=True)
    assert vectors.dtype == np.float32 and tensor.dtype == torch.float32
    assert np.all(np.sum(vectors * reference, axis=1) > 0.99)  # both are unit vectors: cosine


@pytest.mark.parametrize("model_kwargs", [{"device_map": "cpu"}, {"device_map": "auto"}])
def test_device_map_places_the_backbone(folder, reference, model_kwargs, monkeypatch):
    # Simulate a machine whose default device differs from the map (a GPU box with device_map="cpu"):
    # the backbone must stay where the map put it instead of being moved to ST's default device.
    monkeypatch.setattr(st_model, "get_device_name", lambda: "meta")
    model = kvemb_st.load(folder, model_kwargs=model_kwargs)
    assert model.device == torch.device("cpu")
    np.testing.assert_allclose(model.encode(TEXTS, batch_size=4), reference, atol=1e-6)


def test_remote_code_path_takes_the_same_model_kwargs(folder, reference):
    model = SentenceTransformer(folder, trust_remote_code=True, model_kwargs={"dtype": "bfloat16", "device_map": "cpu"})
    assert model[0].auto_model.dtype == torch.bfloat16
    vectors = model.encode(TEXTS, batch_size=4)
    assert vectors.dtype == np.float32
    assert np.all(np.sum(vectors * reference, axis=1) > 0.99)
