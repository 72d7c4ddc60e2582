"""A folder written by kvemb-st 0.1 (``tests/data/legacy_0_1``, see its README) still loads through both loaders
and gives the vectors recorded when it was written: sides whose ST prompts are their templates, and
post-processing with side statistics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Router

import kvemb_st
from kvemb_st.side import side_tag

LEGACY = Path(__file__).parent / "data" / "legacy_0_1"
EXPECTED = json.loads((LEGACY / "expected_vectors.json").read_text(encoding="utf-8"))
CALLS = {
    "encode": lambda model, texts: model.encode(texts),
    "encode_query": lambda model, texts: model.encode_query(texts),
    "encode_document": lambda model, texts: model.encode_document(texts),
    "prompt_name_query": lambda model, texts: model.encode(texts, prompt_name="query"),
    "prompt_name_document": lambda model, texts: model.encode(texts, prompt_name="document"),
}


def _with_base(folder: Path, base: str) -> Path:
    """A copy of the legacy folder whose config names the re-created tiny base (ST's loader takes no override)."""
    shutil.copytree(LEGACY, folder)
    path = folder / "kvemb_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model": base}))
    return folder


@pytest.fixture(scope="module", params=["kvemb_st.load", "SentenceTransformer"])
def legacy(request, tiny_llama, tmp_path_factory):
    if request.param == "kvemb_st.load":
        return kvemb_st.load(str(LEGACY), base_model=tiny_llama)
    folder = _with_base(tmp_path_factory.mktemp("legacy") / "model", tiny_llama)
    return SentenceTransformer(str(folder), trust_remote_code=True)


@pytest.mark.parametrize("call", CALLS)
def test_a_legacy_folder_gives_the_recorded_vectors(legacy, call):
    got = CALLS[call](legacy, EXPECTED["texts"])
    np.testing.assert_allclose(got, np.array(EXPECTED[call]), atol=2e-5)


def test_a_legacy_folder_saved_again_takes_the_new_format_and_keeps_its_vectors(legacy, tmp_path, tiny_llama):
    """Its prompts become the sides' name tags and its side statistics a Router, and nothing else changes."""
    assert legacy.prompts == {"query": side_tag("query"), "document": side_tag("document")}
    assert isinstance(legacy[1], Router)
    legacy.save(str(tmp_path / "again"))
    modules = json.loads((tmp_path / "again" / "modules.json").read_text())
    assert modules[1]["type"] == "sentence_transformers.base.modules.router.Router"
    again = kvemb_st.load(str(tmp_path / "again"), base_model=tiny_llama)
    for call in CALLS:
        np.testing.assert_allclose(CALLS[call](again, EXPECTED["texts"]), np.array(EXPECTED[call]), atol=2e-5, err_msg=call)
