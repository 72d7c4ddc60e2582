"""One side of a model: how ``encode``, ``encode_query`` or ``encode_document`` wraps a text and reads out its vector.

A side's knobs are declared here once, as the fields of :class:`Side`, each with its check and its help text;
the config's top-level knobs and per-side overrides, the ``kvemb build`` flags and the model card derive from
them. A knob is one line here, ``name: type = knob(help, check, default, **argparse_options)``, plus the field of
the same name and default in :class:`~kvemb_st.config.KVEmbeddingConfig` that holds plain ``encode``'s value (a
test checks that every knob has one): the saved format keeps the top-level knobs flat.

sentence-transformers names the side of a call by its ``task`` (``encode_query`` / ``encode_document`` set it).
``encode(prompt_name="document")`` hands a module only the prompt's *text*, so each side's ST prompt is a tag,
:func:`side_tag`, that the module recognises by name and never inserts into the text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from kvemb_st.pooling import (
    DEFAULT_LAST_WEIGHT,
    POOLING_MODES,
    SPANS,
    Readout,
    check_last_weight,
    check_mode,
    check_span,
)

SIDE_NAMES = ("query", "document")
"""The sides a model may set, named as the ``task`` that ``encode_query`` / ``encode_document`` pass."""
TEXT_PLACEHOLDER = "{text}"
_TAG = re.compile(r"<kvemb-side:([^<>]*)>")
TAG_START = "<kvemb-side:"
LONG_INPUTS = ("truncate", "chunk")
"""What happens to a text over ``max_seq_length`` (see :mod:`kvemb_st.chunking`)."""
CHUNK_WEIGHTS = ("equal", "tokens")
"""How the chunk vectors of one text are averaged."""
CHUNK_COMBINE = ("before", "after")
"""Where the chunk vectors of one text are averaged: before the post-processing module or after it."""


class SideError(ValueError):
    """A side knob holds a bad value; ``key`` names the knob so that a config can name its file and key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"side knob '{key}': {problem}")
        self.key, self.problem = key, problem


def _template(value: Any) -> str:
    if not isinstance(value, str) or TEXT_PLACEHOLDER not in value:
        raise ValueError(f"must be a string with a '{TEXT_PLACEHOLDER}' placeholder, got {value!r}")
    if TAG_START in value:
        raise ValueError(f"may not hold '{TAG_START}', which marks the sides' prompt names, got {value!r}")
    return value


def _layers(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    layers = tuple(value) if isinstance(value, (list, tuple)) else ()
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
        raise ValueError(f"must be null (the final output) or a non-empty list of layers >= 0, got {value!r}")
    return tuple(sorted(set(layers)))


def _choice(allowed: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {allowed}, got {value!r}")
        return value

    return check


def knob(help: str, check: Callable[[Any], Any], default: Any = MISSING, **cli: Any) -> Any:
    """A :class:`Side` field: ``check`` validates and normalises a value (raising ``ValueError``); ``help`` and
    ``cli`` (argparse options such as ``choices``, ``type``) make its ``kvemb build`` flags."""
    return field(default=default, metadata={"help": help, "check": check, "cli": cli})


@dataclass(frozen=True, kw_only=True)
class Side:
    """How one side wraps a text (``template``) and reads out its vector (the :class:`~kvemb_st.pooling.Readout`
    knobs). Validated and normalised when made; a bad value raises :class:`SideError` naming the knob.

    The forward knobs (re-routed layers, bias, RoPE) and the base model are not a side's: every side of a model
    runs the same forward, so its vectors stay comparable.
    """

    template: str = knob("prompt with one {text} placeholder (echo: two)", _template)
    pooling: str = knob("pooling of the hidden states", check_mode, choices=POOLING_MODES)
    last_weight: float = knob("weight of the last token in mean+last pooling", check_last_weight, DEFAULT_LAST_WEIGHT,
                              type=float)  # fmt: skip
    pool_layers: tuple[int, ...] | None = knob(
        "layers whose outputs are averaged and pooled, e.g. '14' or '12-16' (default: the final output)", _layers, None
    )
    pool_span: str = knob("tokens the mean runs over ('text': the text's own)", check_span, choices=SPANS)
    long_inputs: str = knob("a text over max_seq_length: 'truncate' it (end cut, template kept) or 'chunk' it "
                            "(sentence chunks embedded and averaged)", _choice(LONG_INPUTS), "truncate",
                            choices=LONG_INPUTS)  # fmt: skip
    chunk_weights: str = knob("weight of each chunk vector in the average ('chunk' only): 'equal' or its 'tokens'",
                              _choice(CHUNK_WEIGHTS), "equal", choices=CHUNK_WEIGHTS)  # fmt: skip
    chunk_combine: str = knob("where the chunk vectors are averaged ('chunk' only): 'before' the post-processing, "
                              "or 'after' it (each chunk post-processed)", _choice(CHUNK_COMBINE), "before",
                              choices=CHUNK_COMBINE)  # fmt: skip

    def __post_init__(self) -> None:
        for f in fields(self):
            try:
                object.__setattr__(self, f.name, f.metadata["check"](getattr(self, f.name)))
            except ValueError as err:
                raise SideError(f.name, str(err)) from None

    @property
    def readout(self) -> Readout:
        return Readout(self.pooling, self.last_weight, self.pool_layers, self.pool_span)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Side:
        """This side with some knobs replaced (validated again)."""
        unknown = sorted(set(overrides) - set(SIDE_KEYS))
        if unknown:
            raise ValueError(f"unknown side knob(s) {unknown}; a side sets only {list(SIDE_KEYS)}")
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The knobs as JSON values (layers as a list)."""
        values = {key: getattr(self, key) for key in SIDE_KEYS}
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


SIDE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Side))
"""Every knob a side has, in declaration order."""
READOUT_KEYS = ("pooling", "last_weight", "pool_layers", "pool_span")
"""The knobs :attr:`Side.readout` is made of (the card describes them together)."""


def flag_options(key: str) -> dict[str, Any]:
    """The argparse options (``help``, ``choices``, ``type``) of a knob's command-line flag."""
    metadata = next(f.metadata for f in fields(Side) if f.name == key)
    return {"help": metadata["help"], **metadata["cli"]}


def side_tag(name: str) -> str:
    """The ST prompt of side ``name``: a name tag, never text, so ``encode(prompt_name=name)`` reaches the side."""
    return f"{TAG_START}{name}>"


def tagged_side(prompt: str | None) -> str | None:
    """The side a prompt tags (``None``: the prompt is no tag); a text that looks like a tag but names no side is
    refused rather than embedded as text."""
    if not prompt or TAG_START not in prompt:
        return None
    match = _TAG.fullmatch(prompt)
    if match is None or match.group(1) not in SIDE_NAMES:
        raise ValueError(
            f"prompt {prompt!r} looks like a side tag but is none: the tags are "
            f"{', '.join(side_tag(name) for name in SIDE_NAMES)} (a side's ST prompt); pass instructions without "
            f"'{TAG_START}'"
        )
    return match.group(1)
