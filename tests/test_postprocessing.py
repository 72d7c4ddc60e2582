"""Calibrated post-processing: the statistics against an independent numpy computation, save/load round
trips through both loaders and push_to_hub, every method, and clear errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from safetensors.numpy import load_file
from safetensors.numpy import save_file as save_numpy
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Router

import kvemb_st
from kvemb_st.calibration import calibration_hash
from kvemb_st.postprocessing import POSTPROCESSING_MODES, STATISTICS_FILE, PostProcessing
from kvemb_st.postprocessing_fit import add_postprocessing, fit_postprocessing
from kvemb_st.side_router import route_of

TEXTS = [f"Sentence number {i} talks about {topic}." for i, topic in enumerate(["cats", "stocks", "rain", "tea"] * 10)]
QUERIES = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply."]
MODES = [("center", None), ("remove_pcs", 3), ("whiten", None), ("whiten", 8)]


def anisotropic(count: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors in a narrow cone with a spread-out spectrum, like an LLM's pooled states."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, dim)) @ np.diag(np.geomspace(3.0, 0.05, dim)) @ rng.standard_normal((dim, dim))
    x += 8.0 * rng.standard_normal(dim)  # a common offset: every cosine is high
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return anisotropic(400, 24, seed=0), anisotropic(50, 24, seed=1)


def reference_top_directions(calibration: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k right singular vectors of the centred data and the covariance eigenvalues (via SVD, not eigh)."""
    centred = calibration - calibration.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:k].T, singular[:k] ** 2 / (len(calibration) - 1)


# ------------------------------------------------------------------------------- the math, in numpy
def test_center_subtracts_the_calibration_mean(data):
    calibration, queries = data
    module = fit_postprocessing(calibration, "center")
    reference = queries - calibration.mean(axis=0)
    np.testing.assert_allclose(module.transform(queries, normalize=False), reference, atol=1e-6)
    np.testing.assert_allclose(
        module.transform(queries), reference / np.linalg.norm(reference, axis=1, keepdims=True), atol=1e-6
    )


def test_remove_pcs_projects_out_the_top_principal_directions(data):
    calibration, queries = data
    module = fit_postprocessing(calibration, "remove_pcs", 3)
    directions, _ = reference_top_directions(calibration, 3)
    found = module.directions.double().numpy()
    np.testing.assert_allclose(found @ found.T, directions @ directions.T, atol=1e-5)  # same projector, any sign
    centred = queries - calibration.mean(axis=0)
    reference = centred - centred @ directions @ directions.T
    np.testing.assert_allclose(module.transform(queries, normalize=False), reference, atol=1e-5)
    assert np.abs(module.transform(queries) @ directions).max() < 1e-5  # nothing left along them


def test_full_whitening_gives_identity_covariance_and_mahalanobis_inner_products(data):
    calibration, queries = data
    module = fit_postprocessing(calibration, "whiten", eigenvalue_floor=1e-9)
    whitened = module.transform(calibration, normalize=False).astype(np.float64)
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(24), atol=1e-3)
    # any whitening W has W W^T = C^-1, so inner products equal the Mahalanobis ones (no eigenvectors needed)
    centred = queries - calibration.mean(axis=0)
    reference = centred @ np.linalg.inv(np.cov(calibration, rowvar=False)) @ centred.T
    found = module.transform(queries, normalize=False).astype(np.float64)
    np.testing.assert_allclose(found @ found.T, reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max())


def test_reduced_whitening_keeps_the_top_directions_scaled_by_their_eigenvalues(data):
    calibration, queries = data
    module = fit_postprocessing(calibration, "whiten", 6)
    assert module.get_embedding_dimension() == 6 and module.transform(queries).shape == (50, 6)
    directions, eigenvalues = reference_top_directions(calibration, 6)
    projection = module.projection.double().numpy()
    reference = directions @ np.diag(1 / eigenvalues) @ directions.T
    np.testing.assert_allclose(projection @ projection.T, reference, rtol=1e-3)
    whitened = module.transform(calibration, normalize=False).astype(np.float64)
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(6), atol=1e-3)
    reduced = (queries - calibration.mean(axis=0)) @ directions / np.sqrt(eigenvalues)
    reduced /= np.linalg.norm(reduced, axis=1, keepdims=True)
    found = module.transform(queries)
    np.testing.assert_allclose(found @ found.T, reduced @ reduced.T, atol=1e-5)  # same cosines


def test_the_eigenvalue_floor_bounds_whitening_of_a_singular_covariance():
    calibration = anisotropic(10, 24, seed=2)  # 10 texts span 9 of 24 directions
    module = fit_postprocessing(calibration, "whiten", eigenvalue_floor=1e-2)
    top = reference_top_directions(calibration, 1)[1][0]
    scales = np.linalg.norm(module.projection.double().numpy(), axis=0)  # 1/sqrt(eigenvalue) per column
    assert np.isfinite(scales).all()
    np.testing.assert_allclose(scales.max(), 1 / np.sqrt(1e-2 * top), rtol=1e-4)
    np.testing.assert_allclose(scales.min(), 1 / np.sqrt(top), rtol=1e-4)


@pytest.mark.parametrize("mode, components", MODES)
def test_outputs_are_float32_unit_vectors_whatever_the_input_dtype(data, mode, components):
    calibration, queries = data
    module = fit_postprocessing(torch.from_numpy(calibration).half().float(), mode, components)
    for dtype in (torch.float64, torch.bfloat16):
        out = module.transform_tensor(torch.from_numpy(queries).to(dtype))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(queries)))
    module.half()  # as a model-wide .half() would do to the buffers
    assert module.transform_tensor(torch.from_numpy(queries).half()).dtype == torch.float32


# -------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "embeddings, mode, components, kwargs, message",
    [
        (np.ones((5, 8)), "whiten", None, {}, "all (nearly) the same vector"),
        (np.eye(8)[:5], "remove_pcs", 5, {}, "5 calibration texts span at most 4 directions"),
        (np.eye(8)[:5], "whiten", 6, {}, "too few for whiten with components=6"),
        (np.eye(8), "whiten", 9, {}, "components must be at most 8"),
        (np.eye(8), "remove_pcs", 8, {}, "remove fewer than 8"),
        (np.where(np.eye(8) == 1, np.nan, 0.0), "center", None, {}, "NaN or inf (first in row 0)"),
        (np.eye(8)[:1], "center", None, {}, "N >= 2"),
        (np.arange(8.0), "center", None, {}, "(N, dim)"),
        (np.eye(8, dtype=np.int64), "center", None, {}, "floating point"),
        (np.eye(8), "zca", None, {}, "unknown post-processing mode 'zca'"),
        (np.eye(8), "center", 2, {}, "'center' takes no components"),
        (np.eye(8), "remove_pcs", None, {}, "needs components"),
        (np.eye(8), "whiten", 0, {}, "positive integer"),
        (np.eye(8), "whiten", None, {"eigenvalue_floor": 0.0}, "eigenvalue_floor"),
    ],
)
def test_bad_calibration_or_arguments_fail_clearly(embeddings, mode, components, kwargs, message):
    with pytest.raises(ValueError) as err:
        fit_postprocessing(embeddings, mode, components, **kwargs)
    assert message in str(err.value)


def test_loading_a_damaged_statistics_file_fails_clearly(data, tmp_path):
    module = fit_postprocessing(data[0], "whiten", 4)
    module.save(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "components": 5}))
    with pytest.raises(ValueError, match=r"tensor 'projection' has shape \(24, 4\), but .*config\.json \(mode 'whiten' with in_features=24, components=5\) needs \(24, 5\)"):
        PostProcessing.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation": "os.system"}))
    with pytest.raises(ValueError, match="not a kvemb_st PostProcessing config"):
        PostProcessing.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / STATISTICS_FILE).unlink()
    with pytest.raises(ValueError, match="statistics are missing"):
        PostProcessing.load(str(tmp_path))


def _legacy_side_statistics_folder(first: PostProcessing, second: PostProcessing, folder: Path, sides) -> None:
    """A PostProcessing folder as kvemb-st 0.1 wrote it: the second set in the same file, as ``document_*``."""
    first.save(str(folder))
    own = {f"document_{name}": getattr(second, name).numpy() for name in second.statistics_shapes()}
    save_numpy({**load_file(folder / STATISTICS_FILE), **own}, folder / STATISTICS_FILE)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "side_statistics": sides}))


@pytest.mark.parametrize("mode, components", MODES)
def test_legacy_side_statistics_load_as_a_router_of_one_module_per_set(data, tmp_path, mode, components):
    first, second = fit_postprocessing(data[0], mode, components), fit_postprocessing(data[1], mode, components)
    _legacy_side_statistics_folder(first, second, tmp_path, {"query": "document", "document": "document"})
    router = PostProcessing.load(str(tmp_path))
    assert isinstance(router, Router)
    vectors = torch.as_tensor(data[1][:5], dtype=torch.float32)
    for side, expected in ((None, first), ("query", second), ("document", second)):
        torch.testing.assert_close(route_of(router, side).transform_tensor(vectors), expected.transform_tensor(vectors))
        out = router({"sentence_embedding": vectors.clone(), "task": side})["sentence_embedding"]
        torch.testing.assert_close(out, expected.transform_tensor(vectors))


@pytest.mark.parametrize(
    ("side_statistics", "message"),
    [({"passage": "document"}, "unknown side 'passage'"), ({"query": "no such set"}, "must map sides to statistics names"),
     (["query"], "must map sides to statistics names")],
)  # fmt: skip
def test_bad_legacy_side_statistics_fail_clearly(data, tmp_path, side_statistics, message):
    first, second = fit_postprocessing(data[0], "whiten", 4), fit_postprocessing(data[1], "whiten", 4)
    _legacy_side_statistics_folder(first, second, tmp_path, side_statistics)
    with pytest.raises(ValueError, match=message) as err:
        PostProcessing.load(str(tmp_path))
    assert "config.json" in str(err.value)


def test_a_statistics_file_without_the_side_set_fails_clearly(data, tmp_path):
    first = fit_postprocessing(data[0], "whiten", 4)
    first.save(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "side_statistics": {"document": "document"}}))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['document_mean', 'document_projection'\]"):
        PostProcessing.load(str(tmp_path))


# ------------------------------------------------------------------------- pipelines: every method
@pytest.fixture(scope="module")
def methods(tiny_llama) -> dict[str, SentenceTransformer]:
    return {
        "kv": kvemb_st.from_base(tiny_llama, "1-2"),
        "prompteol": kvemb_st.from_base(tiny_llama, method="prompteol"),
        "echo": kvemb_st.from_base(tiny_llama, method="echo"),
    }


def _without_postprocessing(model: SentenceTransformer) -> None:
    while isinstance(model[-1], (PostProcessing, Router)):
        del model[-1]


@pytest.mark.parametrize("method", ["kv", "prompteol", "echo"])
def test_add_postprocessing_works_for_every_method(methods, method):
    """The module holds the statistics of the model's own raw vectors, and forward equals transform."""
    model = methods[method]
    raw_calibration, raw_queries = model.encode(TEXTS), model.encode(QUERIES)
    add_postprocessing(model, TEXTS, "whiten", 8, calibration_name="test texts")
    try:
        module = model[-1]
        expected = fit_postprocessing(raw_calibration, "whiten", 8)
        for name in ("mean", "projection"):
            np.testing.assert_array_equal(getattr(module, name).numpy(), getattr(expected, name).numpy())
        assert module.calibration == {"name": "test texts", "hash": calibration_hash(TEXTS), "count": len(TEXTS)}
        vectors = model.encode(QUERIES)
        assert vectors.shape == (3, 8) and vectors.dtype == np.float32
        np.testing.assert_allclose(vectors, module.transform(raw_queries), atol=1e-6)
    finally:
        _without_postprocessing(model)


@pytest.mark.parametrize("mode, components", MODES)
def test_postprocessing_round_trips_through_both_loaders(methods, tmp_path, mode, components):
    model = methods["kv"]
    add_postprocessing(model, TEXTS, mode, components)
    try:
        module = model[-1]
        vectors = model.encode(QUERIES)
        dimension = components if mode == "whiten" and components else 64
        assert model.get_embedding_dimension() == dimension
        with pytest.warns(FutureWarning):
            assert model.get_sentence_embedding_dimension() == dimension
        model.save(str(tmp_path / "model"))
    finally:
        _without_postprocessing(model)
    folder = tmp_path / "model"
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["kvemb_st.module.KVEmbedding", "kvemb_st.postprocessing.PostProcessing"]
    stats = load_file(folder / modules[1]["path"] / STATISTICS_FILE)
    assert {name: value.shape for name, value in stats.items()} == module.statistics_shapes()
    for loaded in (SentenceTransformer(str(folder), trust_remote_code=True), kvemb_st.load(str(folder))):
        assert isinstance(loaded[-1], PostProcessing) and loaded[-1].get_config_dict() == module.get_config_dict()
        for name, value in stats.items():
            np.testing.assert_array_equal(value, getattr(module, name).numpy())
            np.testing.assert_array_equal(getattr(loaded[-1], name).numpy(), value)
        np.testing.assert_array_equal(loaded.encode(QUERIES), vectors)
        assert loaded.get_embedding_dimension() == dimension


def test_a_second_postprocessing_is_refused(methods):
    model = methods["prompteol"]
    add_postprocessing(model, TEXTS, "center")
    try:
        with pytest.raises(ValueError, match="already has a PostProcessing module"):
            add_postprocessing(model, TEXTS, "whiten")
    finally:
        _without_postprocessing(model)


def test_push_to_hub_uploads_a_folder_that_loads(methods, tmp_path):
    """ST's push_to_hub is save + upload_folder; the uploaded folder (recorded, the Hub is offline) loads."""
    model = methods["kv"]
    add_postprocessing(model, TEXTS, "whiten", 8)
    uploaded = tmp_path / "uploaded"

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, folder_path, **kwargs):
        shutil.copytree(folder_path, uploaded)
        return SimpleNamespace(commit_url="https://huggingface.co/someone/tiny/commit/0")

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(HfApi, "create_repo", create_repo)
            patch.setattr(HfApi, "upload_folder", upload_folder)
            model.push_to_hub("someone/tiny", replace_model_card=True)
        assert (uploaded / "1_PostProcessing" / STATISTICS_FILE).is_file()
        np.testing.assert_array_equal(kvemb_st.load(str(uploaded)).encode(QUERIES), model.encode(QUERIES))
    finally:
        _without_postprocessing(model)


# ------------------------------------------------------------------------------ the load allow-list
def _saved_folder(methods, tmp_path) -> Path:
    model = methods["prompteol"]
    add_postprocessing(model, TEXTS, "center")
    try:
        model.save(str(tmp_path / "model"))
    finally:
        _without_postprocessing(model)
    return tmp_path / "model"


@pytest.mark.parametrize(
    "types",
    [
        ["kvemb_st.module.KVEmbedding", "evil_kvemb_test_module.Steal"],
        ["kvemb_st.module.KVEmbedding", "sentence_transformers.base.modules.normalize.Normalize"],
        ["kvemb_st.postprocessing.PostProcessing", "kvemb_st.module.KVEmbedding"],
        ["kvemb_st.module.KVEmbedding", *["kvemb_st.postprocessing.PostProcessing"] * 2],
    ],
)
def test_kvemb_load_refuses_other_pipelines_without_importing_them(methods, tmp_path, types):
    folder = _saved_folder(methods, tmp_path)
    entries = json.loads((folder / "modules.json").read_text())
    entries = [{**entries[min(i, 1)], "idx": i, "type": t} for i, t in enumerate(types)]
    (folder / "modules.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="kvemb_st.load only loads") as err:
        kvemb_st.load(str(folder))
    assert str(types) in str(err.value)
    assert "evil_kvemb_test_module" not in sys.modules


def test_all_modes_are_covered():
    assert {mode for mode, _ in MODES} == set(POSTPROCESSING_MODES)


def test_document_statistics_need_document_texts_and_sides(methods):
    with pytest.raises(ValueError, match="document_statistics needs document_texts and a model with sides"):
        add_postprocessing(methods["kv"], TEXTS, "whiten", document_texts=TEXTS[:20], document_statistics=True)
    assert not isinstance(methods["kv"][-1], PostProcessing)  # nothing was appended
