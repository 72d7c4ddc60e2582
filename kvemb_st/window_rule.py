"""Where the re-routed window goes on an ID curve (the rule), and what a user should check about it.

The minimum past the skipped first layers is every layer whose ID is within one standard error of the lowest value:
on a flat curve (Qwen2.5-0.5B's spans 10.3-12.6) the single lowest layer is noise -- 64 or 512 calibration texts put
it at layer 12 or 19 -- so the window is anchored at the mean position of all layers that could be the minimum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ANCHORS = ("start", "center")
DEFAULT_SKIP_FRACTION = 0.2
DEFAULT_WINDOW_FRACTION = 1 / 3  # chosen on STS-B dev, see results/layer_window/smollm2/layer_window_sts_dev.md
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
