"""Explicit layer selections: checking a user's spec against the base model's depth, and writing one back."""

from __future__ import annotations

import re
from collections.abc import Sequence

from kvemb_st.errors import ConfigError

AUTO = "auto"  # the layer spec that asks for the window chosen by intrinsic dimension


def parse_layer_spec(spec: str | int | list[int] | tuple[int, ...] | range) -> list[int]:
    """Turn ``"20-29"``, ``"3,5,7"``, ``"3,10-12"``, an int or a list into a sorted list of layer indices.

    Duplicates are an error rather than silently merged: a duplicate usually means a typo.
    """
    if isinstance(spec, bool):
        raise ConfigError(f"layers must be integers, got {spec!r}")
    if isinstance(spec, int):
        items: list[int] = [spec]
    elif isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",")):
            match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if not match:
                raise ConfigError(f"cannot parse layer spec {spec!r}: use e.g. '20-29' or '3,5,7'")
            lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
            if hi < lo:
                raise ConfigError(f"layer range '{part}' in {spec!r} is reversed")
            items.extend(range(lo, hi + 1))
    else:
        items = list(spec)
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ConfigError(f"layers must be integers, got {layer!r} ({type(layer).__name__})")
    if len(set(items)) != len(items):
        dupes = sorted({x for x in items if items.count(x) > 1})
        raise ConfigError(f"duplicate layer indices {dupes} in {spec!r}")
    return sorted(items)


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
    """The inverse of :func:`parse_layer_spec`: ``[3, 5, 6, 7]`` -> ``"3,5-7"``."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
