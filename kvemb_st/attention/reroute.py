"""The attention function transformers calls for ``attn_implementation="kvemb_reroute"``, and its registration.

Non-selected layers (and calls without ``kv_routing``) go straight to transformers' SDPA attention, keeping its
fast path. Selected layers run SDPA's own kernel with its log-sum-exp and merge the prefix slot in afterwards,
exactly; where no such kernel runs, or the self-check turned it down, the portable prefix-channel path.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvemb_st.attention.fallback import attention_with_prefix_channel
from kvemb_st.attention.prefix import merge_prefix, prefix_logits, prefix_slot
from kvemb_st.attention.routing import KVRouting
from kvemb_st.attention.self_check import checked_attention_with_lse

ATTN_IMPLEMENTATION = "kvemb_reroute"


def _causal_suffices(
    module: torch.nn.Module, routing: KVRouting, kv_length: int, causal: bool, kwargs: dict[str, Any]
) -> bool:
    """Whether a plain causal kernel without the mask is exact for every real token of this layer.

    True for right-padded batches of a causal layer unless it also limits attention to a sliding window shorter
    than the sequence (then the mask carries the window and must stay).
    """
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    return routing.right_padded and causal and (window is None or window >= kv_length)


def kv_reroute_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    kv_routing: KVRouting | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with the final token's K/V prepended as a prefix slot at the selected layers.

    Receives what every transformers attention function receives: post-RoPE ``query`` ``(B, H, T, D)``
    and ``key``/``value`` ``(B, H_kv, T, D)`` before the GQA repeat, the layer's ``scaling`` (Gemma 3:
    ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``) and, on sliding-window layers,
    ``sliding_window``; an ``is_causal`` keyword wins over ``module.is_causal``, as in transformers' SDPA
    attention.

    **Sliding-window layers** (Mistral, Gemma 3's local layers): the window limits the ordinary keys, as in
    the plain layer, but not the prefix slot. The slot is one extra key that every query sees -- a summary of
    the whole text, which is the point of the method -- so it stays visible to queries whose window no longer
    reaches the final token (where it sits) or even the start of the text. Its position under ``start`` and
    ``relative0`` uses the layer's own rotary table (Gemma 3: local RoPE on sliding layers, global on full
    ones). No attention-logit soft-capping is applied: Gemma 3 configs set none, and transformers' Gemma 3
    attention passes none to the attention function, so the plain layers do not apply it either.
    """
    if kv_routing is None or getattr(module, "layer_idx", None) not in kv_routing.layers:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    tables = None if kv_routing.prefix_rope == "keep" else kv_routing.rotary_tables(module)
    prefix_key, prefix_value = prefix_slot(key, value, kv_routing, tables)
    relative = tables if kv_routing.prefix_rope == "relative0" else ()
    prefix_logit = prefix_logits(query, prefix_key, scale, kv_routing.prefix_bias, *relative)
    mask = None if _causal_suffices(module, kv_routing, key.shape[2], causal, kwargs) else attention_mask

    plain = None
    if dropout == 0.0:
        plain = checked_attention_with_lse(module, query, key, value, mask, scale, prefix_value, causal)
    if plain is None:
        out = attention_with_prefix_channel(
            query, key, value, mask, scale, prefix_logit, prefix_value, dropout, causal
        )
    else:
        out = merge_prefix(*plain, prefix_logit, prefix_value)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the attention function and its mask builder with transformers (idempotent).

    The mask must be registered too: without it transformers may hand the function ``None`` for a
    padded batch, and padding would silently leak into the prefix rows.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, kv_reroute_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
