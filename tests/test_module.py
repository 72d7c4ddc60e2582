"""The ST module end to end: save/load round trips, weight-free folders, evaluators, prompts, the Hub path offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer, util
from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

import kvemb_st

TEXTS = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


@pytest.fixture(scope="module")
def tiny_kv(tiny_llama):
    return kvemb_st.from_base(
        tiny_llama,
        layers="1-2",
        prefix_bias=1.0,
        pooling="mean+last",
        query_template='Query: "{text}" means in one word:"',
        document_template="Context: {text}\nCompress the context in one word:",
    )


def test_save_writes_config_only_and_reloads_identically(tiny_kv, tmp_path):
    tiny_kv.save(str(tmp_path))
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(WEIGHT_SUFFIXES)], files
    assert {"modules.json", "config_sentence_transformers.json", "kvemb_config.json"} <= set(files)
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["kvemb_st.module.KVEmbedding"]
    st_config = json.loads((tmp_path / "config_sentence_transformers.json").read_text())
    assert st_config["requirements"] == {"kvemb-st": f">={kvemb_st.__version__}"}
    assert st_config["similarity_fn_name"] == "cosine"
    assert st_config["prompts"] == {"query": "<kvemb-side:query>", "document": "<kvemb-side:document>"}  # name tags
    config = json.loads((tmp_path / "kvemb_config.json").read_text())
    assert config["sides"]["query"] == {"template": 'Query: "{text}" means in one word:"'}
    assert config["layers"] == [1, 2] and config["prefix_bias"] == 1.0 and config["kvemb_st_version"]

    expected = tiny_kv.encode(TEXTS)
    for loaded in (SentenceTransformer(str(tmp_path), trust_remote_code=True), kvemb_st.load(str(tmp_path))):
        np.testing.assert_array_equal(loaded.encode(TEXTS), expected)
        np.testing.assert_array_equal(loaded.encode_query(TEXTS), tiny_kv.encode_query(TEXTS))
        np.testing.assert_array_equal(loaded.encode_document(TEXTS), tiny_kv.encode_document(TEXTS))
        assert loaded.max_seq_length == tiny_kv.max_seq_length
        assert loaded.get_embedding_dimension() == 64


def test_sentence_transformer_refuses_without_trust_remote_code(tiny_kv, tmp_path):
    tiny_kv.save(str(tmp_path))
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(tmp_path))


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"backend": "onnx"}, r"backend='onnx' is not supported: .*backend='torch'"),
        ({"processor_kwargs": {"padding_side": "left"}}, r"processor_kwargs=.*not supported: the tokenizer"),
        ({"config_kwargs": {"num_hidden_layers": 1}}, r"config_kwargs=.*not supported: .*model_kwargs"),
    ],
)
def test_st_loading_options_it_cannot_honour_are_refused_not_ignored(tiny_kv, tmp_path, option, match):
    tiny_kv.save(str(tmp_path))
    with pytest.raises(ValueError, match=match):
        SentenceTransformer(str(tmp_path), trust_remote_code=True, **option)


def test_query_and_document_templates_are_applied(tiny_kv):
    query, document, plain = tiny_kv.encode_query(TEXTS), tiny_kv.encode_document(TEXTS), tiny_kv.encode(TEXTS)
    assert abs(query - plain).max() > 1e-4 and abs(document - plain).max() > 1e-4
    module = tiny_kv[0]
    ids = module.preprocess(["x"], prompt=tiny_kv.prompts["query"])["input_ids"][0]
    assert module.tokenizer.decode(ids) == 'Query: "x" means in one word:"'
    ids = module.preprocess(["x"], prompt="Instruct: ")["input_ids"][0]  # a plain prompt goes inside the template
    assert module.tokenizer.decode(ids) == 'This sentence : "Instruct: x" means in one word:"'


def test_vectors_are_float32_and_unit_norm(tiny_kv):
    embeddings = tiny_kv.encode(TEXTS + [""])
    assert embeddings.dtype == np.float32 and np.isfinite(embeddings).all()
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_st_evaluator_and_semantic_search_run_on_loaded_model(tiny_kv, tmp_path):
    tiny_kv.save(str(tmp_path))
    model = kvemb_st.load(str(tmp_path))
    evaluator = EmbeddingSimilarityEvaluator(
        TEXTS, TEXTS[1:] + TEXTS[:1], [0.8, 0.1, 0.3], name="tiny", main_similarity="cosine"
    )
    scores = evaluator(model)
    assert np.isfinite(scores["tiny_spearman_cosine"])
    hits = util.semantic_search(model.encode_query(["music"]), model.encode_document(TEXTS), top_k=2)
    assert len(hits[0]) == 2 and {hit["corpus_id"] for hit in hits[0]} <= {0, 1, 2}


def _hf_cache_repo(cache: Path, repo_id: str, source: Path, revision: str) -> None:
    """Lay out ``source`` as the Hugging Face cache does for a downloaded repo."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_loads_by_repo_id_from_offline_hub_cache(tiny_llama, tmp_path):
    """Both the KV-Embedding repo and the base model it names resolve through the HF cache, offline."""
    cache = tmp_path / "hub"
    _hf_cache_repo(cache, "tiny-org/tiny-llama", Path(tiny_llama), "a" * 40)
    model = kvemb_st.from_base(tiny_llama, layers=[1, 3], prefix_bias=2.0)
    expected = model.encode(TEXTS)
    model[0].config.base_model = "tiny-org/tiny-llama"  # as a Hub-published folder would name its base
    model.save(str(tmp_path / "saved"))
    _hf_cache_repo(cache, "tiny-org/tiny-kvemb", tmp_path / "saved", "b" * 40)
    np.save(tmp_path / "expected.npy", expected)
    script = f"""
import numpy as np, kvemb_st
from sentence_transformers import SentenceTransformer
texts = {TEXTS!r}
expected = np.load({str(tmp_path / "expected.npy")!r})
a = SentenceTransformer("tiny-org/tiny-kvemb", cache_folder={str(cache)!r}, trust_remote_code=True)
b = kvemb_st.load("tiny-org/tiny-kvemb", cache_folder={str(cache)!r})
np.testing.assert_array_equal(a.encode(texts), expected)
np.testing.assert_array_equal(b.encode(texts), expected)
print("OFFLINE-OK")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "OFFLINE-OK" in result.stdout, result.stderr[-3000:]
