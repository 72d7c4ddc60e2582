"""The embedding methods of one module: KV-Embedding and the training-free baselines it is measured against.

All methods share tokenization (template, right padding, text-only truncation), batching, save/load and
the sentence-transformers API; a method only decides its default template and pooling and what happens
inside the single forward pass. The config's ``method`` field selects one:

- ``kv``: KV-Embedding (Tang & Yang, arXiv 2601.01046). At the selected ``layers`` the final token's
  key/value of that layer is prepended as an extra attention slot (see :mod:`kvemb_st.attention`).
- ``mean`` / ``last``: the raw text, mean-pooled or last-token-pooled final hidden states ("classical"
  LLM embeddings, e.g. the baselines of Springer et al. 2024 and Jiang et al. 2023).
- ``prompteol``: PromptEOL (Jiang et al. 2023, "Scaling Sentence Embeddings with Large Language Models",
  arXiv 2307.16645): ``This sentence : "{text}" means in one word:"``, last token.
- ``echo``: echo embeddings (Springer et al. 2024, "Repetition Improves Language Model Embeddings",
  arXiv 2402.15449): the text appears twice ("Rewrite the sentence: x, rewritten sentence: x") and the
  tokens of the second copy, which have seen the whole text, are mean-pooled.
- ``token_prepending``: Token Prepending (Fu et al. 2024, "Token Prepending: A Training-Free Approach for
  Eliciting Better Sentence Embeddings from LLMs", arXiv 2412.11556, ACL 2025): see :class:`TokenPrepending`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle

from kvemb_st.config import PROMPTEOL_TEMPLATE, ConfigError, KVEmbeddingConfig, _where, validate_template
from kvemb_st.pooling import last_token_index
from kvemb_st.prompting import Template

if TYPE_CHECKING:
    from kvemb_st.module import KVEmbedding

PLACEHOLDER = "<PST>"
RAW_TEMPLATE = "{text}"
ECHO_TEMPLATE = "Rewrite the sentence: {text}, rewritten sentence: {text}"
TOKEN_PREPENDING_TEMPLATE = 'This sentence : <PST> "{text}" means in one word:"'


@dataclass(frozen=True)
class Method:
    """One embedding recipe: default template and pooling, plus one plain forward pass of the backbone.

    The forward pass re-routes K/V exactly when the config selects ``layers``, which only ``kv`` may do.
    The number of ``{text}`` placeholders of the default template is the number of copies of the text
    every template of this method must hold (2 for echo, 1 otherwise).
    """

    name: str
    template: str
    pooling: str

    @property
    def copies(self) -> int:
        return self.template.count(RAW_TEMPLATE)

    def check_config(self, config: KVEmbeddingConfig, source: str | None = None) -> None:
        """Raise :class:`ConfigError` for knobs that do not belong to this method."""
        validate_template(config.template, _where(source, "template"), copies=self.copies)
        if not config.layers and self.name == "kv":
            raise ConfigError(
                f"{_where(source, 'layers')} is empty: method 'kv' re-routes at least one layer. Pass e.g. "
                "layers='20-29', let `kvemb build` choose them, or use method='prompteol' for the prompt alone"
            )
        if config.layers and self.name != "kv":
            raise ConfigError(
                f"{_where(source, 'layers')}: re-routed layers {config.layers} only apply to method 'kv', not "
                f"{self.name!r}; drop 'layers' or use method='kv'"
            )
        if config.tp_layers is not None and self.name != "token_prepending":
            raise ConfigError(
                f"{_where(source, 'tp_layers')} only applies to method 'token_prepending', not {self.name!r}"
            )

    def prepare_template(self, template: Template, tokenizer: Any) -> Template:
        """The template actually tokenized; the identity except for Token Prepending's placeholder."""
        return template

    def run(self, module: KVEmbedding, features: dict[str, torch.Tensor], **model_kwargs: Any) -> torch.Tensor:
        """One forward pass; returns the final hidden states ``(batch, seq, hidden)``."""
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        output = module.auto_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            kv_routing=module.routing(input_ids, attention_mask),
            use_cache=False,
            **model_kwargs,
        )
        return output.last_hidden_state


@dataclass(frozen=True)
class Prepending:
    """Per-call data of Token Prepending, passed as the ``token_prepending`` keyword of the model call.

    Attributes:
        layers: Decoder layers at whose input the placeholder's state is replaced.
        placeholder_index: ``(batch,)`` position of the placeholder token.
        last_index: ``(batch,)`` position of the final real token.
    """

    layers: frozenset[int]
    placeholder_index: torch.Tensor
    last_index: torch.Tensor


def default_tp_layers(num_layers: int) -> list[int]:
    """Layers 1 .. 7/32 of the depth: the paper's Llama-2-7B setting (layers 1-6 of 32) scaled to the backbone."""
    return list(range(1, min(num_layers, max(2, round(num_layers * 7 / 32)))))


def _prepend_hook(layer_index: int, layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: the placeholder's input state becomes the final token's state (previous layer's output).

    It acts only on calls that carry a :class:`Prepending` for this layer, so a backbone shared by several
    modules or threads is never affected by another call's hooks.
    """
    prepending: Prepending | None = kwargs.get("token_prepending")
    if prepending is None or layer_index not in prepending.layers:
        return None
    hidden = (args[0] if args else kwargs["hidden_states"]).clone()
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    hidden[rows, prepending.placeholder_index] = hidden[rows, prepending.last_index]
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextmanager
def _prepend_hooks(model: torch.nn.Module, layers: frozenset[int]) -> Iterator[None]:
    handles: list[RemovableHandle] = [
        layer.register_forward_pre_hook(functools.partial(_prepend_hook, index), with_kwargs=True)
        for index, layer in enumerate(model.layers)
        if index in layers
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class TokenPrepending(Method):
    """Token Prepending (Fu et al. 2024, arXiv 2412.11556): a placeholder ``<PST>`` token sits before the
    sentence; at the input of each early layer in ``tp_layers`` its hidden state is replaced by the previous
    layer's final-token state, so the sentence's early tokens can attend to a summary of the whole sentence
    despite causal attention. Last-token pooling.

    The paper adds ``<PST>`` to the vocabulary with a random embedding. A frozen backbone's vocabulary is
    not grown here; the tokenizer's EOS token stands in for it. Its embedding is only seen by layer 0,
    since from the first layer in ``tp_layers`` on the state is overwritten. The paper's early exit (reading
    an intermediate layer) is not applied: all methods pool the final hidden states.
    """

    def check_config(self, config: KVEmbeddingConfig, source: str | None = None) -> None:
        super().check_config(config, source)
        prefix = config.template.split(RAW_TEMPLATE)[0]
        if prefix.count(PLACEHOLDER) != 1 or config.template.count(PLACEHOLDER) != 1:
            raise ConfigError(
                f"{_where(source, 'template')} of method 'token_prepending' must hold the placeholder "
                f"'{PLACEHOLDER}' exactly once, before '{{text}}', e.g. {TOKEN_PREPENDING_TEMPLATE!r}; "
                f"got {config.template!r}"
            )

    def prepare_template(self, template: Template, tokenizer: Any) -> Template:
        if template.prefix.count(PLACEHOLDER) != 1:
            raise ValueError(
                f"token_prepending needs the placeholder '{PLACEHOLDER}' once before the text in the template or "
                f"prompt, e.g. {TOKEN_PREPENDING_TEMPLATE!r}; got prefix {template.prefix!r}"
            )
        return replace(template, prefix=template.prefix.replace(PLACEHOLDER, placeholder_token(tokenizer)))

    def run(self, module: KVEmbedding, features: dict[str, torch.Tensor], **model_kwargs: Any) -> torch.Tensor:
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        placeholder_id = module.tokenizer.convert_tokens_to_ids(placeholder_token(module.tokenizer))
        hits = (input_ids == placeholder_id) & attention_mask.bool()
        if not bool(hits.any(dim=1).all()):
            raise ValueError(
                f"token_prepending: the tokenizer did not keep the placeholder {placeholder_token(module.tokenizer)!r} "
                "as one token in every row of the batch"
            )
        tp_layers = module.config.tp_layers
        if tp_layers is None:
            tp_layers = default_tp_layers(module.auto_model.config.num_hidden_layers)
        prepending = Prepending(frozenset(tp_layers), hits.int().argmax(dim=1), last_token_index(attention_mask))
        with _prepend_hooks(module.auto_model, prepending.layers):
            return super().run(module, features, token_prepending=prepending, **model_kwargs)


def placeholder_token(tokenizer: Any) -> str:
    """The existing single token that stands in for ``<PST>`` (see :class:`TokenPrepending`)."""
    if not tokenizer.eos_token:
        raise ValueError(f"token_prepending needs a tokenizer with an EOS token; {type(tokenizer).__name__} has none")
    return tokenizer.eos_token


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("kv", PROMPTEOL_TEMPLATE, "mean+last"),
        Method("mean", RAW_TEMPLATE, "mean"),
        Method("last", RAW_TEMPLATE, "last"),
        Method("prompteol", PROMPTEOL_TEMPLATE, "last"),
        Method("echo", ECHO_TEMPLATE, "mean"),
        TokenPrepending("token_prepending", TOKEN_PREPENDING_TEMPLATE, "last"),
    )
}


def get_method(name: str, where: str = "'method'") -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"{where} must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
