"""Which layers get the re-routed KV prefix: chosen by intrinsic dimensionality, or given explicitly.

Automatic selection follows the design notes (``shared/README.md`` §2): the TwoNN intrinsic dimension
(ID) of the final-token hidden state is computed after every decoder layer on templated calibration
texts; the first layers are skipped (their low ID reflects token identity, not compression), and a
window of layers is centred on (or starts at) the ID minimum. "The minimum" is every layer whose ID is
within one standard error of the lowest value: on a flat curve (Qwen2.5-0.5B's spans 10.3-12.6) the
single lowest layer is noise -- 64 or 512 calibration texts put it at layer 12 or 19 -- so the window is
anchored at the mean position of all layers that could be the minimum. The whole curve and every
parameter are recorded so a reader of the saved config can see -- and redo -- the choice.

ID curves are cached on disk per (base model, revision, template, calibration hash, estimator), so a
rebuild with other knobs does not run the calibration forward passes again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.utils import logging

from kvemb_st.assets import cache_root
from kvemb_st.calibration import calibration_hash
from kvemb_st.config import ConfigError, parse_layer_spec
from kvemb_st.intrinsic_dim import ESTIMATORS, twonn
from kvemb_st.pooling import last_token_index
from kvemb_st.prompting import Template, TemplateTokenizer

logger = logging.get_logger(__name__)

AUTO = "auto"
ANCHORS = ("start", "center")
DEFAULT_SKIP_FRACTION = 0.2
DEFAULT_WINDOW_FRACTION = 1 / 3  # chosen on STS-B dev, see results/layer_window_sts_dev.md
DEFAULT_ANCHOR = "center"
DEFAULT_MIN_TOLERANCE = 1.0  # standard errors; see SelectionParams.min_tolerance
# A curve is flat when the range of its eligible layers (past the skipped ones) is below this fraction of their
# mean: its minimum is then within a few standard errors of most layers. Measured relative spreads (512 texts):
# SmolLM2-135M 0.39 (a clear dip), Qwen2.5-0.5B 0.15 (the flat curve whose minimum was noise).
FLAT_SPREAD = 0.2
END_LAYERS = 2  # a window reaching the last two layers, which specialise in next-token prediction, is flagged
# ...and by default never placed there: on three backbones this cap was the rule that landed within 0.005 STS-B dev
# of the best swept window (results/windows/decision.md); it moves SmolLM2's window from 20-29 to 18-27.
DEFAULT_END_MARGIN = END_LAYERS
CACHE_FORMAT = 1


@dataclass(frozen=True)
class SelectionParams:
    """How a window is placed on the ID curve.

    Attributes:
        skip_fraction: Fraction of the first layers never considered for the minimum, in [0, 1).
        window: Window width in layers; ``None`` means ``round(window_fraction * num_layers)`` (at least 1).
        window_fraction: Width relative to the model's depth, so one default fits models of any depth.
        anchor: ``center`` -- the minimum is in the window's middle; ``start`` -- the window starts at it.
            Either way the window is shifted to stay inside the model.
        min_tolerance: Layers whose ID is at most ``min_tolerance`` standard errors above the lowest value
            count as the minimum, and the window is anchored at their mean position. The standard error is
            that of the TwoNN maximum-likelihood estimate, ``d / sqrt(N)`` for ``N`` calibration texts. ``0``
            anchors at the single lowest layer.
        end_margin: The window is shifted back so that it ends at least this many layers before the last one
            (``0``: it may end at the last layer), as far as the model's depth allows.
    """

    skip_fraction: float = DEFAULT_SKIP_FRACTION
    window: int | None = None
    window_fraction: float = DEFAULT_WINDOW_FRACTION
    anchor: str = DEFAULT_ANCHOR
    min_tolerance: float = DEFAULT_MIN_TOLERANCE
    end_margin: int = DEFAULT_END_MARGIN

    def __post_init__(self) -> None:
        if isinstance(self.skip_fraction, bool) or not (
            isinstance(self.skip_fraction, (int, float)) and 0.0 <= self.skip_fraction < 1.0
        ):
            raise ValueError(f"skip_fraction must be a number in [0, 1), got {self.skip_fraction!r}")
        if self.window is not None and (
            isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1
        ):
            raise ValueError(f"window must be a positive number of layers (or None), got {self.window!r}")
        if isinstance(self.window_fraction, bool) or not (
            isinstance(self.window_fraction, (int, float)) and 0.0 < self.window_fraction <= 1.0
        ):
            raise ValueError(f"window_fraction must be a number in (0, 1], got {self.window_fraction!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if isinstance(self.min_tolerance, bool) or not (
            isinstance(self.min_tolerance, (int, float)) and 0.0 <= self.min_tolerance < math.inf
        ):
            raise ValueError(f"min_tolerance must be a finite number of standard errors >= 0, got {self.min_tolerance!r}")
        if isinstance(self.end_margin, bool) or not isinstance(self.end_margin, int) or self.end_margin < 0:
            raise ValueError(f"end_margin must be a number of layers >= 0, got {self.end_margin!r}")

    def width(self, num_layers: int) -> int:
        if self.window is not None:
            if self.window > num_layers:
                raise ValueError(
                    f"window of {self.window} layers does not fit a base model with {num_layers} layers; "
                    f"use a window of at most {num_layers}"
                )
            return self.window
        return max(1, round(self.window_fraction * num_layers))


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


# ------------------------------------------------------------------------------------------ choosing
def explicit_layers(spec: str | int | Sequence[int], num_layers: int) -> list[int]:
    """Parse ``"20-29"``, ``"3,5,7"`` or a list and check it against the base model's depth."""
    try:
        layers = [] if isinstance(spec, str) and not spec.strip() else parse_layer_spec(spec)
    except ConfigError as err:
        raise ValueError(f"invalid layer selection {spec!r}: {err}") from None
    if not layers:
        raise ValueError(
            f"layer selection {spec!r} is empty: give at least one layer (e.g. '20-29'), or '{AUTO}' to choose "
            "by intrinsic dimension"
        )
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(
            f"layers {bad} in {spec!r} are out of range for a base model with {num_layers} layers "
            f"(valid: 0..{num_layers - 1})"
        )
    return layers


def format_layer_spec(layers: Sequence[int]) -> str:
    """The inverse of :func:`~kvemb_st.config.parse_layer_spec`: ``[3, 5, 6, 7]`` -> ``"3,5-7"``."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def first_eligible(num_layers: int, skip_fraction: float) -> int:
    """The first layer that may hold the minimum (the earlier ones are skipped)."""
    return min(int(skip_fraction * num_layers), num_layers - 1)


def curve_spread(id_curve: Sequence[float], skip_fraction: float = DEFAULT_SKIP_FRACTION) -> float:
    """``(max - min) / mean`` of the ID over the eligible layers: how much the curve says about its minimum."""
    eligible = id_curve[first_eligible(len(id_curve), skip_fraction) :]
    return (max(eligible) - min(eligible)) / abs(sum(eligible) / len(eligible))


def is_flat(id_curve: Sequence[float], skip_fraction: float = DEFAULT_SKIP_FRACTION) -> bool:
    """Whether the curve's relative spread is below :data:`FLAT_SPREAD`."""
    return curve_spread(id_curve, skip_fraction) < FLAT_SPREAD


def selection_warnings(id_curve: Sequence[float], window: Sequence[int], skip_fraction: float) -> list[str]:
    """What a user of a new model should check about an automatic window: a flat curve, a window at the end.

    Both are the failures seen so far: Qwen2.5-0.5B's flat curve (spread 0.15) first put the window at the last
    layer, and on a 28-layer Qwen2 model a late ID minimum pushed it to layers 19-27, where re-routing added
    nothing over PromptEOL while windows ending earlier did.
    """
    warnings = []
    spread = curve_spread(id_curve, skip_fraction)
    if spread < FLAT_SPREAD:
        warnings.append(
            f"the ID curve is flat (relative spread {spread:.2f} < {FLAT_SPREAD}: max - min over the eligible layers "
            f"divided by their mean), so its minimum says little and layers {window[0]}-{window[-1]} were chosen "
            "mostly by position"
        )
    last = len(id_curve) - 1
    if window[-1] > last - END_LAYERS:
        warnings.append(
            f"the window {window[0]}-{window[-1]} reaches the last {END_LAYERS} layers ({last - END_LAYERS + 1}-{last} "
            "of this model), which specialise in next-token prediction; there re-routing has added little on some "
            "models"
        )
    if warnings:
        warnings.append("check the window on labelled dev data, or pass explicit layers (--layers START-END)")
    return warnings


def near_minimum(id_curve: Sequence[float], params: SelectionParams, num_points: int | None) -> tuple[int, list[int]]:
    """``(argmin, layers)``: the lowest eligible layer, and every eligible layer whose ID is within
    ``params.min_tolerance`` standard errors (``d / sqrt(num_points)``) of it.

    Values within 1e-9 relative of the lowest tie: all of them are near the minimum, and ``argmin`` is the
    earliest. Without ``num_points`` (or with a tolerance of 0) only such ties count.
    """
    num_layers = len(id_curve)
    if num_layers == 0:
        raise ValueError("the ID curve is empty: the base model reports no layers")
    bad = [i for i, value in enumerate(id_curve) if not math.isfinite(value)]
    if bad:
        raise ValueError(
            f"the ID curve is not finite at layers {bad} ({[id_curve[i] for i in bad]}): the calibration "
            "states there are (nearly) identical; use more and more varied calibration texts"
        )
    if num_points is not None and num_points < 1:
        raise ValueError(f"num_points must be the number of calibration texts (>= 1), got {num_points!r}")
    first = first_eligible(num_layers, params.skip_fraction)
    lowest = min(id_curve[first:])
    argmin = next(i for i in range(first, num_layers) if id_curve[i] <= lowest + 1e-9 * abs(lowest))
    margin = 0.0 if num_points is None else params.min_tolerance * abs(lowest) / math.sqrt(num_points)
    near = [i for i in range(first, num_layers) if id_curve[i] <= lowest + margin + 1e-9 * abs(lowest)]
    return argmin, near


def mean_position(layers: Sequence[int]) -> int:
    """The mean of ``layers``, rounded half up (the window's anchor)."""
    return math.floor(sum(layers) / len(layers) + 0.5)


def select_window(
    id_curve: Sequence[float], params: SelectionParams, num_points: int | None = None
) -> tuple[list[int], int]:
    """Return ``(layers, argmin)``: a contiguous window anchored at the ID minimum past the skipped layers.

    The anchor is the mean position of the near-minimum layers (:func:`near_minimum`, rounded half up);
    ``num_points`` is the number of calibration texts behind the curve. A flat curve thus yields a window
    around the middle of the eligible layers, and the caller warns.
    """
    argmin, near = near_minimum(id_curve, params, num_points)
    return place_window(mean_position(near), len(id_curve), params), argmin


def place_window(anchor: int, num_layers: int, params: SelectionParams) -> list[int]:
    """The window of ``params.width`` layers centred on (or starting at) ``anchor``, shifted to fit the model and to
    end ``params.end_margin`` layers before its last one (on a model too shallow for that, it starts at layer 0)."""
    width = params.width(num_layers)
    start = anchor if params.anchor == "start" else anchor - (width - 1) // 2
    start = max(0, min(start, num_layers - width - params.end_margin))
    return list(range(start, start + width))


# ------------------------------------------------------------------------------------- the ID curve
@torch.inference_mode()
def compute_id_curve(
    model: PreTrainedModel,
    tokenizer: Any,
    texts: Sequence[str],
    template: str,
    *,
    max_seq_length: int = 512,
    batch_size: int = 32,
    estimator: str = "mle",
    progress: bool = True,
) -> list[float]:
    """TwoNN ID of the final-token state after each decoder layer, on ``texts`` wrapped in ``template``.

    The forward pass is the plain one (no re-routing). Layer ``l``'s value is that of its *output*: the
    input of layer 0 is the final token's embedding, which a template makes identical for every text.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown TwoNN estimator {estimator!r}; expected one of {ESTIMATORS}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    encoder = TemplateTokenizer(tokenizer, max_seq_length)
    parsed = Template.parse(template)
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_hidden_layers)]
    by_length = sorted(texts, key=len)  # less padding; TwoNN does not depend on the order of the points
    batches = range(0, len(by_length), batch_size)
    for start in tqdm(batches, desc="ID curve: calibration batches", unit="batch", disable=not progress):
        features, _ = encoder.encode(by_length[start : start + batch_size], parsed)
        input_ids, attention_mask = features["input_ids"].to(device), features["attention_mask"].to(device)
        output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        rows = torch.arange(input_ids.shape[0], device=device)
        last = last_token_index(attention_mask)
        for layer, hidden in enumerate(output.hidden_states[1:]):
            per_layer[layer].append(hidden[rows, last].float().cpu())
    return [twonn(torch.cat(states), estimator) for states in per_layer]


def _source_fingerprint(base_model: str) -> list[Any] | None:
    """Size and mtime of a local model's files, so that a model re-saved at the same path is not a cache hit."""
    path = Path(base_model)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    else:
        return None  # a Hub id: the revision identifies it
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cache_key(
    base_model: str, revision: str | None, template: str, calib_hash: str, estimator: str, max_seq_length: int
) -> str:
    local = os.path.exists(base_model)
    key = {
        "format": CACHE_FORMAT,
        "base_model": os.path.abspath(base_model) if local else base_model,
        "revision": revision,
        "fingerprint": _source_fingerprint(base_model),
        "template": template,
        "calibration_hash": calib_hash,
        "estimator": estimator,
        "max_seq_length": max_seq_length,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    return cache_root() / "id_curves"


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
    curve = _read_cached_curve(cache_file, num_layers) if use_cache else None
    if curve is None:
        curve = compute_id_curve(
            model, tokenizer, texts, template,
            max_seq_length=max_seq_length, batch_size=batch_size, estimator=estimator, progress=progress,
        )  # fmt: skip
        if use_cache:
            _write_cached_curve(cache_file, curve)
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


def _read_cached_curve(path: Path, num_layers: int) -> list[float] | None:
    try:
        with open(path, encoding="utf-8") as f:
            curve = json.load(f)["id_curve"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(curve, list) or len(curve) != num_layers:
        return None
    return [float(value) for value in curve]


def _write_cached_curve(path: Path, curve: list[float]) -> None:
    """Write atomically (temp file + rename): concurrent builds must never read a half-written curve."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"id_curve": curve}, f)
    os.replace(tmp, path)
