"""The model card (``README.md``) of a built folder, rendered from ``model_cards/kvemb_model_card.md``.

That folder is installed as the data package ``kvemb_st.model_cards`` (see pyproject.toml), so the template
is found the same way in a source checkout, an editable install and a wheel.

sentence-transformers writes its own card on ``save``, but it cannot know what KV-Embedding is, how
the layers were chosen or how to rebuild the model. The Hub reads the YAML header for search and
widgets; it is produced by ``huggingface_hub.ModelCardData`` so that it is valid YAML by construction.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from string import Template

from huggingface_hub import ModelCardData
from sentence_transformers.base.modules import Router

from kvemb_st.config import KVEmbeddingConfig, is_hub_id
from kvemb_st.layer_spec import format_layer_spec
from kvemb_st.pooling import Readout
from kvemb_st.postprocessing import STATISTICS_FILE, PostProcessing
from kvemb_st.side import READOUT_KEYS, SIDE_NAMES, Side
from kvemb_st.side_router import DEFAULT_ROUTE, route_of
from kvemb_st.version import __version__

TEMPLATE = files("kvemb_st.model_cards") / "kvemb_model_card.md"
TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction", "kv-embedding", "training-free"]


def hub_base_model(config: KVEmbeddingConfig, base_model_id: str | None = None) -> str | None:
    """The Hub id for the ``base_model`` metadata; ``None`` for a local folder or GGUF without ``base_model_id``."""
    if base_model_id:
        return base_model_id
    return config.base_model if is_hub_id(config.base_model) and not os.path.exists(config.base_model) else None


def _end_margin_text(margin: int) -> str:
    return f" and to end at least {margin} layer{'s' if margin > 1 else ''} before the last" if margin else ""


def _layer_selection_text(config: KVEmbeddingConfig, has_plot: bool) -> str:
    selection = config.layer_selection or {}
    layers = format_layer_spec(config.layers) if config.layers else "none"
    curve = selection.get("id_curve")
    lines: list[str] = []
    if selection.get("mode") == "auto":
        params = selection["params"]
        window = selection["window"]
        anchor = "starting at" if params["anchor"] == "start" else "centred on"
        width = window[1] - window[0] + 1
        near = selection.get("near_minimum") or [selection["argmin"]]
        tolerance = params.get("min_tolerance", 0.0)
        minimum = f"the minimum is at layer {selection['argmin']}"
        if len(near) > 1:
            minimum += (
                f"; layers {format_layer_spec(near)} are within {tolerance:g} standard error(s) of it, so the "
                f"anchor is their mean position, layer {selection['anchor_layer']}"
            )
        lines.append(
            f"Chosen automatically: the TwoNN intrinsic dimension (`{selection['estimator']}` estimator) of the "
            f"final-token hidden state was measured after every layer on {selection['num_calibration_texts']} "
            f"calibration texts wrapped in the template (`{selection['calibration_hash']}`). Skipping the first "
            f"{params['skip_fraction']:.0%} of the layers, {minimum}; a window of "
            f"{width} layers {anchor} {'that layer' if len(near) > 1 else 'it'} (shifted to fit inside the model"
            f"{_end_margin_text(params.get('end_margin', 0))}) gives layers **{layers}**."
        )
        if selection.get("warnings"):
            lines.append(f"\n**Note:** {'; '.join(selection['warnings'])}.")
    elif curve:
        lines.append(f"Layers **{layers}** were given explicitly; the ID curve below is shown for reference.")
    else:
        lines.append(f"Layers **{layers}** were given explicitly.")
    if has_plot:
        lines.append("\n![Intrinsic dimension per layer, selected layers shaded](id_curve.png)")
    if curve:
        values = ", ".join(f"{value:.2f}" for value in curve)
        lines.append(f"\nID per layer (layer 0 to {len(curve) - 1}): {values}")
    return "\n".join(lines)


_MODE_TEXT = {  # mode -> (what it does, the output formula, what the matrix holds)
    "center": ("centred: the calibration mean is subtracted", "normalize(x - mean)", None),
    "remove_pcs": (
        "centred and its top {components} principal directions are removed",
        "normalize(y - (y @ directions) @ directions.T) with y = x - mean",
        "the top {components} principal directions (orthonormal columns) of the centred calibration vectors",
    ),
    "whiten": (
        "whitened with the calibration covariance",
        "normalize((x - mean) @ projection)",
        "the top {out_features} eigenvectors of the calibration covariance, each divided by the square root "
        "of its eigenvalue (eigenvalues below {eigenvalue_floor} times the largest raised to that floor)",
    ),
}


def _side_sets_text(router: Router) -> str:
    """How the sides with statistics of their own use them (each named set is the route of that name)."""
    parts = []
    for name, route in router.sub_modules.items():
        sides = [side for side in SIDE_NAMES if route_of(router, side) is route[0]]
        if name == DEFAULT_ROUTE or not sides:
            continue
        record = route[0].calibration or {}
        embedded = f" embedded by `encode_{name}`" if name in SIDE_NAMES else ""
        parts.append(
            f"{' and '.join(f'`encode_{side}`' for side in sorted(sides))} use statistics of their own (route "
            f"`{name}`), fitted on {record.get('count')} texts ({record.get('name')}, `{record.get('hash')}`){embedded}"
        )
    return (
        "; " + "; ".join(parts) + ", so queries and documents share one space while `encode` keeps the first set "
        "(do not compare `encode` vectors with `encode_document` ones)"
    )


def _postprocessing_text(postprocessing: tuple[PostProcessing | Router, str] | None) -> tuple[str, str]:
    """(table cell, section text) describing the post-processing module(s) and their statistics files."""
    if postprocessing is None:
        return "none", "None: the pooled vector is L2-normalised and used as it is."
    saved, folder = postprocessing
    module = route_of(saved, None) if isinstance(saved, Router) else saved
    fields = module.get_config_dict() | {"out_features": module.out_features}
    what, formula, matrix = (text.format(**fields) if text else None for text in _MODE_TEXT[module.mode])
    tensors = ", ".join(f"`{name}` {shape}" for name, shape in module.statistics_shapes().items())
    held = f"the calibration mean ({module.in_features} values)" + (f", and {matrix}" if matrix else "")
    size_note = "" if module.out_features == module.in_features else f" (reduced from {module.in_features})"
    calibration = module.calibration
    document = calibration.get("document")
    statistics, config = f"`{folder}/{STATISTICS_FILE}`", f"`{folder}/{module.config_file_name}`"
    if isinstance(saved, Router):
        also = _side_sets_text(saved)
        routes = f"`{folder}/{saved.config_file_name}` maps sides to routes"
        statistics = f"Each route's `{folder}/<route>/{STATISTICS_FILE}` ({routes})"
        config = f"Its `{module.config_file_name}`"
    elif document:
        also = (
            f", plus {document['count']} texts ({document['name']}, `{document['hash']}`) embedded by "
            "`encode_document`, so that one transform serves every side and queries and documents stay in one space"
        )
    else:
        also = ""
    made = (
        f"It was fitted by `kvemb build` on {calibration['count']} calibration texts "
        f"({calibration['name']}, `{calibration['hash']}`){also}, embedded by "
        "this very model (template, re-routed layers, pooling), without labels or gradients."
    )
    text = (
        f"The pooled, L2-normalised vector `x` is {what}, then L2-normalised again: `{formula}`, "
        f"**{module.out_features} dimensions**{size_note}.\n\n"
        f"{statistics} holds float32 tensors {tensors}: {held}. It holds no weights of the "
        f"base model. {config} records the mode, sizes and calibration set. {made}"
    )
    return f"{module.mode} (see below)", text


NO_EVAL_RESULTS = (
    "No evaluation results were recorded at build time (pass them with `kvemb build ... --eval-results results.json`, "
    "a JSON object of metric name to value; `kvemb eval FOLDER --tasks ... --card` writes MTEB scores here)."
)


def _evaluation_text(eval_results: Mapping[str, int | float | str] | None) -> str:
    if not eval_results:
        return NO_EVAL_RESULTS
    rows = "\n".join(
        f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
        for name, value in eval_results.items()
    )
    return f"| Metric | Value |\n|---|---|\n{rows}"


def describe_readout(readout: Readout) -> str:
    """``mean+last (last-token weight 0.75), final output, all tokens`` and the like, for the card."""
    pooling = readout.pooling if readout.pooling != "mean+last" else f"mean+last (last-token weight {readout.last_weight:g})"
    layers = "final output" if readout.layers is None else f"layers {format_layer_spec(list(readout.layers))} (mean)"
    span = "the text's own tokens" if readout.span == "text" else "all tokens"
    return f"{pooling}, {layers}, mean over {span}"


def describe_long_inputs(side: Side) -> str:
    """What happens to a text over ``max_seq_length`` on one side, for the card."""
    if side.long_inputs == "truncate":
        return "truncated (the text's end is cut, the template never)"
    weights = "weighted by their tokens" if side.chunk_weights == "tokens" else "with equal weights"
    where = ", each post-processed first" if side.chunk_combine == "after" else ""
    return f"split at sentence boundaries into chunks that fit, whose vectors are averaged {weights}{where}"


def _sides_rows(config: KVEmbeddingConfig) -> str:
    """Table rows for the sides that differ from plain ``encode`` (none: an empty string)."""
    rows = []
    for name in config.sides:
        side = config.side(name)
        template = side.template.replace("\n", "\\n")
        longer = describe_long_inputs(side)
        longer = "" if longer == describe_long_inputs(config.side()) else f"; longer texts {longer}"
        rows.append(f"| `encode_{name}` side | template `{template}`; {_describe_side(side)}{longer} |")
    return "".join(f"\n{row}" for row in rows)


def _describe_side(side: Side) -> str:
    """The readout, then any other knob of the side but its template (``name `value```)."""
    described = ("template", *READOUT_KEYS, "long_inputs", "chunk_weights", "chunk_combine")  # see describe_long_inputs
    others = [f"{key} `{value}`" for key, value in side.to_dict().items() if key not in described]
    return "; ".join([describe_readout(side.readout), *others])


def render_model_card(
    config: KVEmbeddingConfig,
    *,
    dimension: int,
    num_layers: int,
    model_id: str,
    command: str,
    command_language: str = "bash",
    base_model_id: str | None = None,
    eval_results: Mapping[str, int | float | str] | None = None,
    has_plot: bool = True,
    postprocessing: tuple[PostProcessing | Router, str] | None = None,
) -> str:
    """Fill the card template for a built model whose config (with ``layer_selection``) is ``config``.

    ``dimension`` is the model's output size; ``postprocessing`` is its module and the folder it was saved to.
    """
    hub_id = hub_base_model(config, base_model_id)
    metadata = ModelCardData(
        library_name="sentence-transformers",
        base_model=hub_id,
        pipeline_tag="sentence-similarity",
        tags=TAGS,
    ).to_yaml()
    base_model_ref = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{config.base_model}`"
    local_base_note = (
        ""
        if hub_base_model(config)
        else f"\nThe config names its base model by a local path (`{config.base_model}`). On another machine, point "
        f"it at your copy of {hub_id or 'the base model'}: "
        f'`kvemb_st.load("{model_id}", base_model="<Hub id or path>")`.\n'
    )
    name = hub_id or Path(config.base_model).name
    postprocessing_cell, postprocessing_section = _postprocessing_text(postprocessing)
    pooling = _describe_side(config.side())
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        metadata=metadata,
        title=f"KV-Embedding on {name}",
        base_model_ref=base_model_ref,
        base_revision=config.base_revision or "default",
        kvemb_version=__version__,
        layers=format_layer_spec(config.layers) if config.layers else "none",
        num_layers=num_layers,
        prefix_bias=config.prefix_bias,
        prefix_rope=config.prefix_rope,
        pooling=pooling,
        template=config.template.replace("\n", "\\n"),
        sides=_sides_rows(config),
        max_seq_length=config.max_seq_length,
        long_inputs=describe_long_inputs(config.side()),
        dimension=dimension,
        contents="configuration only" if postprocessing is None else "configuration and calibration statistics",
        postprocessing_cell=postprocessing_cell,
        postprocessing=postprocessing_section,
        layer_selection=_layer_selection_text(config, has_plot),
        model_id=model_id,
        local_base_note=local_base_note,
        command_language=command_language,
        command=command,
        evaluation=_evaluation_text(eval_results),
    )
