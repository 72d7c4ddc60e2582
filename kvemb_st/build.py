"""``build``: base model -> a Hub-ready KV-Embedding folder (the Python side of ``kvemb build``).

The folder is what ``SentenceTransformer.save`` writes for the model returned by
:func:`kvemb_st.from_base` (``modules.json``, ``config_sentence_transformers.json``,
``kvemb_config.json`` -- configuration only, never weights), with the chosen layers and the
``layer_selection`` record in the config, plus ``id_curve.png`` and a ``README.md`` model card.
The base model is loaded once: the ID curve is computed on the same backbone the model wraps.
By default the calibration texts are then embedded by the finished model and a whitening
:class:`~kvemb_st.postprocessing.PostProcessing` module (its own folder: config + statistics) is appended:
that is the default chosen on dev data of both real backbones, sentences and documents together
(docs/defaults.md, "The default build"; ``experiments/choose_defaults/choose_defaults.py``).
``postprocess="none"`` leaves it out.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Router
from transformers.utils import logging

from kvemb_st.api import from_base
from kvemb_st.calibration import DEFAULT_CALIBRATION_FILE, load_calibration, named_sets
from kvemb_st.config import COMPRESSION_TEMPLATE, is_hub_id
from kvemb_st.layer_selection import LayerSelection, select_layers
from kvemb_st.layer_spec import AUTO
from kvemb_st.model_card import render_model_card
from kvemb_st.postprocessing import DEFAULT_EIGENVALUE_FLOOR, PostProcessing, check_postprocessing_args
from kvemb_st.postprocessing_fit import add_postprocessing
from kvemb_st.version import __version__
from kvemb_st.window_rule import SelectionParams

logger = logging.get_logger(__name__)

PLOT_FILE = "id_curve.png"
CARD_FILE = "README.md"
# from_base needs a valid 'kv' config, which re-routes at least one layer; the chosen layers replace this
# placeholder before the model encodes or is saved (the ID curve itself is measured without re-routing).
PLACEHOLDER_LAYERS = [0]
NO_POSTPROCESSING = "none"
DEFAULT_POSTPROCESS = "whiten"  # full dimension, fitted on the calibration texts; see experiments/choose_defaults/choose_defaults.py
_NOT_RECORDED = ("token", "eval_results", "command", "progress")  # secrets and noise stay out of the card
# The document side of a default build, read by queries too (one space for retrieval), and its own whitening
# fitted on the calibration sentences embedded by that side: chosen on dev data of both backbones by a rule
# written before the runs (experiments/doc_levers/RULE.md, docs/defaults.md). `encode` keeps the top-level side.
DOCUMENT_READOUT: dict[str, Any] = {
    "template": COMPRESSION_TEMPLATE, "pooling": "mean+last", "last_weight": 0.5, "pool_span": "text",
}  # fmt: skip
DEFAULT_SIDES: dict[str, dict[str, Any]] = {"query": DOCUMENT_READOUT, "document": DOCUMENT_READOUT}
DEFAULT_DOCUMENT_CALIBRATION = "sts-b-train"
DEFAULT_DOCUMENT_STATISTICS = True  # the sides get their own whitening (False: they join the one fit)


@dataclass
class BuildResult:
    output_dir: Path
    model: SentenceTransformer
    selection: LayerSelection
    repo_url: str | None = None


def build(
    base_model: str,
    output_dir: str | os.PathLike[str],
    *,
    layers: str | Sequence[int] = AUTO,
    base_revision: str | None = None,
    calibration: str | os.PathLike[str] | Sequence[str] | None = None,
    calibration_limit: int | None = None,
    postprocess: str = DEFAULT_POSTPROCESS,
    postprocess_calibration: str | os.PathLike[str] | Sequence[str] | None = None,
    document_calibration: str | os.PathLike[str] | Sequence[str] | None = DEFAULT_DOCUMENT_CALIBRATION,
    document_statistics: bool = DEFAULT_DOCUMENT_STATISTICS,
    components: int | None = None,
    eigenvalue_floor: float = DEFAULT_EIGENVALUE_FLOOR,
    selection: SelectionParams | None = None,
    estimator: str = "mle",
    batch_size: int = 32,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    query_template: str | None = None,
    document_template: str | None = None,
    device: str | None = None,
    token: bool | str | None = None,
    local_files_only: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    base_model_id: str | None = None,
    eval_results: Mapping[str, int | float | str] | None = None,
    push_to_hub: str | None = None,
    private: bool | None = None,
    overwrite: bool = False,
    command: str | None = None,
    progress: bool = True,
    **knobs: Any,
) -> BuildResult:
    """Build a KV-Embedding model from ``base_model`` and save it to ``output_dir``.

    Args:
        layers: ``"auto"`` (by intrinsic dimension) or an explicit spec such as ``"20-29"``.
        calibration, calibration_limit: Calibration texts (default set, named set, file or list); the limit
            keeps the first texts of each set used (layer selection and post-processing).
        postprocess, components, eigenvalue_floor: ``"none"`` or a mode of
            :func:`~kvemb_st.postprocessing_fit.fit_postprocessing`.
        postprocess_calibration: The texts it is fitted on (``None``: the calibration texts), e.g.
            ``"sts-b-train+sts-b-train-paragraphs"`` to add paragraphs.
        document_calibration: Texts embedded by ``encode_document`` when the model has a document side
            (``None``: none): fitted on their own for the query and document sides (``document_statistics``),
            or joining the one fit of every side.
        selection: Where the automatic window goes; see :class:`~kvemb_st.window_rule.SelectionParams`.
        cache_dir, use_cache: ID-curve cache (default ``<kvemb cache>/id_curves``).
        base_model_id: Hub id of the base model for the card's metadata when ``base_model`` is a path.
        eval_results: Metric name -> value, shown in the card.
        push_to_hub: Hub repo id to upload the folder to (created if missing).
        command: How the build was invoked, for the card; defaults to this Python call.
        knobs: Fields of :class:`~kvemb_st.config.KVEmbeddingConfig` (``prefix_bias``, ``pooling``, ...);
            ``sides`` defaults to :data:`DEFAULT_SIDES` (``sides={}``: every side reads out like ``encode``).
    """
    call = {name: value for name, value in locals().items() if name not in _NOT_RECORDED}
    output = Path(output_dir)
    if output.is_file() or (output.is_dir() and any(output.iterdir()) and not overwrite):
        raise ValueError(
            f"output folder '{output}' already exists and is not empty; choose another folder or pass overwrite=True "
            "(--overwrite) to write into it"
        )
    if knobs.get("method", "kv") != "kv":
        raise ValueError(
            f"kvemb build makes KV-Embedding models (method 'kv'), not {knobs['method']!r}: save a baseline with "
            f"kvemb_st.from_base(..., method={knobs['method']!r}).save(folder)"
        )
    if postprocess != NO_POSTPROCESSING:
        check_postprocessing_args(postprocess, components, eigenvalue_floor)
    elif components is not None or postprocess_calibration is not None:
        which = "components" if components is not None else "postprocess_calibration"
        raise ValueError(f"{which} applies to a post-processing mode: pass postprocess (--postprocess) too")
    knobs.setdefault("sides", DEFAULT_SIDES)
    texts = load_calibration(calibration, calibration_limit)
    if postprocess_calibration is None:
        postprocess_calibration, post_texts = calibration, texts
    else:  # only with a post-processing mode (checked above)
        post_texts = load_calibration(postprocess_calibration, calibration_limit)
    model = from_base(
        base_model, PLACEHOLDER_LAYERS, base_revision=base_revision, query_template=query_template,
        document_template=document_template, device=device, token=token,
        local_files_only=local_files_only, model_kwargs=model_kwargs, **knobs,
    )  # fmt: skip
    module = model[0]
    config = module.config
    chosen = select_layers(
        module.auto_model, module.tokenizer, base_model=config.base_model, base_revision=config.base_revision,
        template=config.template, texts=texts, layers=layers, params=selection, estimator=estimator,
        max_seq_length=config.max_seq_length, batch_size=batch_size, cache_dir=cache_dir, use_cache=use_cache,
        progress=progress,
    )  # fmt: skip
    module.config = dataclasses.replace(config, layers=chosen.layers, layer_selection=chosen.to_dict())
    num_layers = module.auto_model.config.num_hidden_layers
    module.config.check_layers_fit(num_layers)
    if postprocess != NO_POSTPROCESSING:
        with_documents = document_calibration is not None and "document" in module.config.sides
        add_postprocessing(
            model, post_texts, postprocess, components, batch_size,
            calibration_name=calibration_name_of(postprocess_calibration), eigenvalue_floor=eigenvalue_floor,
            document_texts=load_calibration(document_calibration, calibration_limit) if with_documents else (),
            document_name=calibration_name_of(document_calibration) if with_documents else None,
            document_statistics=document_statistics and with_documents,
        )  # fmt: skip

    output.mkdir(parents=True, exist_ok=True)
    model.save(str(output), create_model_card=False)
    has_plot = plot_id_curve(chosen, output / PLOT_FILE, title=base_model_id or Path(base_model).name)
    card = render_model_card(
        module.config,
        dimension=model.get_embedding_dimension(),
        num_layers=num_layers,
        postprocessing=_saved_postprocessing(model, output),
        model_id=push_to_hub or str(output),
        command=command or _python_call(call),
        command_language="bash" if command else "python",
        base_model_id=base_model_id,
        eval_results=eval_results,
        has_plot=has_plot,
    )
    (output / CARD_FILE).write_text(card, encoding="utf-8")
    repo_url = None
    if push_to_hub:
        if not is_hub_id(base_model) or os.path.exists(base_model):
            logger.warning(
                f"the pushed config names the local base model '{base_model}', which other users do not have: "
                "loading the repository will need base_model=... (see the card). Build from a Hub id for a "
                "repository that loads anywhere."
            )
        repo_url = push_folder(output, push_to_hub, token=token, private=private)
    return BuildResult(output_dir=output, model=model, selection=chosen, repo_url=repo_url)


def calibration_name_of(calibration: str | os.PathLike[str] | Sequence[str] | None) -> str | None:
    """How the card names the calibration set: named sets, a user file's name, or ``None`` for a list."""
    if calibration is None:
        return f"{DEFAULT_CALIBRATION_FILE.name} shipped with kvemb-st {__version__}"
    sets = named_sets(calibration)
    if sets:
        return f"{calibration} ({' + '.join(named.source for named in sets)}; kvemb-st {__version__})"
    if isinstance(calibration, (str, os.PathLike)):
        return f"the file {Path(calibration).name}"
    return None


def _saved_postprocessing(model: SentenceTransformer, output: Path) -> tuple[PostProcessing | Router, str] | None:
    """The model's post-processing module (or its Router of them, one per side) and the folder ``save`` wrote it to
    (read back from modules.json)."""
    entries = json.loads((output / "modules.json").read_text(encoding="utf-8"))
    for entry, module in zip(entries, model):
        if isinstance(module, (PostProcessing, Router)):
            return module, entry["path"]
    return None


def push_folder(
    folder: str | os.PathLike[str], repo_id: str, *, token: bool | str | None = None, private: bool | None = None
) -> str:
    """Create the Hub model repo if needed and upload the whole folder in one commit; return the repo URL."""
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message="Upload KV-Embedding model (kvemb build)",
    )
    return str(url)


def plot_id_curve(selection: LayerSelection, path: Path, title: str) -> bool:
    """Plot ID per layer with the selected layers shaded; ``False`` (and a warning) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed, so id_curve.png was not written: pip install 'kvemb-st[plot]'")
        return False
    curve = selection.id_curve
    figure = Figure(figsize=(7.0, 3.6), dpi=120)
    FigureCanvasAgg(figure)  # the Agg canvas, without touching pyplot's global backend
    ax = figure.add_subplot()
    if selection.mode == AUTO:
        skipped = int(selection.params["skip_fraction"] * len(curve))
        if skipped:
            ax.axvspan(-0.5, skipped - 0.5, color="0.85", label="skipped (never the minimum)")
    for index, layer in enumerate(selection.layers):
        ax.axvspan(
            layer - 0.5, layer + 0.5, color="tab:orange", alpha=0.3, lw=0, label=None if index else "re-routed layers"
        )
    ax.plot(range(len(curve)), curve, marker="o", ms=3.5, color="tab:blue", label="intrinsic dimension (TwoNN)")
    if selection.argmin is not None:
        ax.plot(
            [selection.argmin], [curve[selection.argmin]], marker="*", ms=13, color="tab:red", ls="", label="minimum"
        )
    ax.set_xlabel("layer (output of decoder layer)")
    ax.set_ylabel("intrinsic dimension")
    ax.set_title(f"{title}: final-token ID per layer ({selection.num_calibration_texts} calibration texts)", fontsize=9)
    ax.set_xlim(-0.5, len(curve) - 0.5)
    ax.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    return True


def _python_call(call: dict[str, Any]) -> str:
    """``kvemb_st.build.build(...)`` with the arguments that differ from the defaults, for the card."""
    defaults = {name: p.default for name, p in inspect.signature(build).parameters.items()}
    knobs = call.pop("knobs", {})
    if call.get("calibration") is not None and not isinstance(call["calibration"], (str, os.PathLike)):
        call["calibration"] = f"<list of {len(call['calibration'])} texts>"
    args = [repr(str(call.pop("base_model"))), repr(str(call.pop("output_dir")))]
    args += [f"{name}={value!r}" for name, value in {**call, **knobs}.items() if defaults.get(name) != value]
    return "from kvemb_st.build import build\n\nbuild(" + ", ".join(args) + ")"
