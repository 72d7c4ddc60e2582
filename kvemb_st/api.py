"""Entry points: build a KV-Embedding model from a base LLM, or load a saved one without remote code."""

from __future__ import annotations

import os
import re
from typing import Any

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Router
from sentence_transformers.util import load_file_path
from sentence_transformers.util.environment import check_version_requirements

from kvemb_st.config import KVEmbeddingConfig
from kvemb_st.layer_spec import parse_layer_spec
from kvemb_st.folder import damaged, read_json
from kvemb_st.inputs import validate_texts
from kvemb_st.module import KVEmbedding
from kvemb_st.postprocessing import PostProcessing
from kvemb_st.side import SIDE_NAMES
from kvemb_st.side_router import ROUTER_TYPE, route_of

MODULE_TYPE = f"{KVEmbedding.__module__}.{KVEmbedding.__name__}"
POSTPROCESSING_TYPE = f"{PostProcessing.__module__}.{PostProcessing.__name__}"
# The only pipelines kvemb_st.load builds: nothing else is ever imported or instantiated from a folder (a Router's
# routes may hold only PostProcessing modules).
ALLOWED_PIPELINES = ((MODULE_TYPE,), (MODULE_TYPE, POSTPROCESSING_TYPE), (MODULE_TYPE, ROUTER_TYPE))


class KVSentenceTransformer(SentenceTransformer):
    """A ``SentenceTransformer`` that checks inputs before ST sorts them, so errors name the caller's index.

    Returned by :func:`from_base` and :func:`load`; everything else is plain sentence-transformers.
    """

    def encode(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(inputs, str):
            validate_texts(inputs, where="in the inputs")
        return super().encode(inputs, *args, **kwargs)


def from_base(
    base_model: str,
    layers: str | list[int] | range = (),
    *,
    base_revision: str | None = None,
    query_template: str | None = None,
    document_template: str | None = None,
    device: str | None = None,
    token: bool | str | None = None,
    cache_folder: str | None = None,
    local_files_only: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    **knobs: Any,
) -> KVSentenceTransformer:
    """Wrap a frozen base LLM (Hub id, folder or ``.gguf``) as a KV-Embedding ``SentenceTransformer``.

    ``knobs`` are fields of :class:`~kvemb_st.config.KVEmbeddingConfig` (``prefix_bias``, ``prefix_rope``,
    ``pooling``, ``template``, ``sides``, ...). ``query_template``/``document_template`` are shorthands for
    ``sides={"query": {"template": ...}, ...}``: the templates of ``encode_query``/``encode_document``.
    """
    sides = {side: dict(settings) for side, settings in (knobs.pop("sides", None) or {}).items()}
    for side, template in (("query", query_template), ("document", document_template)):
        if template:
            sides.setdefault(side, {})["template"] = template
    config = KVEmbeddingConfig(
        base_model=base_model, base_revision=base_revision, layers=parse_layer_spec(layers), sides=sides, **knobs
    )
    module = KVEmbedding(
        config, token=token, cache_folder=cache_folder, local_files_only=local_files_only, model_kwargs=model_kwargs
    )
    return KVSentenceTransformer(
        modules=[module], prompts=module.prompts, similarity_fn_name="cosine", device=_st_device(device, module, model_kwargs)
    )


def _st_device(device: str | None, module: KVEmbedding, model_kwargs: dict[str, Any] | None) -> str | None:
    """Keep a backbone placed by ``device_map`` where it is.

    ST reads ``device_map`` only when it loads the modules itself; handed ready-made modules, it would
    move them to its default device (e.g. ``cuda:0`` for ``device_map="cpu"``). A multi-device map keeps
    its accelerate hooks, which ST already respects.
    """
    if device is None and (model_kwargs or {}).get("device_map") is not None:
        return str(module.auto_model.device)
    return device


def _read_json(name_or_path: str, filename: str, hub_kwargs: dict[str, Any], kind: type = dict) -> Any:
    path = load_file_path(name_or_path, filename, **hub_kwargs)
    return None if path is None else read_json(path, kind)


def load(
    model_name_or_path: str,
    *,
    device: str | None = None,
    revision: str | None = None,
    token: bool | str | None = None,
    cache_folder: str | None = None,
    local_files_only: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    base_model: str | None = None,
) -> KVSentenceTransformer:
    """Load a saved KV-Embedding folder or Hub repo without ``trust_remote_code``.

    ``base_model`` replaces the base named in the config, e.g. with a local copy of it.

    Safe because nothing from the repo is imported: ``modules.json`` must list exactly one of
    :data:`ALLOWED_PIPELINES` -- our own, already-installed :class:`KVEmbedding`, optionally followed by
    :class:`~kvemb_st.postprocessing.PostProcessing` (whose folder holds a JSON config and float32 statistics
    in safetensors) or by a ``Router`` of them, one per side (:mod:`kvemb_st.side_router`) -- and anything else
    is refused.
    """
    hub_kwargs = {"token": token, "cache_folder": cache_folder, "revision": revision, "local_files_only": local_files_only}
    modules = _read_json(model_name_or_path, "modules.json", hub_kwargs, list)
    if modules is None:
        raise FileNotFoundError(f"'{model_name_or_path}' has no modules.json: not a sentence-transformers model")
    if not all(isinstance(m, dict) and isinstance(m.get("path", ""), str) for m in modules):
        raise damaged(
            f"{model_name_or_path}/modules.json",
            f"must be a list of module entries with a string 'path', got {modules!r}",
        )
    types = tuple(m.get("type") for m in modules)
    if types not in ALLOWED_PIPELINES:
        allowed = " or ".join(str(list(pipeline)) for pipeline in ALLOWED_PIPELINES)
        raise ValueError(
            f"{model_name_or_path}/modules.json lists modules {list(types)}; kvemb_st.load only loads "
            f"{allowed}. Use SentenceTransformer(..., trust_remote_code=True) for other models."
        )
    st_config = _read_json(model_name_or_path, "config_sentence_transformers.json", hub_kwargs) or {}
    check_version_requirements(st_config.get("requirements"), source=model_name_or_path)
    # the small statistics first, so that a broken folder fails before the base model is loaded
    load_after = {POSTPROCESSING_TYPE: PostProcessing.load, ROUTER_TYPE: _load_router}
    after = [load_after[m["type"]](model_name_or_path, subfolder=m.get("path", ""), **hub_kwargs) for m in modules[1:]]
    module = KVEmbedding.load(
        model_name_or_path,
        subfolder=modules[0].get("path", ""),
        model_kwargs=model_kwargs,
        base_model=base_model,
        **hub_kwargs,
    )
    return KVSentenceTransformer(
        modules=[module, *after],
        prompts=st_config.get("prompts") or {},
        default_prompt_name=st_config.get("default_prompt_name"),
        similarity_fn_name=st_config.get("similarity_fn_name") or "cosine",
        device=_st_device(device, module, model_kwargs),
    )


def _load_router(model_name_or_path: str, subfolder: str = "", **hub_kwargs: Any) -> Router:
    """A Router whose routes are one :class:`PostProcessing` each, one route for every side: its
    ``router_config.json`` is checked before anything is instantiated, and no other class is ever imported."""
    where = os.path.join(model_name_or_path, subfolder, Router.config_file_name)
    config = _read_json(model_name_or_path, Router.config_file_name, {**hub_kwargs, "subfolder": subfolder})
    if config is None:
        raise damaged(where, "is missing: the post-processing routes are unknown")
    types, structure, parameters = (config.get(key) for key in ("types", "structure", "parameters"))
    if set(config) != {"types", "structure", "parameters"} or not all(isinstance(v, dict) for v in config.values()):
        raise damaged(where, f"must hold the objects 'types', 'structure' and 'parameters', got keys {sorted(config)}")
    others = sorted({str(kind) for kind in types.values()} - {POSTPROCESSING_TYPE})
    if others:
        raise ValueError(
            f"{where} routes to modules {others}; kvemb_st.load only loads routes of {POSTPROCESSING_TYPE}. Use "
            "SentenceTransformer(..., trust_remote_code=True) for other models."
        )
    bad = [name for name in types if not re.fullmatch(r"\w[\w.-]*", name) or ".." in name]
    bad += [f"route {route!r}" for route, ids in structure.items()
            if not (isinstance(ids, list) and len(ids) == 1 and ids[0] in types)]  # fmt: skip
    bad += [f"parameter {key!r}" for key in sorted(set(parameters) - set(Router.config_keys))]
    if bad:
        raise damaged(where, f"bad entries {bad}: each route holds one module of 'types', named by a plain folder name")
    router = Router.load(model_name_or_path, subfolder=subfolder, module_classes={POSTPROCESSING_TYPE: PostProcessing},
                         **hub_kwargs).eval()  # fmt: skip
    for side in (None, *SIDE_NAMES):
        try:
            route_of(router, side)
        except (ValueError, KeyError) as err:
            raise damaged(where, f"no route for {f'side {side!r}' if side else 'plain encode'} ({err})") from None
    return router
