"""The portable path: softmax over ``[prefix; keys]`` in one public SDPA call, the prefix logit riding on extra head
channels. Used where no kernel returns a log-sum-exp (the math backend, an unknown device), with dropout, and where
the self-check turned a fast path down."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, use_gqa_in_sdpa

from kvemb_st.attention.kernels import additive_mask


def attention_with_prefix_channel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    prefix_logit: torch.Tensor,
    prefix_value: torch.Tensor,
    dropout: float,
    causal: bool = True,
) -> torch.Tensor:
    """Softmax over ``[prefix; keys]`` in one public SDPA call, the prefix logit riding on extra head channels.

    The portable fallback. The prefix logit differs per query (bias, ``relative0``), which SDPA's fused kernels
    cannot take as a mask without losing their fast path. So queries become ``[q ; s0 / scale ; 0..]``, ordinary
    keys ``[k ; 0 ; 0..]`` and the prefix key ``[0 ; 1 ; 0..]``; the head dim is padded to a multiple of 8, which
    fused GPU kernels require. Without a mask, a ``causal`` layer gets a zero query first so that SDPA's square
    ``is_causal`` alignment lets token ``i`` see the prefix and keys ``0..i``; a non-causal one sees every key.
    A mask is sliced to the key length (as transformers does) and the prefix column allowed for every query.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    extra = 8 - head_dim % 8  # >= 1: room for the logit channel
    logit_channel = (prefix_logit / scale).to(query.dtype)[..., None]
    query = torch.cat([query, F.pad(logit_channel, (0, extra - 1))], dim=-1)
    prefix_key = F.pad(torch.ones_like(prefix_value[..., :1]), (head_dim, extra - 1))
    key = torch.cat([prefix_key[:, :, None], F.pad(key, (0, extra))], dim=2)
    value = F.pad(torch.cat([prefix_value[:, :, None], value], dim=2), (0, extra))
    causal = causal and mask is None
    if causal:
        query = torch.cat([torch.zeros_like(query[:, :, :1]), query], dim=2)
    elif mask is not None:
        mask = additive_mask(mask[..., : key.shape[2] - 1], query).expand(batch, 1, q_len, key.shape[2] - 1)
        mask = torch.cat([mask.new_zeros(batch, 1, q_len, 1), mask], dim=-1)
    sdpa_kwargs = {}
    if kv_heads != heads:
        if use_gqa_in_sdpa(mask, key, value):
            sdpa_kwargs["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, heads // kv_heads), repeat_kv(value, heads // kv_heads)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale, **sdpa_kwargs
    )
    return out[:, :, out.shape[2] - q_len :, :head_dim]
