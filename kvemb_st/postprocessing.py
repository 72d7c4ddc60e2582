"""Calibrated post-processing of sentence embeddings: centering, top-PC removal, whitening.

Training-free LLM embeddings crowd into a narrow cone: one common direction (and a few dominant ones)
carry most of the variance, so every cosine is high and differences are small. Statistics of a few
hundred unlabelled calibration texts undo this without any training: subtract their mean (``center``),
also project out their top principal directions (``remove_pcs``, Mu & Viswanath 2018), or whiten with
their covariance (``whiten``, Su et al. 2021), which may also shrink the vector to its top directions.

:class:`PostProcessing` is a sentence-transformers module that runs after the embedding module. Its
folder holds a small JSON config and ``statistics.safetensors`` with the calibration mean and one matrix
(never backbone weights). It re-normalises its output, in float32 whatever the backbone's dtype.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sentence_transformers.base.modules import Router
from sentence_transformers.base.modules.module import Module

from kvemb_st.chunking import CHUNK_ROWS
from kvemb_st.folder import REMEDY, CheckedConfigMixin, damaged, load_float32_tensors
from kvemb_st.side_router import side_router

POSTPROCESSING_MODES = ("center", "remove_pcs", "whiten")
STATISTICS_FILE = "statistics.safetensors"
# Whitening divides by sqrt(eigenvalue); eigenvalues below this fraction of the largest are raised to it.
# Directions the calibration set barely spans (or, with fewer texts than dimensions, not at all) would
# otherwise be amplified without bound, and their eigenvalues are mostly sampling noise: on SmolLM2
# (512 calibration texts, 576 dimensions, STS-B dev 500 pairs) a floor of 1e-6 scored 0.715, below the raw
# vectors' 0.740, while 1e-2 scored 0.798 (3e-3: 0.795, 3e-2: 0.798, 1e-1: 0.789).
DEFAULT_EIGENVALUE_FLOOR = 1e-2
_MATRIX = {"center": None, "remove_pcs": "directions", "whiten": "projection"}  # mode -> its matrix buffer


def check_postprocessing_args(mode: str, components: int | None, eigenvalue_floor: float | None = None) -> None:
    """Validate the arguments before any model is run (the dimension is checked when fitting)."""
    if mode not in POSTPROCESSING_MODES:
        raise ValueError(f"unknown post-processing mode {mode!r}; expected one of {', '.join(POSTPROCESSING_MODES)}")
    if components is not None and (isinstance(components, bool) or not isinstance(components, int) or components < 1):
        raise ValueError(f"post-processing components must be a positive integer or None, got {components!r}")
    if mode == "center" and components is not None:
        raise ValueError("post-processing mode 'center' takes no components (they apply to remove_pcs and whiten)")
    if mode == "remove_pcs" and components is None:
        raise ValueError("post-processing mode 'remove_pcs' needs components: how many top directions to remove")
    floor = eigenvalue_floor
    if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor < 1):
        raise ValueError(f"eigenvalue_floor is a fraction of the largest eigenvalue in (0, 1), got {floor!r}")


class PostProcessing(CheckedConfigMixin, Module):
    """Affine map fitted on calibration embeddings, then L2 normalisation (a sentence-transformers module).

    ``center``: ``x - mean``; ``remove_pcs``: also minus the projection on the top-``components`` principal
    directions (``directions``, ``(in_features, components)``, orthonormal); ``whiten``: ``(x - mean) @
    projection`` with ``projection`` ``(in_features, out_features)`` = top eigenvectors of the calibration
    covariance scaled by ``1/sqrt(eigenvalue)``. Build one with :func:`fit_postprocessing`.

    Args:
        mode: One of :data:`POSTPROCESSING_MODES`.
        in_features: Dimension of the incoming embeddings.
        components: Directions removed (``remove_pcs``) or output dimension (``whiten``; ``None`` = full).
        eigenvalue_floor: ``whiten`` only: the floor used when fitting (a record; the projection holds it).
        calibration: Provenance recorded in the config (``name``, ``hash``, ``count`` of the texts).
        mean, directions, projection: The statistics; zeros of the right shape until loaded or fitted.

    Sides with statistics of their own get one module each, in a ``Router`` (:mod:`kvemb_st.side_router`).
    """

    config_keys = ["mode", "in_features", "components", "eigenvalue_floor", "calibration"]

    def __init__(
        self,
        mode: str,
        in_features: int,
        components: int | None = None,
        eigenvalue_floor: float | None = None,
        calibration: Mapping[str, Any] | None = None,
        *,
        mean: torch.Tensor | None = None,
        directions: torch.Tensor | None = None,
        projection: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"PostProcessing in_features must be a positive integer, got {in_features!r}")
        check_postprocessing_args(mode, components, eigenvalue_floor)
        check_components(mode, components, in_features)
        self.mode = mode
        self.in_features = in_features
        self.components = components
        self.eigenvalue_floor = eigenvalue_floor
        self.calibration = dict(calibration) if calibration is not None else None
        given = {"mean": mean, "directions": directions, "projection": projection}
        for name, shape in self.statistics_shapes().items():
            value = given.pop(name, None)
            value = torch.zeros(shape) if value is None else torch.as_tensor(value, dtype=torch.float32)
            if tuple(value.shape) != shape:
                raise ValueError(f"PostProcessing({mode!r}): '{name}' has shape {tuple(value.shape)}, expected {shape}")
            self.register_buffer(name, value.to(torch.float32).contiguous())
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise ValueError(f"PostProcessing({mode!r}) takes no {', '.join(extra)}")

    def statistics_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each tensor in the statistics file (all float32)."""
        shapes: dict[str, tuple[int, ...]] = {"mean": (self.in_features,)}
        matrix = _MATRIX[self.mode]
        if matrix:
            shapes[matrix] = (self.in_features, self.components if matrix == "directions" else self.out_features)
        return shapes

    @property
    def out_features(self) -> int:
        return self.components if self.mode == "whiten" and self.components is not None else self.in_features

    def get_embedding_dimension(self) -> int:
        return self.out_features

    # ------------------------------------------------------------------------------------------ apply
    def transform_tensor(self, embeddings: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The transform on a ``(N, in_features)`` tensor, in float32; L2-normalised unless ``normalize=False``."""
        if embeddings.shape[-1] != self.in_features:
            raise ValueError(
                f"post-processing expects {self.in_features}-dimensional embeddings, got {embeddings.shape[-1]}: "
                "it was fitted on another model's vectors"
            )
        x = embeddings.float() - self.mean.float()  # .float(): float32 after a model-wide .half()
        if self.mode == "remove_pcs":
            directions = self.directions.float()
            x = x - (x @ directions) @ directions.T
        elif self.mode == "whiten":
            x = x @ self.projection.float()
        return F.normalize(x, dim=-1) if normalize else x

    def transform(self, embeddings: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Same as ``forward`` for precomputed vectors ``(N, in_features)`` -> float32 ``(N, out_features)``."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(embeddings), device=self.mean.device)
            return self.transform_tensor(x, normalize).cpu().numpy()

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Transform each vector; chunk rows left for this module (``chunk_combine="after"``) are transformed one by
        one and then averaged per text, replacing the vector the embedding module combined before."""
        rows = features.pop(CHUNK_ROWS, None)
        if rows is not None:
            features["sentence_embedding"] = rows.combine(self.transform_tensor)
        else:
            features["sentence_embedding"] = self.transform_tensor(features["sentence_embedding"])
        return features

    # ------------------------------------------------------------------------------------- save / load
    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Config JSON plus the statistics as safetensors (always; pickle is never written)."""
        self.save_config(output_path)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in self.statistics_shapes()}
        save_file(tensors, os.path.join(output_path, STATISTICS_FILE), metadata={"mode": self.mode})

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> PostProcessing | Router:
        """The module of a saved folder; a folder of kvemb-st 0.1 whose config holds ``side_statistics`` (named
        statistics sets in one file) loads as the :func:`~kvemb_st.side_router.side_router` it stands for."""
        hub_kwargs = dict(subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision,
                          local_files_only=local_files_only)  # fmt: skip
        where = os.path.join(model_name_or_path, subfolder)
        config_path = os.path.join(where, cls.config_file_name)
        config = cls.load_config(model_name_or_path, **hub_kwargs)
        legacy_sides = config.pop("side_statistics", None)
        unknown = sorted(set(config) - set(cls.config_keys))
        if not config or unknown or "mode" not in config or "in_features" not in config:
            raise ValueError(
                f"{config_path} is not a kvemb_st PostProcessing config (keys: {sorted(config)}); "
                f"expected {cls.config_keys}. A folder written by a newer kvemb-st needs that version."
            )
        path = cls.load_file_path(model_name_or_path, STATISTICS_FILE, **hub_kwargs)
        if path is None:
            raise ValueError(f"{where} has no {STATISTICS_FILE}: the post-processing statistics are missing; {REMEDY}")
        try:
            module = cls(**config)
        except (ValueError, TypeError) as err:
            raise damaged(config_path, str(err)) from None
        needs = f"mode {config['mode']!r} with in_features={config['in_features']}, components={config.get('components')}"
        if legacy_sides:
            return _legacy_side_statistics(module, legacy_sides, path, config_path, needs)
        tensors = load_float32_tensors(path, module.statistics_shapes(), f"{config_path} ({needs})")
        return cls(**config, **tensors)


def _legacy_side_statistics(first: PostProcessing, sides: Any, path: str, config_path: str, needs: str) -> Router:
    """kvemb-st 0.1 kept the side statistics sets in the same file as the first, as ``<name>_mean`` etc., and named
    each side's set in ``side_statistics`` (e.g. ``{"query": "document", "document": "document"}``)."""
    if not isinstance(sides, Mapping) or not all(isinstance(name, str) and name.isidentifier() for name in sides.values()):
        raise damaged(config_path, f"'side_statistics' must map sides to statistics names, got {sides!r}")
    names, own = sorted(set(sides.values())), first.statistics_shapes()
    shapes = {**own, **{f"{name}_{key}": shape for name in names for key, shape in own.items()}}
    tensors = load_float32_tensors(path, shapes, f"{config_path} ({needs}, side statistics {names})")
    calibration = first.calibration or {}

    def statistics(prefix: str, record: Mapping[str, Any] | None) -> PostProcessing:
        return PostProcessing(first.mode, first.in_features, first.components, first.eigenvalue_floor, record,
                              **{key: tensors[prefix + key] for key in own})  # fmt: skip

    default = statistics("", {key: value for key, value in calibration.items() if key not in names})
    try:
        return side_router(default, {name: statistics(f"{name}_", calibration.get(name)) for name in names}, sides)
    except ValueError as err:
        raise damaged(config_path, f"'side_statistics' {sides!r}: {err}") from None


def check_components(mode: str, components: int | None, dimension: int) -> None:
    if components is None:
        return
    if mode == "remove_pcs" and components >= dimension:
        raise ValueError(
            f"cannot remove {components} principal directions from {dimension}-dimensional embeddings: "
            f"remove fewer than {dimension}"
        )
    if mode == "whiten" and components > dimension:
        raise ValueError(
            f"cannot whiten {dimension}-dimensional embeddings to {components} dimensions: "
            f"components must be at most {dimension}"
        )
