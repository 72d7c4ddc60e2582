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
from kvemb_st.config import CONFIG_FILE_NAME, ConfigError, KVEmbeddingConfig, is_hub_id
from kvemb_st.folder import CheckedConfigMixin
from kvemb_st.inputs import validate_texts
from kvemb_st.methods import HiddenStates, get_method
from kvemb_st.pooling import Readout
from kvemb_st.template import Template, resolve_template
from kvemb_st.template_tokenizer import TemplateTokenizer
from kvemb_st.version import __version__

logger = logging.get_logger(__name__)

REQUIREMENT = {"kvemb-st": f">={__version__}"}


class Side(NamedTuple):
    """How one side (plain ``encode``, ``query``, ``document``) wraps a text and reads out its vector."""

    template: Template
    readout: Readout


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
        self._sides: dict[str | None, Side] = {}
        for side in (None, *config.sides):
            template = Template.parse(config.side_settings(side)["template"], self.method.copies)
            self.method.prepare_template(template, tokenizer)  # fail at load time, not at the first encode
            readout = config.readout(side)
            readout.check_fits(backbone.config.num_hidden_layers, f"{config_source or 'config'}: {side or 'default'} side")
            self._sides[side] = Side(template, readout)
        self._template_tokenizer = TemplateTokenizer(tokenizer, config.max_seq_length)
        self._warned_truncation = False

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
        """The sentence-transformers prompts of the sides: each side's template, by which ST names the side.

        ST hands a module the prompt's text, not its name; :meth:`preprocess` maps it back to the side.
        """
        return {side: self.config.side_settings(side)["template"] for side in self.config.sides}

    def side_of(self, prompt: str | None, task: str | None) -> str | None:
        """The side a call uses: ``task`` (``encode_query``/``encode_document`` set it), else the side whose
        template ``prompt`` is (``encode(prompt_name="document")``), else the top-level settings (``None``)."""
        if task is not None and task in self._sides:
            return task
        return next((side for side, text in self.prompts.items() if prompt and prompt == text), None)

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

        ``text_mask`` adds the mask of the text's own tokens also where the side's readout does not need it.
        """
        texts = validate_texts(inputs)
        side = self.side_of(prompt, task)
        own = self._sides[side]
        extra = None if side is not None and prompt == self.prompts[side] else prompt  # the side's own template
        template = self.method.prepare_template(resolve_template(own.template, extra), self.tokenizer)
        features, truncated = self._template_tokenizer.encode(texts, template, text_mask=text_mask or own.readout.span == "text")
        features["side"] = side
        if truncated and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                f"{truncated} text(s) in this batch exceed max_seq_length={self.max_seq_length} tokens with the "
                "template; the texts were shortened and the template's instruction kept whole. "
                "(This warning is shown once per model.)"
            )
        return features

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        readout = self._sides[features.get("side")].readout
        hidden = self.run(features, readout.hidden_state_indices())
        embedding = readout.pool(hidden.final, features["attention_mask"], features.get("text_mask"), hidden.layers)
        features.update(
            token_embeddings=hidden.final,
            sentence_embedding=F.normalize(embedding, dim=-1),
        )
        return features

    def run(self, features: dict[str, torch.Tensor], hidden_states: Sequence[int] | None = None) -> HiddenStates:
        """The method's forward pass on preprocessed ``features``, keeping the given hidden-state indices."""
        return self.method.run(self.auto_model, self.tokenizer, self.config, features, hidden_states)

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
        **kwargs: Any,
    ) -> KVEmbedding:
        """Rebuild from a saved folder or Hub repo.

        ``revision``/``subfolder`` address the KV-Embedding repo only; the base model is loaded at the
        ``base_revision`` recorded in the config. ``trust_remote_code`` (passed by ST) is deliberately
        ignored for the base model. ``base_model`` overrides the config's base (e.g. a local copy).

        A config that did not come from a local folder (i.e. was downloaded) must name its base by Hub
        id: a downloaded file has no business pointing the loader at paths on this machine.
        """
        source = os.path.join(model_name_or_path, subfolder, CONFIG_FILE_NAME)
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
        return cls(
            config,
            token=token,
            cache_folder=cache_folder,
            local_files_only=local_files_only,
            model_kwargs=model_kwargs,
            config_source=source,
        )
