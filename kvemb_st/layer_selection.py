"""Which layers get the re-routed KV prefix: chosen by intrinsic dimensionality, or given explicitly.

Automatic selection follows the design notes (``shared/README.md`` §2): the TwoNN intrinsic dimension (ID) of the
final-token hidden state is computed after every decoder layer on templated calibration texts
(:mod:`kvemb_st.id_curve`, cached by :mod:`kvemb_st.id_curve_cache`), and a window of layers is placed on that
curve (:mod:`kvemb_st.window_rule`); explicit specs are checked by :mod:`kvemb_st.layer_spec`. The whole curve and
every parameter are recorded so a reader of the saved config can see -- and redo -- the choice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers.utils import logging

from kvemb_st.calibration import calibration_hash
from kvemb_st.id_curve import compute_id_curve
from kvemb_st.id_curve_cache import cache_key, default_cache_dir, read_cached_curve, write_cached_curve
from kvemb_st.layer_spec import AUTO, explicit_layers
from kvemb_st.window_rule import (
    SelectionParams,
    curve_spread,
    is_flat,
    mean_position,
    near_minimum,
    place_window,
    selection_warnings,
)

logger = logging.get_logger(__name__)


@dataclass
class LayerSelection:
    """The chosen layers and everything needed to explain them; ``to_dict`` goes into the saved config."""

    layers: list[int]
    mode: str  # "auto" or "explicit"
    id_curve: list[float]
    calibration_hash: str
    num_calibration_texts: int
    estimator: str
    params: dict[str, Any] = field(default_factory=dict)
    argmin: int | None = None
    near_minimum: list[int] | None = None  # layers within min_tolerance standard errors of the minimum
    anchor_layer: int | None = None  # the window's anchor: the mean position of near_minimum, rounded
    window: list[int] | None = None  # [first, last] layer of the window, inclusive
    flat_curve: bool = False
    spread: float | None = None  # the curve's relative spread (curve_spread)
    warnings: list[str] = field(default_factory=list)  # what a user should check (selection_warnings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



# ----------------------------------------------------------------------------------------- together
def select_layers(
    model: PreTrainedModel,
    tokenizer: Any,
    *,
    base_model: str,
    base_revision: str | None,
    template: str,
    texts: Sequence[str],
    layers: str | Sequence[int] = AUTO,
    params: SelectionParams | None = None,
    estimator: str = "mle",
    max_seq_length: int = 512,
    batch_size: int = 32,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> LayerSelection:
    """Compute (or load from cache) the ID curve of ``model`` and choose the layers.

    ``layers`` is ``"auto"`` or an explicit spec; explicit layers are range-checked and recorded
    alongside the curve, so the saved config and plot show where they sit on it.
    """
    params = params or SelectionParams()
    num_layers = model.config.num_hidden_layers
    chosen = None if layers == AUTO else explicit_layers(layers, num_layers)
    if chosen is None:
        params.width(num_layers)  # fail on a too-wide window before the forward passes
    calib_hash = calibration_hash(texts)
    cache_file = Path(cache_dir or default_cache_dir()) / (
        cache_key(base_model, base_revision, template, calib_hash, estimator, max_seq_length) + ".json"
    )
    curve = read_cached_curve(cache_file, num_layers) if use_cache else None
    if curve is None:
        curve = compute_id_curve(
            model, tokenizer, texts, template,
            max_seq_length=max_seq_length, batch_size=batch_size, estimator=estimator, progress=progress,
        )  # fmt: skip
        if use_cache:
            write_cached_curve(cache_file, curve)
    else:
        logger.info(f"ID curve loaded from cache {cache_file}")
    common = dict(
        id_curve=curve, calibration_hash=calib_hash, num_calibration_texts=len(texts), estimator=estimator,
        spread=curve_spread(curve, params.skip_fraction),
    )  # fmt: skip
    if chosen is not None:
        return LayerSelection(layers=chosen, mode="explicit", **common)
    argmin, near = near_minimum(curve, params, len(texts))
    anchor = mean_position(near)
    window = place_window(anchor, num_layers, params)
    warnings = selection_warnings(curve, window, params.skip_fraction)
    if warnings:
        logger.warning("; ".join(warnings))
    return LayerSelection(
        layers=window,
        mode=AUTO,
        params=asdict(params),
        argmin=argmin,
        near_minimum=near,
        anchor_layer=anchor,
        window=[window[0], window[-1]],
        flat_curve=is_flat(curve, params.skip_fraction),
        warnings=warnings,
        **common,
    )
