"""Post-processing with statistics per side, as sentence-transformers' Router: each side's vectors go through its own
fit -- checked against the fit computed plainly here with numpy on that side's raw vectors, for every mode -- and
differ from the other side's; the Router saves, loads through both loaders (kvemb_st.load checking it first) and
pushes to the Hub."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from huggingface_hub import HfApi
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Router

import kvemb_st
from kvemb_st.folder import DamagedFileError
from kvemb_st.postprocessing import DEFAULT_EIGENVALUE_FLOOR, PostProcessing
from kvemb_st.postprocessing_fit import fit_postprocessing
from kvemb_st.side_router import route_of, side_router

SIDES = {"query": {"template": 'Query : "{text}" in one word:"', "pooling": "last"},
         "document": {"template": "Passage: {text}\nIn one word:", "pool_layers": [1]}}  # fmt: skip
TOPICS = ["cats", "stocks", "rain", "tea", "chess", "trains"]
CALIBRATION = {
    None: [f"Sentence number {i} talks about {t}." for i, t in enumerate(TOPICS * 4)],
    "query": [f"what about {t} number {i}?" for i, t in enumerate(TOPICS * 4)],
    "document": [f"A passage, number {i}, explains {t} at some length." for i, t in enumerate(TOPICS * 4)],
}
TEXTS = ["A man is playing a guitar.", "Someone plays an instrument.", "Markets fell sharply.", "It rained all day.",
         "Tea is served at five.", "The train was late again."]  # fmt: skip
MODES = [("center", None), ("remove_pcs", 3), ("whiten", None)]
SIDE_CALLS = {  # each way to reach a side
    None: [lambda m: m.encode(TEXTS)],
    "query": [lambda m: m.encode_query(TEXTS), lambda m: m.encode(TEXTS, prompt_name="query")],
    "document": [lambda m: m.encode_document(TEXTS), lambda m: m.encode(TEXTS, prompt_name="document")],
}


def reference(calibration: np.ndarray, x: np.ndarray, mode: str, components: int | None) -> np.ndarray:
    """The post-processing, plainly: centre, drop the top principal directions, or whiten (floored eigenvalues)."""
    calibration, x = calibration.astype(np.float64), x.astype(np.float64)
    mean = calibration.mean(axis=0)
    centred = x - mean
    if mode == "remove_pcs":
        directions = np.linalg.svd(calibration - mean, full_matrices=False)[2][:components].T
        centred = centred - centred @ directions @ directions.T
    elif mode == "whiten":
        eigenvalues, eigenvectors = np.linalg.eigh(np.cov(calibration, rowvar=False))
        floored = np.maximum(eigenvalues, DEFAULT_EIGENVALUE_FLOOR * eigenvalues.max())
        centred = centred @ eigenvectors / np.sqrt(floored)
    return centred / np.linalg.norm(centred, axis=1, keepdims=True)


def assert_same(got: np.ndarray, expected: np.ndarray, mode: str, message: str = "") -> None:
    """Equal vectors; for whitening equal cosines (its basis is any rotation of the eigenvectors)."""
    if mode == "whiten":
        got, expected = got @ got.T, expected @ expected.T
    np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=message)


@pytest.fixture(scope="module")
def bare(tiny_llama):
    return kvemb_st.from_base(tiny_llama, method="mean", sides=SIDES)


@pytest.fixture(scope="module")
def raw(bare) -> dict[str, dict[str | None, np.ndarray]]:
    """Each side's raw vectors (no post-processing) of its calibration texts and of the test texts."""
    encode = {None: bare.encode, "query": bare.encode_query, "document": bare.encode_document}
    return {
        "calibration": {side: encode[side](texts) for side, texts in CALIBRATION.items()},
        "texts": {side: encode[side](TEXTS) for side in encode},
    }


def routed(bare, raw, mode: str, components: int | None) -> SentenceTransformer:
    """The model with a statistics set per side: plain encode, queries and documents each fitted on their own."""
    fits = {side: fit_postprocessing(vectors, mode, components) for side, vectors in raw["calibration"].items()}
    router = side_router(fits[None], {"query": fits["query"], "document": fits["document"]},
                         {"query": "query", "document": "document"})  # fmt: skip
    return SentenceTransformer(modules=[bare[0], router], prompts=bare.prompts, similarity_fn_name="cosine")


@pytest.mark.parametrize(("mode", "components"), MODES)
def test_each_side_goes_through_its_own_statistics(bare, raw, mode, components):
    model = routed(bare, raw, mode, components)
    for side, calls in SIDE_CALLS.items():
        own = reference(raw["calibration"][side], raw["texts"][side], mode, components)
        for call in calls:
            got = call(model)
            assert_same(got, own, mode, f"side {side}")
            for other in {None, "query", "document"} - {side}:  # another side's statistics give other vectors
                theirs = reference(raw["calibration"][other], raw["texts"][side], mode, components)
                with pytest.raises(AssertionError):
                    assert_same(got, theirs, mode)


def vectors(model) -> dict[str, np.ndarray]:
    return {"encode": model.encode(TEXTS), "query": model.encode_query(TEXTS),
            "document": model.encode(TEXTS, prompt_name="document")}  # fmt: skip


@pytest.fixture(scope="module")
def saved(bare, raw, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    model = routed(bare, raw, "whiten", 8)
    folder = tmp_path_factory.mktemp("routed") / "model"
    model.save(str(folder))
    return folder, vectors(model)


def test_the_router_round_trips_through_both_loaders(saved):
    folder, expected = saved
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["kvemb_st.module.KVEmbedding", "sentence_transformers.base.modules.router.Router"]
    for loaded in (SentenceTransformer(str(folder), trust_remote_code=True), kvemb_st.load(str(folder))):
        assert isinstance(loaded[1], Router) and loaded.get_embedding_dimension() == 8
        assert len({id(route_of(loaded[1], side)) for side in (None, "query", "document")}) == 3
        for name, value in vectors(loaded).items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_push_to_hub_uploads_a_routed_folder_that_loads(bare, raw, tmp_path):
    """ST's push_to_hub is save + upload_folder; the uploaded folder (recorded, the Hub is offline) loads."""
    model = routed(bare, raw, "center", None)
    uploaded = tmp_path / "uploaded"

    def upload_folder(self, *, folder_path, **kwargs):
        shutil.copytree(folder_path, uploaded)
        return SimpleNamespace(commit_url="https://huggingface.co/someone/tiny/commit/0")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
        patch.setattr(HfApi, "upload_folder", upload_folder)
        model.push_to_hub("someone/tiny", replace_model_card=True)
    for name, value in vectors(kvemb_st.load(str(uploaded))).items():
        np.testing.assert_array_equal(value, vectors(model)[name], err_msg=name)


def test_add_postprocessing_with_document_statistics_routes_both_sides_to_them(bare, raw):
    model = kvemb_st.from_base(bare[0].config.base_model, method="mean", sides=SIDES)
    kvemb_st.add_postprocessing(model, CALIBRATION[None], "remove_pcs", 3, document_texts=CALIBRATION["document"],
                                document_statistics=True)  # fmt: skip
    router = model[1]
    assert route_of(router, "query") is route_of(router, "document") is not route_of(router, None)
    documents = reference(raw["calibration"]["document"], raw["texts"]["query"], "remove_pcs", 3)
    np.testing.assert_allclose(model.encode_query(TEXTS), documents, atol=1e-4)
    np.testing.assert_allclose(model.encode(TEXTS), reference(raw["calibration"][None], raw["texts"][None], "remove_pcs", 3),
                               atol=1e-4)  # fmt: skip
    with pytest.raises(ValueError, match="already has a PostProcessing module"):
        kvemb_st.add_postprocessing(model, CALIBRATION[None], "center")


# --------------------------------------------------------------------- kvemb_st.load checks the Router first
def _edit_router(folder: Path, change) -> None:
    path = folder / "1_Router" / "router_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _types(kind: str):
    def change(config):
        config["types"] = dict.fromkeys(config["types"], kind)
    return change


def _no_query_route(config):
    config["parameters"]["route_mappings"].pop("('query', None)")
    config["structure"]["questions"] = config["structure"].pop("query")


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (_types("evil_kvemb_router_test.Steal"), ValueError, r"routes to modules \['evil_kvemb_router_test.Steal'\]"),
        (_types("sentence_transformers.base.modules.normalize.Normalize"), ValueError, "only loads routes of"),
        (lambda c: c["structure"].update(default=[*c["structure"]["default"]] * 2), DamagedFileError, "route 'default'"),
        (_no_query_route, DamagedFileError, "no route for side 'query'"),
        (lambda c: c["parameters"].update(trust_remote_code=True), DamagedFileError, "parameter 'trust_remote_code'"),
        (lambda c: c["types"].update({"../../escape": c["types"].popitem()[1]}), DamagedFileError, "plain folder name"),
        (lambda c: c.pop("structure"), DamagedFileError, "must hold the objects"),
    ],
)
def test_kvemb_load_checks_the_router_before_building_it(saved, tmp_path, change, error, message):
    folder = tmp_path / "model"
    shutil.copytree(saved[0], folder)
    _edit_router(folder, change)
    with pytest.raises(error, match=message) as err:
        kvemb_st.load(str(folder))
    assert "router_config.json" in str(err.value)
    assert "evil_kvemb_router_test" not in sys.modules


def test_a_router_without_its_config_fails_clearly(saved, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved[0], folder)
    (folder / "1_Router" / "router_config.json").unlink()
    with pytest.raises(DamagedFileError, match="router_config.json: is missing"):
        kvemb_st.load(str(folder))


def test_side_router_refuses_bad_routes():
    module = PostProcessing("center", 4)
    with pytest.raises(ValueError, match="unknown side 'passage'"):
        side_router(module, {"document": module}, {"passage": "document"})
    with pytest.raises(ValueError, match="statistics 'query', which are not among"):
        side_router(module, {"document": module}, {"query": "query"})
    with pytest.raises(ValueError, match="none named 'default'"):
        side_router(module, {"default": module}, {})


def test_kvemb_load_refuses_a_foreign_class_on_any_route_whatever_its_name(saved, tmp_path):
    """A class is allowed by its full import path, never by its name: a module elsewhere called PostProcessing, on
    one route only, is refused before anything is imported."""
    folder = tmp_path / "model"
    shutil.copytree(saved[0], folder)

    def one_foreign_route(config):
        route = sorted(config["types"])[-1]
        config["types"][route] = "evil_kvemb_router_test.postprocessing.PostProcessing"

    _edit_router(folder, one_foreign_route)
    with pytest.raises(ValueError, match=r"routes to modules \['evil_kvemb_router_test.postprocessing.PostProcessing'\]"):
        kvemb_st.load(str(folder))
    assert "evil_kvemb_router_test" not in sys.modules
