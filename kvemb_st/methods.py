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
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from kvemb_st.attention.routing import KVRouting, is_right_padded
from kvemb_st.config import (
    METHOD_DEFAULTS,
    PLACEHOLDER,
    TEXT_PLACEHOLDER,
    TOKEN_PREPENDING_TEMPLATE,
    ConfigError,
    KVEmbeddingConfig,
)
from kvemb_st.pooling import last_token_index
from kvemb_st.template import Template


class HiddenStates(NamedTuple):
    """What one forward pass hands to the readout: the final states and some layers' (by hidden-state index)."""

    final: torch.Tensor
    layers: dict[int, torch.Tensor]


@dataclass(frozen=True)
class Method:
    """One embedding recipe: default template and pooling (from the config's table), plus one forward pass.

    The number of ``{text}`` placeholders of the default template is the number of copies of the text
    every template of this method must hold (2 for echo, 1 otherwise).
    """

    name: str
    template: str
    pooling: str

    @property
    def copies(self) -> int:
        return self.template.count(TEXT_PLACEHOLDER)

    def prepare_template(self, template: Template, tokenizer: Any) -> Template:
        """The template actually tokenized; the identity except for Token Prepending's placeholder."""
        return template

    def run(
        self,
        backbone: PreTrainedModel,
        tokenizer: Any,
        config: KVEmbeddingConfig,
        features: dict[str, torch.Tensor],
        hidden_states: Sequence[int] | None = None,
        **model_kwargs: Any,
    ) -> HiddenStates:
        """One plain forward pass: the final hidden states ``(batch, seq, hidden)`` and, for the indices in
        ``hidden_states`` (0 = embeddings, ``i + 1`` = output of layer ``i``), those layers' states too.

        Only the asked-for layers are kept (transformers' ``output_hidden_states`` takes indices, per call).
        """
        if hidden_states:
            model_kwargs["output_hidden_states"] = list(hidden_states)
        output = backbone(
            input_ids=features["input_ids"], attention_mask=features["attention_mask"], use_cache=False, **model_kwargs
        )
        layers = {index: output.hidden_states[index] for index in hidden_states or ()}
        return HiddenStates(output.last_hidden_state, layers)


def kv_routing(
    backbone: PreTrainedModel, config: KVEmbeddingConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> KVRouting:
    """The re-routing data of one call of method ``kv``: the config's knobs plus what this batch determines.

    The rotary tables are the backbone's own at every position (only ``start``/``relative0`` need them);
    ``right_padded`` is checked on this batch's mask, never assumed.
    """
    cos = sin = None
    if config.prefix_rope != "keep":
        cos, sin = rotary_tables(backbone, input_ids)
    return KVRouting(
        layers=frozenset(config.layers),
        last_index=last_token_index(attention_mask),
        prefix_bias=config.prefix_bias,
        prefix_rope=config.prefix_rope,
        cos=cos,
        sin=sin,
        right_padded=is_right_padded(attention_mask),
    )


def rotary_tables(backbone: PreTrainedModel, input_ids: torch.Tensor) -> tuple[Any, Any]:
    """The backbone's ``(cos, sin)`` at every position of ``input_ids``.

    A rotary module that takes a ``layer_type`` (Gemma 3: local RoPE on sliding-window layers, global RoPE
    on full-attention ones) gives one table per type in ``config.layer_types``, as mappings keyed by type.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    dtype_probe = torch.empty(0, dtype=backbone.dtype, device=input_ids.device)
    rotary = backbone.rotary_emb
    if "layer_type" not in inspect.signature(rotary.forward).parameters:
        return rotary(dtype_probe, positions)
    kinds = sorted(set(backbone.config.layer_types))
    tables = {kind: rotary(dtype_probe, positions, layer_type=kind) for kind in kinds}
    return {kind: cos for kind, (cos, _) in tables.items()}, {kind: sin for kind, (_, sin) in tables.items()}


@dataclass(frozen=True)
class KVMethod(Method):
    """KV-Embedding: the forward pass re-routes the final token's K/V at the config's ``layers``."""

    def run(
        self,
        backbone: PreTrainedModel,
        tokenizer: Any,
        config: KVEmbeddingConfig,
        features: dict[str, torch.Tensor],
        hidden_states: Sequence[int] | None = None,
        **model_kwargs: Any,
    ) -> HiddenStates:
        routing = kv_routing(backbone, config, features["input_ids"], features["attention_mask"])
        return super().run(backbone, tokenizer, config, features, hidden_states, kv_routing=routing, **model_kwargs)


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

    def prepare_template(self, template: Template, tokenizer: Any) -> Template:
        if template.prefix.count(PLACEHOLDER) != 1:
            raise ValueError(
                f"token_prepending needs the placeholder '{PLACEHOLDER}' once before the text in the template or "
                f"prompt, e.g. {TOKEN_PREPENDING_TEMPLATE!r}; got prefix {template.prefix!r}"
            )
        return replace(template, prefix=template.prefix.replace(PLACEHOLDER, placeholder_token(tokenizer)))

    def run(
        self,
        backbone: PreTrainedModel,
        tokenizer: Any,
        config: KVEmbeddingConfig,
        features: dict[str, torch.Tensor],
        hidden_states: Sequence[int] | None = None,
        **model_kwargs: Any,
    ) -> HiddenStates:
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        placeholder_id = tokenizer.convert_tokens_to_ids(placeholder_token(tokenizer))
        hits = (input_ids == placeholder_id) & attention_mask.bool()
        if not bool(hits.any(dim=1).all()):
            raise ValueError(
                f"token_prepending: the tokenizer did not keep the placeholder {placeholder_token(tokenizer)!r} "
                "as one token in every row of the batch"
            )
        tp_layers = config.tp_layers
        if tp_layers is None:
            tp_layers = default_tp_layers(backbone.config.num_hidden_layers)
        prepending = Prepending(frozenset(tp_layers), hits.int().argmax(dim=1), last_token_index(attention_mask))
        with _prepend_hooks(backbone, prepending.layers):
            return super().run(
                backbone, tokenizer, config, features, hidden_states, token_prepending=prepending, **model_kwargs
            )


def placeholder_token(tokenizer: Any) -> str:
    """The existing single token that stands in for ``<PST>`` (see :class:`TokenPrepending`)."""
    if not tokenizer.eos_token:
        raise ValueError(f"token_prepending needs a tokenizer with an EOS token; {type(tokenizer).__name__} has none")
    return tokenizer.eos_token


_CLASSES: dict[str, type[Method]] = {"kv": KVMethod, "token_prepending": TokenPrepending}
METHODS: dict[str, Method] = {
    name: _CLASSES.get(name, Method)(name, defaults.template, defaults.pooling)
    for name, defaults in METHOD_DEFAULTS.items()
}


def get_method(name: str, where: str = "'method'") -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"{where} must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
