"""Batch embedding on Ray Data, on a local two-CPU Ray cluster.

One end-to-end run of ``tools/embed_ray.py`` (two actors) checks the vectors against single-process
``encode`` and that rows are neither lost, duplicated nor reordered; :class:`Embedder` is also called
in-process to check its errors without starting actors. Budget: < 120 s for this file, Ray start included.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data

import kvemb_st
from kvemb_st.ray import Embedder, embed_dataset

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "embed_ray.py"
TEXTS = [f"row {i}: " + "some {braced} words " * (i % 6) for i in range(37)] + [""]
IDS = [f"doc-{(i * 7919) % 1000:03d}" for i in range(len(TEXTS))]  # unique, not sorted


@pytest.fixture(scope="module")
def folder(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("kvemb-ray")
    kvemb_st.from_base(tiny_llama, layers=[1, 2], document_template="Passage: {text} in one word:").save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def model(folder):
    return kvemb_st.load(folder)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_script_embeds_jsonl_corpus_like_single_process(folder, model, local_ray, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(IDS, TEXTS)))
    output = tmp_path / "out"
    main = runpy.run_path(str(SCRIPT))["main"]
    # Two actors of half a CPU each leave one CPU of the two for Ray's read and write tasks.
    summary = main([folder, str(corpus), str(output), "--num-actors", "2", "--cpus-per-actor", "0.5",
                    "--batch-size", "5", "--encode-batch-size", "4", "--prompt-name", "document"])

    table = pq.read_table(output)
    assert summary["rows"] == len(TEXTS)
    assert table.column("id").to_pylist() == IDS  # none lost or duplicated, input order kept
    assert table.column("text").to_pylist() == TEXTS
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), model.get_embedding_dimension())
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(vectors, model.encode_document(TEXTS, batch_size=4), atol=1e-5)


def test_missing_text_column_fails_before_any_actor_starts(folder, local_ray):
    dataset = ray.data.from_items([{"body": "a"}])
    with pytest.raises(ValueError, match=r"text column 'text' not found.*\['body'\]"):
        embed_dataset(dataset, folder)
    with pytest.raises(ValueError, match="'body' already exists"):
        embed_dataset(dataset, folder, text_column="body", vector_column="body")


def test_embedder_in_process(folder, model):
    embedder = Embedder(folder, text_column="body", vector_column="vec", encode_batch_size=3)
    out = embedder(pa.table({"key": [3, 1, 2], "body": TEXTS[:3]}))
    assert out.column_names == ["key", "body", "vec"] and out.column("key").to_pylist() == [3, 1, 2]
    np.testing.assert_allclose(np.stack(out.column("vec").to_numpy(zero_copy_only=False)), model.encode(TEXTS[:3]), atol=1e-5)

    empty = embedder(pa.table({"body": pa.array([], pa.string())}))  # Ray may hand over empty blocks
    assert empty.num_rows == 0 and empty.schema.field("vec").type == out.schema.field("vec").type

    with pytest.raises(ValueError, match=r"column 'body' has 1 null value"):
        embedder(pa.table({"body": ["a", None]}))
    with pytest.raises(ValueError, match=r"prompt_name 'passage' is not a prompt.*'document'"):
        Embedder(folder, prompt_name="passage")
