"""The chunking-on-MTEB experiment: a saved build and its chunking copy, each through mteb's evaluator on a slice of
local SciFact; and the raw-vector cache refuses a model whose chunks are combined after its post-processing (it
holds one vector per text, so it would silently return the vector combined before)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

import kvemb_st
from kvemb_st.postprocessing_fit import add_postprocessing

from kvemb_lab import mteb_chunking
from kvemb_lab.vector_cache import CachedEncode

pytest.importorskip("mteb")
DATA = Path(os.environ.get("KVEMB_MTEB_DATA") or Path(__file__).resolve().parents[2] / "shared" / "mteb")
SIDES = {"query": {"template": "Query: {text}\nIn one word:"}, "document": {"template": "Passage: {text}\nIn one word:"}}


@pytest.fixture(scope="module")
def folder(tiny_llama, tmp_path_factory):
    model = kvemb_st.from_base(tiny_llama, layers="1-2", sides=SIDES, max_seq_length=40)
    texts = [f"Calibration sentence {i} about {w}." for i, w in enumerate(["rain", "tea", "chess", "trains"] * 6)]
    add_postprocessing(model, texts, "whiten", document_texts=texts, document_statistics=True)
    path = tmp_path_factory.mktemp("chunking") / "tiny-kvemb"
    model.save(str(path))
    return path


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no offline MTEB data at {DATA} (the team's shared/mteb)")
def test_truncate_and_chunk_rows_come_from_mteb_on_two_models(folder, tmp_path):
    result = mteb_chunking.main(["smollm2", "--folder", str(folder), "--data-dir", str(DATA), "--tasks", "SciFact",
                                 "--max-examples", "6", "--out", str(tmp_path)])  # fmt: skip
    rows = result["rows"]
    assert set(rows) == {"truncate", "chunk"} and rows["truncate"]["revision"] != rows["chunk"]["revision"]
    assert all(math.isfinite(row["scores"]["SciFact"]) for row in rows.values())
    written = (tmp_path / "smollm2" / "mteb_chunking_smollm2.json").read_text()
    assert json.loads(written)["rows"] == rows and str(tmp_path) not in written and str(DATA) not in written
    assert (tmp_path / "smollm2" / "mteb_chunking" / "chunk").is_dir()  # mteb's own result files, per setting


def test_the_cache_refuses_chunks_combined_after_the_post_processing(folder, tmp_path):
    copy = mteb_chunking.with_setting(folder, tmp_path / "copy", "document", **mteb_chunking.CHUNK)
    with pytest.raises(ValueError, match=r"\['document'\] combine their chunk vectors after the post-processing"):
        CachedEncode(kvemb_st.load(str(copy)), tmp_path / "cache")
    before = mteb_chunking.with_setting(folder, tmp_path / "before", "document", long_inputs="chunk")
    CachedEncode(kvemb_st.load(str(before)), tmp_path / "cache")  # combined before: one raw vector per text is right
