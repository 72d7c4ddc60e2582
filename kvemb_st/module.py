"""The sentence-transformers module: template -> tokens -> one re-routed forward pass -> pooled vector.

A saved folder holds only ``kvemb_config.json`` (plus ST's own JSON files and the model card); the
base model is referenced by id and revision or path and loaded at ``load`` time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from sentence_transformers.base.modules.input_module import InputModule
from transformers import PreTrainedModel
from transformers.utils import logging

from kvemb_st.backbone import load_backbone
from kvemb_st.benchmark.identity import Source, assign_identity, base_source, folder_source
from kvemb_st.chunking import Truncation, TruncationLog, split_long_texts
from kvemb_st.config import CONFIG_FILE_NAME, ConfigError, KVEmbeddingConfig, is_hub_id
from kvemb_st.folder import CheckedConfigMixin
from kvemb_st.inputs import validate_texts
from kvemb_st.methods import HiddenStates, get_method
from kvemb_st.pooling import Readout
from kvemb_st.side import SIDE_NAMES, Side, side_tag, tagged_side
from kvemb_st.template import Template, resolve_template
from kvemb_st.template_tokenizer import TemplateTokenizer
from kvemb_st.version import __version__

logger = logging.get_logger(__name__)

REQUIREMENT = {"kvemb-st": f">={__version__}"}


class _Prepared(NamedTuple):
    """A side made ready for encoding: its template parsed (and checked against the tokenizer), and the side."""

    template: Template
    side: Side


class KVEmbedding(CheckedConfigMixin, InputModule):
    """Training-free sentence embeddings from a frozen decoder-only LLM (KV-Embedding, arXiv 2601.01046).

    Args:
        config: All knobs; see :class:`~kvemb_st.config.KVEmbeddingConfig`.
        backbone, tokenizer: An already loaded base model (with ``attn_implementation="kvemb_reroute"``)
            and its tokenizer; loaded from ``config.base_model`` when omitted.
        token, cache_folder, local_files_only, model_kwargs: Passed to the base model's ``from_pretrained``.
    """

    config_file_name = CONFIG_FILE_NAME
    save_in_root = True
    forward_kwargs = {"task"}  # the side: "query" / "document" (encode_query / encode_document), None for encode
    source: Source | None = None  # set by load(); a model built in memory is named after its base

    def __init__(
        self,
        config: KVEmbeddingConfig,
        backbone: PreTrainedModel | None = None,
        tokenizer: Any = None,
        *,
        token: bool | str | None = None,
        cache_folder: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        config_source: str | None = None,
    ) -> None:
        super().__init__()
        if backbone is None:
            backbone, tokenizer = load_backbone(
                config.base_model,
                config.base_revision,
                token=token,
                cache_folder=cache_folder,
                local_files_only=local_files_only,
                model_kwargs=model_kwargs,
            )
        elif tokenizer is None:
            raise ValueError("a tokenizer must be given together with a preloaded backbone")
        config.check_layers_fit(backbone.config.num_hidden_layers, config_source)
        self.config = config
        self.auto_model = backbone
        self.tokenizer = tokenizer
        self.method = get_method(config.method)
        self._sides: dict[str | None, _Prepared] = {}
        for name in (None, *config.sides):
            side = config.side(name)
            template = Template.parse(side.template, self.method.copies)
            self.method.prepare_template(template, tokenizer)  # fail at load time, not at the first encode
            where = f"{config_source or 'config'}: {name or 'default'} side"
            side.readout.check_fits(backbone.config.num_hidden_layers, where)
            self._sides[name] = _Prepared(template, side)
        self._template_tokenizer = TemplateTokenizer(tokenizer, config.max_seq_length)
        self._truncation = TruncationLog()

    # ----------------------------------------------------------------------------------------- config
    def get_config_dict(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "kvemb_st_version": __version__}

    @property
    def max_seq_length(self) -> int:
        return self.config.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.config.max_seq_length = value
        self.config.validate()
        self._template_tokenizer = TemplateTokenizer(self.tokenizer, value)

    def get_embedding_dimension(self) -> int:
        return self.auto_model.config.hidden_size

    # ------------------------------------------------------------------------------------ sides
    @property
    def prompts(self) -> dict[str, str]:
        """The sentence-transformers prompts of the sides: each side's tag (:func:`~kvemb_st.side.side_tag`), so that
        ``encode(prompt_name=side)`` reaches the side by the prompt's name, whatever its template and readout."""
        return {name: side_tag(name) for name in self.config.sides}

    def on_model_ready(self, model: Any) -> None:
        """ST's hook once the model is built (and its saved prompts merged): prompts checked, identity given."""
        self._check_prompts(model)
        self._assign_identity(model)

    def _check_prompts(self, model: Any) -> None:
        """Check the model's ST prompts against the sides.

        A side's prompt left empty, or holding the side's template (a folder saved by kvemb-st 0.1), becomes the
        side's tag. Any other prompt named like a side, or one that tags another side, is refused: ``encode(prompt_name=...)``
        and ``encode_query``/``encode_document`` would then read out different sides.
        """
        prompts = model.prompts
        for name, text in prompts.items():
            tagged = tagged_side(text)
            if name in self.config.sides and text in ("", self.config.side(name).template):
                prompts[name] = side_tag(name)  # not set (ST's default ""), or a folder of kvemb-st 0.1
            elif name in self.config.sides and tagged != name:
                raise ValueError(
                    f"ST prompt {name!r} is {text!r}, but {name!r} is a side of this model, reached by the prompt "
                    f"{side_tag(name)!r}; drop the prompt, pass an instruction with prompt=... (it goes before the "
                    "text inside the side's template), or give it another name"
                )
            elif tagged is not None and name in SIDE_NAMES and tagged != name:
                raise ValueError(
                    f"ST prompt {name!r} is the tag of side {tagged!r}: encode_{name} and encode(prompt_name={name!r}) "
                    "would read out different sides; drop the prompt or give it another name"
                )

    def side_for(self, prompt: str | None, task: str | None) -> tuple[str | None, str | None]:
        """The side a call uses and the prompt left to insert into its template.

        The side is ``task`` (``encode_query``/``encode_document`` set it) or the side a tag prompt names
        (``encode(prompt_name="document")``); ``None`` is plain ``encode``. A ``query``/``document`` task without a
        side of its own reads out like plain ``encode``.
        """
        tagged = tagged_side(prompt)
        if tagged is not None:
            if task is not None and task != tagged:
                raise ValueError(f"task {task!r} and the prompt of side {tagged!r} disagree on the side; pass one of them")
            task, prompt = tagged, None
        if task is not None and task not in SIDE_NAMES:
            raise ValueError(f"unknown task {task!r}: a KV-Embedding model knows the sides {SIDE_NAMES} (or none)")
        return task, prompt

    # ------------------------------------------------------------------------------------ input / forward
    def preprocess(
        self,
        inputs: Sequence[str],
        prompt: str | None = None,
        task: str | None = None,
        text_mask: bool = False,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor | Any]:
        """Wrap each text in its side's template (plus an ST prompt, see :func:`resolve_template`) and tokenize.

        The side goes into ``features["task"]``, where :meth:`forward` and a following ``Router`` find it when
        ``encode`` named the side only by its prompt. ``text_mask`` adds the mask of the text's own tokens also where
        the side's readout does not need it. A text over ``max_seq_length`` is truncated, or with
        ``long_inputs="chunk"`` becomes several rows, its chunks, which ``features["chunks"]`` (a
        :class:`~kvemb_st.chunking.ChunkPlan`) maps back to it.
        """
        texts = validate_texts(inputs)
        task, prompt = self.side_for(prompt, task)
        own = self._sides.get(task, self._sides[None])
        template = self.method.prepare_template(resolve_template(own.template, prompt), self.tokenizer)
        text_mask = text_mask or own.side.readout.span == "text"
        if own.side.long_inputs == "chunk":
            rows, plan = split_long_texts(texts, template, self.tokenizer, self.max_seq_length)
            features, _ = self._template_tokenizer.encode(rows, template, text_mask=text_mask)  # every row fits
            if plan is not None:
                features["chunks"] = plan
        else:
            features, truncated = self._template_tokenizer.encode(texts, template, text_mask=text_mask)
            if truncated.texts:
                self._warn_truncation(truncated)
        features["task"] = task
        return features

    def _warn_truncation(self, truncated: Truncation) -> None:
        """Say how much truncation dropped: at the first truncated text, then at 10, 100, ... (see TruncationLog)."""
        if self._truncation.add(truncated.texts, truncated.tokens):
            logger.warning(
                f"{truncated.texts} text(s) in this batch exceed max_seq_length={self.max_seq_length} tokens with the "
                f"template: {truncated.tokens} token(s) were cut from their ends (the template's instruction kept whole); "
                f"{self._truncation.texts} text(s) and {self._truncation.tokens} token(s) so far for this model. "
                "Set long_inputs='chunk' to embed every token. (Shown again at 10, 100, ... truncated texts.)"
            )

    def forward(self, features: dict[str, torch.Tensor], task: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """One unit vector per input text. ``task`` (from ``encode``) or ``features["task"]`` (from :meth:`preprocess`)
        picks the side; the chunk rows of a long text are combined here, so that every module after this one sees
        one row per text (with ``chunk_combine="after"`` the rows ride along for the post-processing module to
        combine once it has transformed them, see :class:`~kvemb_st.chunking.ChunkRows`)."""
        task = features.get("task") if task is None else task
        own = self._sides.get(task, self._sides[None])
        plan = features.pop("chunks", None)
        if plan is not None:
            embed = lambda group: self._embed(group, own.side.readout)  # noqa: E731
            return plan.forward(features, embed, own.side.chunk_weights, own.side.chunk_combine)
        features.update(self._embed(features, own.side.readout))
        return features

    def _embed(self, features: dict[str, torch.Tensor], readout: Readout) -> dict[str, torch.Tensor]:
        hidden = self.run(features, readout.hidden_state_indices())
        embedding = readout.pool(hidden.final, features["attention_mask"], features.get("text_mask"), hidden.layers)
        return {"token_embeddings": hidden.final, "sentence_embedding": F.normalize(embedding, dim=-1)}

    def run(self, features: dict[str, torch.Tensor], hidden_states: Sequence[int] | None = None) -> HiddenStates:
        """The method's forward pass on preprocessed ``features``, keeping the given hidden-state indices."""
        return self.method.run(self.auto_model, self.tokenizer, self.config, features, hidden_states)

    def _assign_identity(self, model: Any) -> None:
        """Give the finished model a name and revision, so mteb and its result cache tell models apart."""
        from kvemb_st.model_card import hub_base_model

        source = self.source or base_source(self.config.base_model)
        assign_identity(model, source, hub_base_model(self.config) or source.card_base_model)

    # ------------------------------------------------------------------------------------- save / load
    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write the config only -- never weights -- and record our package as a requirement of the folder."""
        self.save_config(output_path)
        st_config_path = os.path.join(output_path, "config_sentence_transformers.json")
        if os.path.exists(st_config_path):  # written by SentenceTransformer.save just before the modules
            with open(st_config_path, encoding="utf-8") as f:
                st_config = json.load(f)
            st_config["requirements"] = {**(st_config.get("requirements") or {}), **REQUIREMENT}
            with open(st_config_path, "w", encoding="utf-8") as f:
                json.dump(st_config, f, indent=2, sort_keys=True)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        base_model: str | None = None,
        backend: str = "torch",
        processor_kwargs: dict[str, Any] | None = None,
        config_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> KVEmbedding:
        """Rebuild from a saved folder or Hub repo.

        ``revision``/``subfolder`` address the KV-Embedding repo only; the base model is loaded at the
        ``base_revision`` recorded in the config. ``trust_remote_code`` (passed by ST) is deliberately
        ignored for the base model. ``base_model`` overrides the config's base (e.g. a local copy).
        ST's ``backend``, ``processor_kwargs`` and ``config_kwargs`` cannot be honoured (see
        :func:`_refuse_unsupported_loading`): asked for, they are refused rather than ignored.

        A config that did not come from a local folder (i.e. was downloaded) must name its base by Hub
        id: a downloaded file has no business pointing the loader at paths on this machine.
        """
        source = os.path.join(model_name_or_path, subfolder, CONFIG_FILE_NAME)
        _refuse_unsupported_loading(model_name_or_path, backend, processor_kwargs, config_kwargs)
        data = cls.load_config(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        if not data:
            raise ConfigError(f"{source} not found: '{model_name_or_path}' is not a KV-Embedding model folder")
        config = KVEmbeddingConfig.from_dict(data, source=source)
        if base_model is not None:
            config.base_model = base_model
        elif not os.path.isdir(model_name_or_path):  # downloaded: the base must come from the Hub too
            if not is_hub_id(config.base_model):
                raise ConfigError(
                    f"{source}: key 'base_model' is {config.base_model!r}, a local path, but this config was "
                    "downloaded from the Hub; a published model must name its base by Hub id. If you trust it, "
                    "pass the base explicitly: kvemb_st.load(..., base_model=PATH_OR_ID)."
                )
            if os.path.exists(config.base_model):  # transformers would prefer the local folder to the Hub repo
                raise ConfigError(
                    f"{source}: key 'base_model' is the Hub id {config.base_model!r}, but a folder of that name "
                    f"exists under the current directory ({os.path.abspath(config.base_model)}), and it would be "
                    "loaded instead of the Hub repo. Run from another directory, or pass the base explicitly: "
                    "kvemb_st.load(..., base_model=PATH_OR_ID)."
                )
        module = cls(
            config,
            token=token,
            cache_folder=cache_folder,
            local_files_only=local_files_only,
            model_kwargs=model_kwargs,
            config_source=source,
        )
        resolved = cls.load_file_path(
            model_name_or_path, CONFIG_FILE_NAME, subfolder=subfolder, token=token, cache_folder=cache_folder,
            revision=revision, local_files_only=local_files_only,
        )  # fmt: skip
        module.source = folder_source(model_name_or_path, resolved)
        return module


def _refuse_unsupported_loading(
    name: str, backend: str, processor_kwargs: dict[str, Any] | None, config_kwargs: dict[str, Any] | None
) -> None:
    """Refuse ST loading options this module cannot honour, instead of loading a model that quietly ignores them.

    The re-routing lives in the PyTorch attention of the base model, so an exported ONNX / OpenVINO graph cannot
    run it; the tokenizer and the base model's config are the ones the folder's layer window and statistics were
    computed with, so neither is changed at load time.
    """
    if backend != "torch":
        raise ValueError(
            f"{name}: backend={backend!r} is not supported: KV-Embedding re-routes keys and values inside the "
            "PyTorch attention of the base model, which an exported graph does not have. Load it with "
            "backend='torch' (the default)."
        )
    for option, value, remedy in (
        ("processor_kwargs", processor_kwargs, "the tokenizer is the base model's, as the folder's template and "
         "max_seq_length use it; set max_seq_length on the loaded model, templates with kvemb build"),
        ("config_kwargs", config_kwargs, "the base model's config is the one the folder's layers and statistics "
         "were computed for; loading options such as dtype or device_map go in model_kwargs"),
    ):  # fmt: skip
        if value:
            raise ValueError(f"{name}: {option}={value!r} is not supported: {remedy}.")
