"""A loaded model's identity (name, revision) and its mteb ``ModelMeta``.

mteb keys its result cache by model name and revision, and for a ``SentenceTransformer`` it reads both from
``model_card_data``: the name from ``model_name`` (else ``base_model``), the revision from
``base_model_revision``, ``adapted_from`` from ``base_model`` (``ModelMeta._from_sentence_transformer_model``).
A local folder has none of them, so two different folders shared ``no_model_name/no_revision_available`` and
mteb handed the second one the first one's scores. :func:`assign_identity` fills them in for every model that
holds a :class:`~kvemb_st.module.KVEmbedding` (it runs when ST finishes building the model):

- name: the Hub id of a downloaded model, the folder's name for a local one, ``kvemb-st/<base>`` for ``from_base``;
- revision: the Hub commit of a downloaded model; otherwise a short hash of what determines the vectors -- every
  module's config (minus the writing package's version) and the post-processing statistics -- so the same
  folder always gets the same revision and two folders that differ in any knob or statistic never share one;
- base model: the LLM it is adapted from, by Hub id: the config's, else the card's ``base_model`` (a local base).

``base_model_revision`` carries our revision because it is the field mteb reads (ST's own card, written by a
plain ``model.save``, shows it in a comment beside the base model; ``kvemb build`` writes its own card).
:func:`mteb_model_meta` adds what mteb cannot read from a ``SentenceTransformer``: loader, parameter count and
the training data (the calibration texts, for mteb's zero-shot flag); :func:`mteb_model` hands mteb the model with
it (``mteb.evaluate(mteb_model(model), tasks)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any

import torch
import yaml
from huggingface_hub import metadata_load

from kvemb_st.calibration import (
    DEFAULT_CALIBRATION_FILE,
    PARAGRAPH_CALIBRATION_FILE,
    calibration_hash,
    read_calibration_file,
)
from kvemb_st.config import ROUTING_KNOBS, KVEmbeddingConfig

HUB_COMMIT = re.compile(r"^[0-9a-f]{40}$")
REVISION_LENGTH = 12
# Knobs whose default changed after revisions were first filed, with the default they had then: a knob is left out
# of the hash when it holds that value, so changing a default never moves an existing folder's revision (nor orphans
# the results filed under it), and a folder that keeps the new default still hashes apart from one at the old.
FORMER_DEFAULTS: dict[tuple[str, str], Any] = {("KVEmbeddingConfig", "prefix_bias"): 3.0}
# Calibration sets drawn from STS-B train, which mteb names by the task STSBenchmark (its train split).
STSB_TRAIN_SETS = (DEFAULT_CALIBRATION_FILE, PARAGRAPH_CALIBRATION_FILE)
STSB_SET_NAME = "sts-b-train"  # how a joined named set ("sts-b-train+general") names its STS-B part


@dataclass(frozen=True)
class Source:
    """Where a model was loaded from: a name and, for a Hub download, the commit it was downloaded at."""

    name: str
    hub_commit: str | None = None
    card_base_model: str | None = None  # the card's ``base_model``: a Hub id where the config names a local path


def folder_source(model_name_or_path: str, resolved_file: str | None) -> Source:
    """The source of a saved model: the folder's name locally, else the Hub id and the snapshot's commit.

    ``resolved_file`` is a file of the model as downloaded: the Hub cache keeps it under ``snapshots/<commit>/``.
    """
    if os.path.isdir(model_name_or_path):
        name = os.path.basename(os.path.normpath(os.path.abspath(model_name_or_path)))
        return Source(name, card_base_model=_card_base_model(os.path.join(model_name_or_path, "README.md")))
    parts = os.path.normpath(resolved_file or "").split(os.sep)
    commit = next((part for part in reversed(parts) if HUB_COMMIT.match(part)), None)
    return Source(model_name_or_path, commit)


def _card_base_model(path: str) -> str | None:
    """``base_model`` of a card's metadata (``kvemb build --base-model-id`` writes it for a local base)."""
    try:
        value = (metadata_load(path) or {}).get("base_model") if os.path.isfile(path) else None  # no header: None
    except (ValueError, yaml.YAMLError):  # a broken card header names no base; the model itself is unaffected
        return None
    value = value[0] if isinstance(value, list) and value else value
    return value if isinstance(value, str) else None


def base_source(base_model: str) -> Source:
    """The source of a model built in memory by ``from_base``: named after its base model."""
    stem = os.path.basename(os.path.normpath(base_model)).removesuffix(".gguf")
    return Source(f"kvemb-st/{stem}")


def content_revision(model: Any) -> str:
    """A short hash of every module's config and tensors (the post-processing statistics), in pipeline order.

    The KV-Embedding module holds no weights of its own (the frozen base is named, with its revision, in the
    config); the version of the package that wrote a config is left out, so re-saving a folder keeps it.
    """
    digest = hashlib.sha256()
    for module in model:
        config = _hashed_config(module)
        digest.update(f"{type(module).__name__}\n{json.dumps(jsonable(config), sort_keys=True, default=str)}\n".encode())
        if not hasattr(module, "auto_model"):  # the backbone's weights are identified by name + revision above
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(name.encode() + tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:REVISION_LENGTH]


def _hashed_config(module: Any) -> dict[str, Any]:
    """A module's config as its revision hashes it: without the writing package's version, and without a knob of
    a dataclass config that holds its default (its former default if it changed: :data:`FORMER_DEFAULTS`) -- so a
    knob added by a later version, whose default keeps the old behaviour, leaves the revision of every existing
    folder (and the results filed under it) as it was. The routing knobs of a baseline method, which never reads
    them, are left out whatever their value."""
    config = dict(module.get_config_dict()) if hasattr(module, "get_config_dict") else {}
    config.pop("kvemb_st_version", None)
    knobs = getattr(module, "config", None)
    if isinstance(knobs, KVEmbeddingConfig) and knobs.method != "kv":  # same vectors at any value: one revision
        for name in ROUTING_KNOBS:
            config.pop(name, None)
    if is_dataclass(knobs):
        for f in fields(knobs):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            default = FORMER_DEFAULTS.get((type(knobs).__name__, f.name), default)
            if default is not MISSING and f.name in config and config[f.name] == default:
                del config[f.name]
    return config


def jsonable(value: Any) -> Any:
    """``value`` with every mapping key a string (a Router's ``route_mappings`` are keyed by tuples)."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


def assign_identity(model: Any, source: Source, base_model: str | None) -> None:
    """Give ``model`` (a SentenceTransformer) the name, revision and base model that mteb reads."""
    card = model.model_card_data
    content = content_revision(model)
    model._kvemb_loaded_content = content  # a Hub commit names the model only while it holds what was downloaded
    card.model_name = source.name
    card.base_model = base_model
    card.base_model_revision = source.hub_commit or content


def current_revision(model: Any) -> str:
    """The revision that names ``model`` as it is now: its Hub commit while it holds what was downloaded, else the
    hash of its content, so a knob changed in memory (``max_seq_length``, a config field, a module added) since it
    was loaded is another revision and never gets the scores filed under the old one."""
    content = content_revision(model)
    commit = model.model_card_data.base_model_revision or ""
    loaded = getattr(model, "_kvemb_loaded_content", None)
    return commit if HUB_COMMIT.match(commit) and loaded == content else content


def refresh_revision(model: Any) -> None:
    """Set the revision mteb reads to :func:`current_revision` (after the model was changed in memory)."""
    model.model_card_data.base_model_revision = current_revision(model)


def training_datasets(model: Any) -> set[str]:
    """mteb task names whose training data the model saw: calibration texts drawn from STS-B train."""
    stsb = {calibration_hash(read_calibration_file(path)) for path in STSB_TRAIN_SETS}
    hashes: set[str] = set()
    names: list[str] = []
    for module in _with_routes(model):
        config = getattr(module, "config", None)
        selection = getattr(config, "layer_selection", None) or {}
        hashes.add(str(selection.get("calibration_hash", "")))
        record = getattr(module, "calibration", None) or {}
        for part in (record, record.get("document") or {}):
            hashes.add(str(part.get("hash", "")))
            names.append(str(part.get("name", "")))
    by_name = any(STSB_SET_NAME in name or name.startswith(f"{DEFAULT_CALIBRATION_FILE.name} shipped") for name in names)
    return {"STSBenchmark"} if hashes & stsb or by_name else set()


def _with_routes(model: Any) -> list[Any]:
    """The model's modules, each followed by the modules of its routes (a Router of side statistics keeps the
    calibration records in its routes)."""
    modules = []
    for module in model:
        routes = getattr(module, "sub_modules", None)  # a Router's: route name -> its modules
        modules += [module, *(m for route in (routes or {}).values() for m in route)]
    return modules


def mteb_model_meta(model: Any) -> Any:
    """mteb's ``ModelMeta`` of ``model``: what mteb reads itself, plus loader, parameters and training data. The
    model's revision is refreshed first (:func:`refresh_revision`), so the meta names the model as it is now."""
    from kvemb_st.benchmark import import_mteb, quiet_mteb

    import_mteb()
    from mteb.models import ModelMeta, SentenceTransformerEncoderWrapper

    refresh_revision(model)
    with quiet_mteb():
        meta = ModelMeta.from_sentence_transformer_model(model)
    return meta.model_copy(
        update=dict(
            loader=SentenceTransformerEncoderWrapper,
            n_parameters=sum(p.numel() for p in model.parameters()),
            training_datasets=training_datasets(model),
        )
    )


def mteb_model(model: Any, experiment_kwargs: dict[str, Any] | None = None) -> Any:
    """``model`` as ``mteb.evaluate`` should get it: mteb's own SentenceTransformer wrapper, carrying the full
    :func:`mteb_model_meta` (given a bare SentenceTransformer, mteb builds a meta without the parameter count and
    the calibration texts, so its zero-shot flag is wrong for a model calibrated on STS-B train).
    ``experiment_kwargs`` (e.g. a subsampling) become part of mteb's result path."""
    from kvemb_st.benchmark import quiet_mteb
    from mteb.models import SentenceTransformerEncoderWrapper

    meta = mteb_model_meta(model)
    if experiment_kwargs:
        meta = meta.model_copy(update={"experiment_kwargs": experiment_kwargs})
    with quiet_mteb():
        wrapper = SentenceTransformerEncoderWrapper(model)
    wrapper.mteb_model_meta = meta  # mteb.evaluate reads the meta of a wrapped model from this attribute
    return wrapper
