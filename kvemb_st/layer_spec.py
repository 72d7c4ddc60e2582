"""Explicit layer selections: checking a user's spec against the base model's depth, and writing one back."""

from __future__ import annotations

from collections.abc import Sequence

from kvemb_st.config import ConfigError, parse_layer_spec

AUTO = "auto"  # the layer spec that asks for the window chosen by intrinsic dimension


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
