"""The saved configuration of a KV-Embedding model, validated at the boundary.

Everything a saved folder holds about the model lives in one :class:`KVEmbeddingConfig`; weights never
do. Validation happens here, once, so that a bad hand-edited or downloaded ``kvemb_config.json`` fails
with a message naming the file and the key instead of producing wrong vectors later.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from collections.abc import Callable
from typing import Any

from kvemb_st.errors import ConfigError
from kvemb_st.layer_spec import parse_layer_spec
from kvemb_st.pooling import DEFAULT_LAST_WEIGHT, Readout
from kvemb_st.side import SIDE_KEYS, SIDE_NAMES, TEXT_PLACEHOLDER, Side, SideError
from kvemb_st.version import __version__

CONFIG_FILE_NAME = "kvemb_config.json"
ROPE_MODES = ("keep", "start", "relative0")
ROUTING_KNOBS = ("prefix_bias", "prefix_rope")  # read by method 'kv' only: inert (and kept at any value) for the rest
PROMPTEOL_TEMPLATE = 'This sentence : "{text}" means in one word:"'
COMPRESSION_TEMPLATE = "Context: {text}\nCompress the context in one word:"
NAMED_TEMPLATES = {"prompteol": PROMPTEOL_TEMPLATE, "compression": COMPRESSION_TEMPLATE}
ECHO_TEMPLATE = "Rewrite the sentence: {text}, rewritten sentence: {text}"
PLACEHOLDER = "<PST>"  # Token Prepending's placeholder token
TOKEN_PREPENDING_TEMPLATE = 'This sentence : <PST> "{text}" means in one word:"'


@dataclass(frozen=True)
class MethodDefaults:
    """What a config knows about an embedding method: data only (the behaviour lives in :mod:`kvemb_st.methods`).

    The number of ``{text}`` placeholders of the default template is the number of copies of the text every
    template of the method must hold (2 for echo, 1 otherwise).
    """

    template: str
    pooling: str
    pool_span: str = "all"

    @property
    def copies(self) -> int:
        return self.template.count(TEXT_PLACEHOLDER)


METHOD_DEFAULTS: dict[str, MethodDefaults] = {
    "kv": MethodDefaults(PROMPTEOL_TEMPLATE, "mean+last"),
    "mean": MethodDefaults(TEXT_PLACEHOLDER, "mean"),
    "last": MethodDefaults(TEXT_PLACEHOLDER, "last"),
    "prompteol": MethodDefaults(PROMPTEOL_TEMPLATE, "last"),
    "echo": MethodDefaults(ECHO_TEMPLATE, "mean", "text"),  # the mean over the text's second copy
    "token_prepending": MethodDefaults(TOKEN_PREPENDING_TEMPLATE, "last"),
}


def _where(source: str | None, key: str) -> str:
    return f"{source}: key '{key}'" if source else f"'{key}'"


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def is_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` as the Hub spells repo ids; anything else (``/abs``, ``../x``, ``a/b/c``) is a path."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not name.endswith(".gguf")


@dataclass
class KVEmbeddingConfig:
    """All knobs of a KV-Embedding model.

    Attributes:
        base_model: Hub id, local folder or path to a ``.gguf`` file of the frozen decoder-only LLM.
        base_revision: Hub revision (branch, tag or commit) of ``base_model``; ``None`` for the default.
        method: ``kv`` (KV-Embedding) or a training-free baseline run by the same module: ``mean``, ``last``,
            ``prompteol``, ``echo``, ``token_prepending`` (see :mod:`kvemb_st.methods` for each paper's recipe).
        layers: Decoder layers (0-based) whose attention gets the re-routed final-token key/value prefix.
            Empty means no re-routing (plain prompt-based embedding). Method ``kv`` only.
        tp_layers: Layers at whose input Token Prepending overwrites the placeholder's state (method
            ``token_prepending`` only); ``None`` = layers 1 .. 7/32 of the depth, the paper's setting.
        prefix_bias: Added to the prefix slot's attention logit; larger values draw more attention to it. 1.0 since
            MTEB's dev tasks chose it over 3.0 (``experiments/mteb/RULE.md``; folders written before keep their 3.0).
        prefix_rope: How the prefix key is positioned: ``keep`` (rotated at the final token's position),
            ``start`` (at position 0, like a real prepended token) or ``relative0`` (at each query's own
            position, i.e. relative distance 0).
        pooling: ``mean`` over real tokens, ``last`` token, or ``mean+last`` (weighted sum of the two
            L2-normalised vectors, weight ``last_weight`` on the last token); ``None`` = the method's default.
        last_weight: Weight of the last-token vector in ``mean+last`` pooling, in [0, 1].
        pool_layers: Decoder layers whose outputs are averaged and pooled; ``None`` = the final output.
        pool_span: Tokens the mean runs over: ``all`` real tokens or the ``text``'s own (template left out);
            ``None`` = the method's default (``text`` for echo, its second copy; ``all`` otherwise).
        template: Prompt with one ``{text}`` placeholder (two for ``echo``); the text is truncated, never the
            template. ``None`` = the method's default.
        sides: Settings that differ for ``encode_query`` / ``encode_document`` (and ``encode`` with
            ``prompt_name="query"``/``"document"``): ``{"document": {"pool_layers": [14], ...}}`` with any knob
            of :class:`~kvemb_st.side.Side`; what a side leaves out is the top-level value (:meth:`side`). Both
            sides share the forward knobs, so their vectors stay in one space.
        max_seq_length: Maximum number of tokens of the templated input.
        long_inputs: A text over ``max_seq_length`` is ``truncate``-d (its end is cut, the template kept whole,
            and a warning counts what was dropped) or ``chunk``-ed (split at sentence boundaries, then by tokens
            for a sentence too long alone, into chunks that each fit with the template; the unit chunk vectors
            are averaged into the text's vector: ``chunk_weights``, ``chunk_combine``). See :mod:`kvemb_st.chunking`.
        chunk_weights: Weight of each chunk vector in that average: ``equal``, or its ``tokens`` (how many
            tokens its text adds to the templated input). Used with ``long_inputs="chunk"`` only.
        chunk_combine: Where that average is taken: ``before`` the post-processing module (which then sees one
            vector per text) or ``after`` it (each chunk vector post-processed, then the unit vectors averaged).
            Without a post-processing module the two are the same. Used with ``long_inputs="chunk"`` only.
        layer_selection: Metadata of automatic layer selection (ID curve, calibration hash, window);
            informational, written by ``kvemb build``.
        kvemb_st_version: Package version that wrote the config.
    """

    base_model: str
    base_revision: str | None = None
    method: str = "kv"
    layers: list[int] = field(default_factory=list)
    tp_layers: list[int] | None = None
    prefix_bias: float = 1.0
    prefix_rope: str = "relative0"
    pooling: str | None = None
    last_weight: float = DEFAULT_LAST_WEIGHT
    pool_layers: list[int] | None = None
    pool_span: str | None = None
    template: str | None = None
    sides: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_seq_length: int = 512
    long_inputs: str = "truncate"
    chunk_weights: str = "equal"
    chunk_combine: str = "before"
    layer_selection: dict[str, Any] | None = None
    kvemb_st_version: str = __version__

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str | None = None) -> None:
        """Check every field; raise :class:`ConfigError` naming ``source`` and the key on the first bad one."""
        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise ConfigError(f"{_where(source, 'base_model')} must be a non-empty Hub id or path")
        if self.base_revision is not None and not isinstance(self.base_revision, str):
            raise ConfigError(f"{_where(source, 'base_revision')} must be a string or null")
        if not isinstance(self.method, str) or self.method not in METHOD_DEFAULTS:
            raise ConfigError(f"{_where(source, 'method')} must be one of {sorted(METHOD_DEFAULTS)}, got {self.method!r}")
        method = METHOD_DEFAULTS[self.method]
        self.template = method.template if self.template is None else self.template
        self.pooling = method.pooling if self.pooling is None else self.pooling
        self.pool_span = method.pool_span if self.pool_span is None else self.pool_span
        self.layers = _layer_list(self.layers, _where(source, "layers"))
        if self.tp_layers is not None:
            self.tp_layers = _layer_list(self.tp_layers, _where(source, "tp_layers"))
            if not self.tp_layers:
                raise ConfigError(f"{_where(source, 'tp_layers')} must be non-empty, got {self.tp_layers}")
        if isinstance(self.prefix_bias, bool) or not isinstance(self.prefix_bias, (int, float)):
            raise ConfigError(f"{_where(source, 'prefix_bias')} must be a number, got {self.prefix_bias!r}")
        if not math.isfinite(self.prefix_bias):
            raise ConfigError(f"{_where(source, 'prefix_bias')} must be finite, got {self.prefix_bias!r}")
        self.prefix_bias = float(self.prefix_bias)
        if self.prefix_rope not in ROPE_MODES:
            raise ConfigError(f"{_where(source, 'prefix_rope')} must be one of {ROPE_MODES}, got {self.prefix_rope!r}")
        top = _make_side({key: getattr(self, key) for key in SIDE_KEYS}, method, lambda key: _where(source, key))
        for key, value in top.to_dict().items():
            setattr(self, key, value)
        if not isinstance(self.sides, dict):
            raise ConfigError(f"{_where(source, 'sides')} must be an object such as {{\"document\": {{...}}}}")
        sides = {}
        for name, overrides in self.sides.items():
            where = lambda key, name=name: _where(source, f"sides.{name}.{key}" if key else f"sides.{name}")  # noqa: E731
            if name not in SIDE_NAMES:
                raise ConfigError(f"{_where(source, 'sides')}: unknown side {name!r}; expected one of {SIDE_NAMES}")
            if not isinstance(overrides, dict) or not overrides:
                raise ConfigError(f"{where('')} must be a non-empty object with keys among {SIDE_KEYS}, got {overrides!r}")
            unknown = sorted(set(overrides) - set(SIDE_KEYS))
            if unknown:
                raise ConfigError(f"{where('')}: unknown key(s) {unknown}; a side sets only {list(SIDE_KEYS)}")
            side = _make_side({**top.to_dict(), **overrides}, method, where).to_dict()
            sides[name] = {key: side[key] for key in overrides}
        self.sides = sides
        self._check_method_knobs(method, source)
        if isinstance(self.max_seq_length, bool) or not isinstance(self.max_seq_length, int) or self.max_seq_length < 8:
            raise ConfigError(f"{_where(source, 'max_seq_length')} must be an integer >= 8, got {self.max_seq_length!r}")
        if self.layer_selection is not None and not isinstance(self.layer_selection, dict):
            raise ConfigError(f"{_where(source, 'layer_selection')} must be an object or null")

    def side(self, name: str | None = None) -> Side:
        """Side ``name`` (``None``: the top level, which plain ``encode`` uses); a side not set reads like the top level."""
        if name is not None and name not in SIDE_NAMES:
            raise ValueError(f"unknown side {name!r}; expected one of {SIDE_NAMES} or None (the top level)")
        top = Side(**{key: getattr(self, key) for key in SIDE_KEYS})
        return top.with_overrides(self.sides[name]) if name in self.sides else top

    def readout(self, side: str | None = None) -> Readout:
        return self.side(side).readout

    def _check_method_knobs(self, method: MethodDefaults, source: str | None) -> None:
        """Knobs that do not belong to the selected method are an error, never silently ignored."""
        if not self.layers and self.method == "kv":
            raise ConfigError(
                f"{_where(source, 'layers')} is empty: method 'kv' re-routes at least one layer. Pass e.g. "
                "layers='20-29', let `kvemb build` choose them, or use method='prompteol' for the prompt alone"
            )
        if self.layers and self.method != "kv":
            raise ConfigError(
                f"{_where(source, 'layers')}: re-routed layers {self.layers} only apply to method 'kv', not "
                f"{self.method!r}; drop 'layers' or use method='kv'"
            )
        if self.tp_layers is not None and self.method != "token_prepending":
            raise ConfigError(
                f"{_where(source, 'tp_layers')} only applies to method 'token_prepending', not {self.method!r}"
            )
    def check_layers_fit(self, num_layers: int, source: str | None = None) -> None:
        """Layers can only be range-checked once the base model's depth is known."""
        pooled = [("pool_layers", self.pool_layers or [])]
        pooled += [(f"sides.{side}.pool_layers", s.get("pool_layers") or []) for side, s in self.sides.items()]
        for key, layers in (("layers", self.layers), ("tp_layers", self.tp_layers or []), *pooled):
            bad = [layer for layer in layers if layer >= num_layers]
            if bad:
                raise ConfigError(
                    f"{_where(source, key)}: {bad} out of range for base model '{self.base_model}' with "
                    f"{num_layers} layers (valid: 0..{num_layers - 1})"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> KVEmbeddingConfig:
        """Build from a loaded JSON object; unknown keys are rejected, never silently ignored.

        A config is data, not code: keys such as ``trust_remote_code`` are refused by name so that a
        downloaded folder can never switch remote code on.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source or 'config'} must hold a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hint = (
                " Remote code is never enabled from a config file."
                if any("remote" in key or "code" in key for key in unknown)
                else ""
            )
            raise ConfigError(
                f"{source or 'config'}: unknown key(s) {unknown}; expected a subset of {sorted(known)}.{hint}"
            )
        if "base_model" not in data:
            raise ConfigError(f"{_where(source, 'base_model')} is missing")
        config = cls.__new__(cls)  # bypass __post_init__ so that validation can name the source file
        for f in fields(cls):
            if f.name in data:
                value = data[f.name]
            else:
                value = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
            setattr(config, f.name, value)
        config.validate(source)
        return config


def _layer_list(spec: Any, where: str) -> list[int]:
    try:
        layers = parse_layer_spec(spec)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if any(layer < 0 for layer in layers):
        raise ConfigError(f"{where} must be >= 0, got {layers}")
    return layers


def _make_side(settings: dict[str, Any], method: MethodDefaults, where: Callable[[str], str]) -> Side:
    """The :class:`Side` of ``settings``, checked against the method; errors name the key through ``where(key)``."""
    template = settings["template"]
    validate_template(template, where("template"), copies=method.copies)
    if method is METHOD_DEFAULTS["token_prepending"]:
        if template.split(TEXT_PLACEHOLDER)[0].count(PLACEHOLDER) != 1 or template.count(PLACEHOLDER) != 1:
            raise ConfigError(
                f"{where('template')} of method 'token_prepending' must hold the placeholder '{PLACEHOLDER}' exactly "
                f"once, before '{{text}}', e.g. {TOKEN_PREPENDING_TEMPLATE!r}; got {template!r}"
            )
    if settings["pool_layers"] is not None:  # a spec such as "12-16" or a list
        settings = {**settings, "pool_layers": _layer_list(settings["pool_layers"], where("pool_layers"))}
    try:
        return Side(**settings)
    except SideError as err:
        raise ConfigError(f"{where(err.key)}: {err.problem}") from None


def validate_template(template: Any, where: str, copies: int = 1) -> None:
    if not isinstance(template, str) or template.count(TEXT_PLACEHOLDER) != copies:
        count = "exactly one" if copies == 1 else f"exactly {copies}"
        raise ConfigError(f"{where} must be a string with {count} '{TEXT_PLACEHOLDER}' placeholder(s), got {template!r}")
