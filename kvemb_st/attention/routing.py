"""What one re-routed call carries: the routing data (:class:`KVRouting`), passed as the ``kv_routing`` keyword of
the model call and forwarded untouched by transformers, so models with different settings can share a process."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class KVRouting:
    """Per-call routing data.

    Attributes:
        layers: Indices of the layers that get the prefix slot.
        last_index: ``(batch,)`` position of each row's final real token.
        prefix_bias: Added to the prefix slot's attention logit.
        prefix_rope: ``keep``, ``start`` or ``relative0`` (see :class:`kvemb_st.config.KVEmbeddingConfig`).
        cos, sin: ``(batch, seq, head_dim)`` rotary tables of the base model at every position; only needed
            for ``start`` and ``relative0``, where the prefix key is moved to another position. A backbone with
            one rotary table per layer type (Gemma 3: local RoPE on sliding-window layers, global on full
            ones) gives a mapping from each attention module's ``layer_type`` to its table.
        right_padded: Every row of the attention mask is its real tokens followed by padding (see
            :func:`is_right_padded`). Then no real token sees a pad under a plain causal mask, and re-routed
            layers run an unmasked causal kernel: exact for every real token; pad rows become garbage that
            pooling never reads. ``False`` (the safe default) keeps transformers' mask.
    """

    layers: frozenset[int]
    last_index: torch.Tensor
    prefix_bias: float = 0.0
    prefix_rope: str = "keep"
    cos: torch.Tensor | Mapping[str, torch.Tensor] | None = None
    sin: torch.Tensor | Mapping[str, torch.Tensor] | None = None
    right_padded: bool = False

    def rotary_tables(self, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of the layer ``module`` belongs to (its own table where tables differ per layer type)."""
        if self.cos is None or self.sin is None:
            raise ValueError(f"prefix_rope={self.prefix_rope!r} needs the rotary tables in KVRouting.cos/sin")
        if not isinstance(self.cos, Mapping):
            return self.cos, self.sin
        layer_type = getattr(module, "layer_type", None)
        if layer_type not in self.cos:
            raise ValueError(
                f"layer {getattr(module, 'layer_idx', '?')} has layer_type {layer_type!r}, but KVRouting holds rotary "
                f"tables for {sorted(self.cos)} only"
            )
        return self.cos[layer_type], self.sin[layer_type]

    def to(self, device: torch.device | str) -> KVRouting:
        """The same routing with its tensors on ``device``."""
        move = lambda t: t if t is None else t.to(device)  # noqa: E731
        tables = {
            name: {key: move(t) for key, t in value.items()} if isinstance(value, Mapping) else move(value)
            for name, value in (("cos", self.cos), ("sin", self.sin))
        }
        return replace(self, last_index=self.last_index.to(device), **tables)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of a ``(batch, seq)`` mask is ones then zeros (right padding, or none)."""
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())
