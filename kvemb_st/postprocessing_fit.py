"""Fitting post-processing: statistics of unlabelled calibration texts, computed once and appended to a model.

Kept apart from :class:`~kvemb_st.postprocessing.PostProcessing` (the module that applies them): a saved model
only needs to apply statistics, fitting them is a build step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Router

from kvemb_st.benchmark.identity import refresh_revision
from kvemb_st.calibration import calibration_hash
from kvemb_st.postprocessing import DEFAULT_EIGENVALUE_FLOOR, PostProcessing, check_components, check_postprocessing_args
from kvemb_st.side_router import side_router


def fit_postprocessing(
    embeddings: np.ndarray | torch.Tensor,
    mode: str,
    components: int | None = None,
    calibration: Mapping[str, Any] | None = None,
    eigenvalue_floor: float = DEFAULT_EIGENVALUE_FLOOR,
) -> PostProcessing:
    """Fit ``mode`` on calibration embeddings ``(N, dim)``; see :class:`PostProcessing`.

    Statistics are computed in float64 and stored in float32. The covariance is ``Xc.T @ Xc / (N - 1)``
    of the centred vectors, eigendecomposed with ``numpy.linalg.eigh``. For whitening, eigenvalues below
    ``eigenvalue_floor`` times the largest are raised to that floor: with fewer texts than dimensions the
    covariance is singular, and without a floor the unseen directions would be scaled without bound (the
    default, :data:`DEFAULT_EIGENVALUE_FLOOR`, also damps the noisy tail; see its comment).
    Asking for more directions than the texts can span (``components > N - 1``) is an error.
    """
    check_postprocessing_args(mode, components, eigenvalue_floor)
    x = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"calibration embeddings must be a (N, dim) array with N >= 2, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"calibration embeddings must be floating point, got {x.dtype}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"calibration embeddings hold NaN or inf (first in row {bad[0]}): check the model's output")
    count, dimension = x.shape
    check_components(mode, components, dimension)
    if components is not None and components > count - 1:
        raise ValueError(
            f"{count} calibration texts span at most {count - 1} directions, too few for {mode} with "
            f"components={components}: pass at least {components + 1} texts or fewer components"
        )
    x = x.astype(np.float64)
    mean = x.mean(axis=0)
    if mode == "center":
        return PostProcessing(mode, dimension, calibration=calibration, mean=torch.from_numpy(mean))
    centred = x - mean
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / (count - 1))
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]  # largest first
    if not eigenvalues[0] > 0:
        raise ValueError(
            f"the {count} calibration embeddings are all (nearly) the same vector: their covariance is zero, so "
            "no principal directions exist; use varied calibration texts"
        )
    kept = components if components is not None else dimension
    if mode == "remove_pcs":
        return PostProcessing(
            mode, dimension, components, calibration=calibration,
            mean=torch.from_numpy(mean), directions=torch.from_numpy(eigenvectors[:, :kept].copy()),
        )  # fmt: skip
    scales = 1.0 / np.sqrt(np.maximum(eigenvalues[:kept], eigenvalue_floor * eigenvalues[0]))
    return PostProcessing(
        mode, dimension, components, eigenvalue_floor, calibration,
        mean=torch.from_numpy(mean), projection=torch.from_numpy(eigenvectors[:, :kept] * scales),
    )  # fmt: skip


def calibration_record(texts: Sequence[str], name: str | None = None) -> dict[str, Any]:
    """Provenance of a calibration set for the config and the card: ``name``, ``hash`` and ``count``."""
    return {"name": name or f"<list of {len(texts)} texts>", "hash": calibration_hash(texts), "count": len(texts)}


def add_postprocessing(
    model: SentenceTransformer,
    texts: Sequence[str],
    mode: str = "whiten",
    components: int | None = None,
    batch_size: int = 32,
    *,
    calibration_name: str | None = None,
    eigenvalue_floor: float = DEFAULT_EIGENVALUE_FLOOR,
    document_texts: Sequence[str] = (),
    document_name: str | None = None,
    document_statistics: bool = False,
) -> SentenceTransformer:
    """Embed ``texts`` with ``model`` (its default prompt), fit ``mode`` and append the module; return ``model``.

    Works for any method (the statistics only see the output vectors), so baselines can be given the same
    treatment. ``document_texts`` are embedded with ``encode_document`` and join the fit: one transform for
    every side keeps queries and documents in one space, and a document side whose vectors differ from the
    default side's (another template or readout) is then whitened by statistics that saw such vectors.
    With ``document_statistics`` they get a fit of their own instead, used by every side of the model
    (``query`` and ``document``: they stay one space) while ``encode`` keeps the first fit, the two modules routed
    by side (:func:`~kvemb_st.side_router.side_router`); chosen when the two sides read out so differently that
    one fit serves neither (docs/results.md, "Documents").
    ``calibration_name`` / ``document_name`` name the sets in the saved config and card.
    """
    check_postprocessing_args(mode, components, eigenvalue_floor)
    if any(isinstance(module, (PostProcessing, Router)) for module in model):
        raise ValueError(
            "this model already has a PostProcessing module; fit on a model without one (its statistics would "
            "otherwise be computed on already post-processed vectors)"
        )
    texts, document_texts = list(texts), list(document_texts)
    options = dict(batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    config = getattr(model[0], "config", None)  # a KVEmbedding module's; other first modules have no sides
    sides = list(config.sides) if config is not None and hasattr(config, "sides") else []
    if document_statistics and not (document_texts and sides):
        raise ValueError("document_statistics needs document_texts and a model with sides (query/document) to use them")
    embeddings = model.encode(texts, **options)
    record = calibration_record(texts, calibration_name)
    documents = model.encode_document(document_texts, **options) if document_texts else None
    document_record = calibration_record(document_texts, document_name) if document_texts else None
    if document_statistics:
        module: PostProcessing | Router = side_router(
            fit_postprocessing(embeddings, mode, components, record, eigenvalue_floor),
            {"document": fit_postprocessing(documents, mode, components, document_record, eigenvalue_floor)},
            dict.fromkeys(sides, "document"),
        )
    else:
        if documents is not None:
            embeddings = np.concatenate([embeddings, documents])
            record = {**record, "document": document_record}
        module = fit_postprocessing(embeddings, mode, components, record, eigenvalue_floor)
    model.append(module.to(model.device))
    refresh_revision(model)  # not the model it was before: mteb must not hand it the earlier one's cached scores
    return model
