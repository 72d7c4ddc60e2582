"""The KV re-routing attention, plugged into transformers through ``AttentionInterface``.

At a selected layer the key and value of each row's final real token -- computed by that layer in the
same forward pass -- are prepended as one extra "prefix" slot, so that every query (including the early
tokens that causal attention keeps blind to the rest of the text) can attend to a summary of the whole
sequence. Everything that changes per call travels in a :class:`KVRouting` object passed as the
``kv_routing`` keyword of the model call; transformers forwards it untouched to this function. There is
no global mutable state, so models with different settings can share a process and its threads.

Non-selected layers (and calls without ``kv_routing``) go straight to transformers' SDPA attention,
keeping its fast path. Selected layers run the same fused kernel at the model's own head dim and merge the
prefix slot in afterwards (exact, through the kernel's log-sum-exp); where torch exposes no such kernel they
fall back to one public SDPA call with the prefix logit on extra head channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa
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


def _additive_mask(attention_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Float mask (0 = attend, -inf-like = blocked) from transformers' bool or float mask."""
    if attention_mask.dtype == torch.bool:
        min_value = torch.finfo(query.dtype).min
        return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~attention_mask, min_value)
    return attention_mask.to(query.dtype)


def _prefix_logits(query: torch.Tensor, prefix_key: torch.Tensor, routing: KVRouting, scale: float) -> torch.Tensor:
    """``(B, H, T)`` float32 logit of every query on the prefix slot, bias included.

    ``relative0`` places the (position-free) prefix key at each query's own position:
    ``q_i . R(i) k = (R(i)^T q_i) . k``.
    """
    query = query.float()
    if routing.prefix_rope == "relative0":
        cos, sin = (t.float()[:, None] for t in (routing.cos, routing.sin))
        query = rotate(query, cos, sin, transpose=True)
    keys = repeat_kv(prefix_key.float()[:, :, None], query.shape[1] // prefix_key.shape[1])  # (B, H, 1, D)
    return (query * keys).sum(-1) * scale + routing.prefix_bias


# Resolved once at import, not per layer call; a torch without it falls back to the prefix-channel path.
_CPU_ATTENTION_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Plain attention ``(B, H, T, D)`` and its float32 log-sum-exp ``(B, H, T)`` from one fused kernel, or ``None``.

    Only CPU torch exposes such a kernel for every dtype and mask (``_scaled_dot_product_flash_attention_for_cpu``);
    elsewhere the caller falls back to :func:`_attention_with_prefix_channel`.
    """
    kernel = _CPU_ATTENTION_WITH_LSE
    if kernel is None or query.device.type != "cpu":
        return None
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    additive = None if mask is None else _additive_mask(mask, query)  # the kernel takes no bool masks
    return kernel(query, key, value, 0.0, mask is None, attn_mask=additive, scale=scale)


def _attention_with_prefix_channel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    prefix_logit: torch.Tensor,
    prefix_value: torch.Tensor,
    dropout: float,
) -> torch.Tensor:
    """Softmax over ``[prefix; keys]`` in one public SDPA call, the prefix logit riding on extra head channels.

    The prefix logit differs per query (bias, ``relative0``), which SDPA's fused kernels cannot take as a mask
    without losing their fast path. So queries become ``[q ; s0 / scale ; 0..]``, ordinary keys ``[k ; 0 ; 0..]``
    and the prefix key ``[0 ; 1 ; 0..]``; the head dim is padded to a multiple of 8, which fused GPU kernels
    require. Without a mask (no padding), a zero query is put first so that SDPA's square ``is_causal``
    alignment lets token ``i`` see the prefix and keys ``0..i``. With a mask, the prefix column is allowed
    for every query.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    extra = 8 - head_dim % 8  # >= 1: room for the logit channel
    logit_channel = (prefix_logit / scale).to(query.dtype)[..., None]
    query = torch.cat([query, F.pad(logit_channel, (0, extra - 1))], dim=-1)
    prefix_key = F.pad(torch.ones_like(prefix_value[..., :1]), (head_dim, extra - 1))
    key = torch.cat([prefix_key[:, :, None], F.pad(key, (0, extra))], dim=2)
    value = F.pad(torch.cat([prefix_value[:, :, None], value], dim=2), (0, extra))
    if mask is None:
        query = torch.cat([torch.zeros_like(query[:, :, :1]), query], dim=2)
    else:
        mask = _additive_mask(mask, query).expand(batch, 1, q_len, key.shape[2] - 1)
        mask = torch.cat([mask.new_zeros(batch, 1, q_len, 1), mask], dim=-1)
    sdpa_kwargs = {}
    if kv_heads != heads:
        if use_gqa_in_sdpa(mask, key, value):
            sdpa_kwargs["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, heads // kv_heads), repeat_kv(value, heads // kv_heads)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scale, **sdpa_kwargs
    )
    return out[:, :, out.shape[2] - q_len :, :head_dim]


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

    Where a fused kernel also returns the log-sum-exp ``L`` of the ordinary causal attention ``O``, the prefix
    slot is merged in exactly afterwards: softmax over ``[s0; logits]`` gives ``O * sigmoid(L - s0) +
    v0 * sigmoid(s0 - L)``. The kernel then runs at the model's own head dim, as in the plain forward.
    """
    if kv_routing is None or getattr(module, "layer_idx", None) not in kv_routing.layers:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, head_dim = query.shape
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
    prefix_logit = _prefix_logits(query, prefix_key, kv_routing, scale)

    plain = _attention_with_lse(query, key, value, attention_mask, scale) if dropout == 0.0 else None
    if plain is None:
        out = _attention_with_prefix_channel(
            query, key, value, attention_mask, scale, prefix_logit, prefix_value, dropout
        )
    else:
        out, lse = plain
        prefix_weight = torch.sigmoid(prefix_logit - lse)[..., None]  # (B, H, T, 1)
        prefix_value = repeat_kv(prefix_value.float()[:, :, None], heads // prefix_value.shape[1])  # (B, H, 1, D)
        out = torch.lerp(out.float(), prefix_value, prefix_weight).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the attention function and its mask builder with transformers (idempotent).

    The mask must be registered too: without it transformers may hand the function ``None`` for a
    padded batch, and padding would silently leak into the prefix rows.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, kv_reroute_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


register()
