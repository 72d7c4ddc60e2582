"""The KV re-routing attention, plugged into transformers through ``AttentionInterface``.

At a selected layer the key and value of each row's final real token -- computed by that layer in the
same forward pass -- are prepended as one extra "prefix" slot, so that every query (including the early
tokens that causal attention keeps blind to the rest of the text) can attend to a summary of the whole
sequence. Everything that changes per call travels in a :class:`KVRouting` object passed as the
``kv_routing`` keyword of the model call; transformers forwards it untouched to this function. There is
no global mutable state, so models with different settings can share a process and its threads.

Non-selected layers (and calls without ``kv_routing``) go straight to transformers' SDPA attention,
keeping its fast path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "kvemb_reroute"


@dataclass(frozen=True)
class KVRouting:
    """Per-call routing data.

    Attributes:
        layers: Indices of the layers that get the prefix slot.
        last_index: ``(batch,)`` position of each row's final real token (right padding).
        prefix_bias: Added to the prefix slot's attention logit.
        prefix_rope: ``keep``, ``start`` or ``relative0`` (see :class:`kvemb_st.config.KVEmbeddingConfig`).
        cos, sin: ``(batch, seq, head_dim)`` rotary tables of the base model at every position; only needed
            for ``start`` and ``relative0``, where the prefix key is moved to another position.
    """

    layers: frozenset[int]
    last_index: torch.Tensor
    prefix_bias: float = 0.0
    prefix_rope: str = "keep"
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Apply the rotary map ``R = cos + sin * J`` used by Llama/Mistral/Qwen (or its transpose ``R^T``)."""
    return x * cos - _rotate_half(x) * sin if transpose else x * cos + _rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`rotate`, also when the rope type scales ``cos``/``sin`` (``R^-1 = R^T / |R|^2``)."""
    return rotate(x, cos, sin, transpose=True) / (cos * cos + sin * sin)


def _additive_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, query: torch.Tensor) -> torch.Tensor:
    """Float mask (0 = attend, -inf-like = blocked) from transformers' bool/float mask or ``None`` (= causal)."""
    min_value = torch.finfo(query.dtype).min
    if attention_mask is None:
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~allowed, min_value)[None, None]
    if attention_mask.dtype == torch.bool:
        return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~attention_mask, min_value)
    return attention_mask.to(query.dtype)


def kv_reroute_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    kv_routing: KVRouting | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with the final token's K/V prepended as a prefix slot at the selected layers.

    Receives what every transformers attention function receives: post-RoPE ``query`` ``(B, H, T, D)``
    and ``key``/``value`` ``(B, H_kv, T, D)`` before the GQA repeat.
    """
    if kv_routing is None or getattr(module, "layer_idx", None) not in kv_routing.layers:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, _, q_len, head_dim = query.shape
    rows = torch.arange(batch, device=key.device)
    last = kv_routing.last_index.to(key.device)
    prefix_key = key[rows, :, last]  # (B, H_kv, D), post-RoPE at the final token's position
    prefix_value = value[rows, :, last]
    scale = head_dim**-0.5 if scaling is None else scaling

    if kv_routing.prefix_rope != "keep":
        if kv_routing.cos is None or kv_routing.sin is None:
            raise ValueError(f"prefix_rope={kv_routing.prefix_rope!r} needs the rotary tables in KVRouting.cos/sin")
        cos = kv_routing.cos.to(key.dtype)
        sin = kv_routing.sin.to(key.dtype)
        prefix_key = unrotate(prefix_key, cos[rows, last][:, None], sin[rows, last][:, None])  # position-free key
        if kv_routing.prefix_rope == "start":
            prefix_key = rotate(prefix_key, cos[:, :1], sin[:, :1])  # as if it sat at position 0
    if kv_routing.prefix_rope == "relative0":
        # The prefix key sits at each query's own position: q_i . R(i) k = (R(i)^T q_i) . k. Each query thus
        # needs its own prefix logit; one SDPA call still does it if the head dimension is widened:
        # queries become [q ; R^T q], ordinary keys [k ; 0] and the prefix key [0 ; k].
        query = torch.cat([query, rotate(query, cos[:, None], sin[:, None], transpose=True)], dim=-1)
        prefix_key = torch.cat([torch.zeros_like(prefix_key), prefix_key], dim=-1)
        key = torch.cat([key, torch.zeros_like(key)], dim=-1)

    n_rep = query.shape[1] // key.shape[1]
    keys = repeat_kv(torch.cat([prefix_key[:, :, None], key], dim=2), n_rep)
    values = repeat_kv(torch.cat([prefix_value[:, :, None], value], dim=2), n_rep)
    kv_len = key.shape[2]
    mask = _additive_mask(attention_mask, q_len, kv_len, query).expand(batch, 1, q_len, kv_len)
    prefix_column = mask.new_full((batch, 1, q_len, 1), kv_routing.prefix_bias)
    mask = torch.cat([prefix_column, mask], dim=-1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the attention function and its mask builder with transformers (idempotent).

    The mask must be registered too: without it transformers may hand the function ``None`` for a
    padded batch, and padding would silently leak into the prefix rows.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, kv_reroute_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


register()
