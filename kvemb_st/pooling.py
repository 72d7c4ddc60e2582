"""Pooling of hidden states into one float32 vector per text, and the :class:`Readout` that says which.

Pooling runs in float32 whatever the backbone's dtype: averaging hundreds of bf16 states loses the
precision that cosine similarity needs, and users get the same dtype from every backbone.

A readout names the pooling, the layer(s) whose outputs are pooled and the tokens the mean runs over. The
model and the evaluation harness use the same :meth:`Readout.pool`, so a readout scored by the harness from
one forward pass is exactly what a model built with it returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvemb_st.layer_spec import parse_layer_spec

POOLING_MODES = ("mean", "last", "mean+last")
SPANS = ("all", "text")
DEFAULT_LAST_WEIGHT = 0.75


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's final real token; correct for right padding and for a mask with holes."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).amax(dim=1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    weights = attention_mask.to(torch.float32).unsqueeze(-1)
    return (hidden.to(torch.float32) * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def last_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask)].to(torch.float32)


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    mode: str,
    last_weight: float = 0.5,
    mean_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool ``hidden`` ``(B, T, H)`` over the real tokens of ``attention_mask`` ``(B, T)``.

    ``mean_mask`` (default: ``attention_mask``) limits the mean to some of the real tokens, e.g. the text's
    own tokens without the template's; the last token is always the final real token. ``mean+last`` mixes
    the two *normalised* vectors: the last-token state has a much larger norm than the mean in most LLMs,
    so an unnormalised sum would just be the last token.
    """
    mean_mask = attention_mask if mean_mask is None else mean_mask
    if mode == "mean":
        return mean_pool(hidden, mean_mask)
    if mode == "last":
        return last_pool(hidden, attention_mask)
    if mode == "mean+last":
        mean = F.normalize(mean_pool(hidden, mean_mask), dim=-1)
        last = F.normalize(last_pool(hidden, attention_mask), dim=-1)
        return (1.0 - last_weight) * mean + last_weight * last
    raise ValueError(f"unknown pooling mode {mode!r}; expected 'mean', 'last' or 'mean+last'")


def check_mode(mode: object) -> str:
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling {mode!r}; expected one of {', '.join(POOLING_MODES)}")
    return mode  # type: ignore[return-value]


def check_last_weight(last_weight: object) -> float:
    if (
        isinstance(last_weight, bool)
        or not isinstance(last_weight, (int, float))
        or not (math.isfinite(last_weight) and 0.0 <= last_weight <= 1.0)
    ):
        raise ValueError(f"the last-token weight must be a number in [0, 1], got {last_weight!r}")
    return float(last_weight)


def check_span(span: object) -> str:
    if span not in SPANS:
        raise ValueError(f"the mean's tokens must be one of {SPANS} ('text': the text's own tokens), got {span!r}")
    return span  # type: ignore[return-value]


def check_pooling(
    mode: object, last_weight: object, span: object = "all", where: str | Callable[[str], str] = "pooling"
) -> None:
    """The one validation of the pooling knobs (:func:`check_mode`, :func:`check_last_weight`, :func:`check_span`),
    for readouts and command-line readout specs alike.

    ``where`` prefixes the message: a string, or a function of the key (``pooling``, ``last_weight``,
    ``pool_span``) so that an error names the key that is wrong.
    """
    name = where if callable(where) else (lambda key: where)
    for key, check, value in (("pooling", check_mode, mode), ("last_weight", check_last_weight, last_weight),
                              ("pool_span", check_span, span)):  # fmt: skip
        try:
            check(value)
        except ValueError as err:
            raise ValueError(f"{name(key)}: {err}") from None


@dataclass(frozen=True)
class Readout:
    """What turns one forward pass into a vector.

    Attributes:
        pooling: ``mean``, ``last`` or ``mean+last`` (weight ``last_weight`` on the last token).
        last_weight: Weight of the last-token vector in ``mean+last``.
        layers: Decoder layers (0-based) whose outputs are averaged before pooling; ``None`` = the final
            output (after the model's final norm). Intermediate layers often embed better than the last
            one, which specialises in predicting the next token.
        span: Tokens the mean runs over: ``all`` real tokens, or the ``text``'s own (the template's left out).
    """

    pooling: str = "mean+last"
    last_weight: float = DEFAULT_LAST_WEIGHT
    layers: tuple[int, ...] | None = None
    span: str = "all"

    def __post_init__(self) -> None:
        check_pooling(self.pooling, self.last_weight, self.span, where=f"readout {self.name!r}")
        if self.layers is not None:
            if not self.layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
                raise ValueError(f"readout layers must be a non-empty list of layer indices >= 0, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))

    @classmethod
    def parse(cls, text: str) -> Readout:
        """``POOLING[:WEIGHT][/text][@LAYERS]``: ``last``, ``mean+last:0.5``, ``mean/text``, ``mean@15``,
        ``mean/text@12-16`` (the mean of layers 12..16), ``mean+last@final``."""
        spec, at, layers = text.partition("@")
        spec, slash, span = spec.partition("/")
        mode, colon, weight = spec.partition(":")
        if colon and mode != "mean+last":
            raise ValueError(f"pooling {text!r}: only mean+last takes a weight (e.g. mean+last:0.5)")
        if slash and span != "text":
            raise ValueError(f"pooling {text!r}: '/' takes 'text' (the mean over the text's own tokens), got {span!r}")
        try:
            value = float(weight) if colon else DEFAULT_LAST_WEIGHT
        except ValueError:
            value = math.nan
        check_pooling(mode, value, where=f"pooling {text!r}")
        chosen = None if not at or layers == "final" else tuple(parse_layer_spec(layers))
        return cls(mode, value, chosen, "text" if slash else "all")

    @property
    def name(self) -> str:
        name = f"{self.pooling}:{self.last_weight:g}" if self.pooling == "mean+last" else self.pooling
        name += "/text" if self.span == "text" else ""
        if self.layers is not None:
            lo, hi = self.layers[0], self.layers[-1]
            contiguous = list(self.layers) == list(range(lo, hi + 1))
            name += f"@{lo}-{hi}" if contiguous and hi > lo else "@" + ",".join(map(str, self.layers))
        return name

    def hidden_state_indices(self) -> list[int] | None:
        """Indices into transformers' ``hidden_states`` (0 = embeddings, ``i + 1`` = output of layer ``i``)."""
        return None if self.layers is None else [layer + 1 for layer in self.layers]

    def check_fits(self, num_layers: int, where: str = "readout") -> None:
        if self.layers is not None and self.layers[-1] >= num_layers:
            raise ValueError(
                f"{where}: pooled layers {list(self.layers)} out of range for a base model with {num_layers} layers "
                f"(valid: 0..{num_layers - 1})"
            )

    def states(self, final: torch.Tensor, hidden_states: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The ``(B, T, H)`` states this readout pools: ``final``, or the mean of its layers' outputs.

        ``hidden_states`` maps :meth:`hidden_state_indices` to their states. The last decoder layer's
        output is the final one (transformers hands out the normed state for it).
        """
        if self.layers is None:
            return final
        if hidden_states is None:
            raise ValueError(f"readout {self.name!r} pools layers {list(self.layers)}: their hidden states are needed")
        chosen = [hidden_states[index] for index in self.hidden_state_indices()]
        if len(chosen) == 1:
            return chosen[0]
        return torch.stack([state.to(torch.float32) for state in chosen]).mean(0)

    def pool(
        self,
        final: torch.Tensor,
        attention_mask: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        hidden_states: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The unnormalised ``(B, H)`` float32 vectors of a batch (see :func:`pool`)."""
        if self.span == "text" and text_mask is None:
            raise ValueError(f"readout {self.name!r} averages the text's own tokens: a text mask is needed")
        mean_mask = text_mask if self.span == "text" else None
        return pool(self.states(final, hidden_states), attention_mask, self.pooling, self.last_weight, mean_mask)


def pooled_layers(readouts: Sequence[Readout]) -> list[int] | None:
    """The hidden-state indices a set of readouts needs from one forward pass (``None``: the final output only)."""
    indices = sorted({index for readout in readouts for index in readout.hidden_state_indices() or ()})
    return indices or None
