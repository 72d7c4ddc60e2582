"""Plain attention and its log-sum-exp from the fused kernel SDPA itself would pick (``_fused_sdp_choice``), through
the private op of that kernel, called the way SDPA calls it (``attention.cpp``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from transformers.integrations.sdpa_attention import repeat_kv, use_gqa_in_sdpa

# Ops are looked up on this namespace at call time so that tests can stand in CPU versions of CUDA-only ops.
_ATEN: Any = torch.ops.aten
CUDNN_MASKED = -65504.0  # what SDPA itself puts in masked cuDNN bias entries (cuDNN mishandles -inf)


def additive_mask(attention_mask: torch.Tensor, query: torch.Tensor, blocked: float | None = None) -> torch.Tensor:
    """Float mask (0 = attend, ``blocked`` = blocked; default the dtype's most negative finite value).

    A finite value rather than SDPA's ``-inf``: a fully masked row then stays finite instead of NaN.
    """
    if attention_mask.dtype == torch.bool:
        blocked = torch.finfo(query.dtype).min if blocked is None else blocked
        return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~attention_mask, blocked)
    return attention_mask.to(query.dtype)


def _aligned_bias(bias: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """As SDPA's ``preprocess_mask`` for the efficient kernel: rows 8-aligned in memory, expanded to (B, H, T, S)."""
    length = bias.shape[-1]
    if bias.stride(-1) != 1 or any(stride % 8 for stride in bias.stride()[:-1]):
        bias = F.pad(bias, (0, 8 - length % 8))[..., :length]
    return bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])


LSEKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", bool, float], tuple[torch.Tensor, torch.Tensor]
]


def _cpu_flash(query, key, value, mask, is_causal, scale):
    """CPU flash: takes fewer KV heads natively (where SDPA chose it with ``enable_gqa``) and a float mask."""
    additive = None if mask is None else additive_mask(mask, query)  # the kernel takes no bool masks
    return _ATEN._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=additive, scale=scale
    )


def _cuda_flash(query, key, value, mask, is_causal, scale):
    """CUDA flash, as SDPA calls it: never with a mask, fewer KV heads natively, head dim zero-padded to 8."""
    if mask is not None:  # SDPA never picks flash with a mask; dropping it would be a silent wrong output
        raise ValueError("the CUDA flash kernel takes no attention mask")
    dim = query.shape[-1]
    padded = [F.pad(t, (0, -dim % 8)) for t in (query, key, value)] if dim % 8 else [query, key, value]
    out, lse = _ATEN._scaled_dot_product_flash_attention(*padded, 0.0, is_causal, False, scale=scale)[:2]
    return out[..., :dim], lse


def _cuda_efficient(query, key, value, mask, is_causal, scale):
    """Memory-efficient kernel; its LSE is padded along T. Fewer KV heads only where SDPA picked it with
    ``enable_gqa`` (torch >= 2.13 does not; newer torch may take GQA natively), else equal head counts."""
    bias = None if mask is None else _aligned_bias(additive_mask(mask, query), query, key)
    return _ATEN._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0, is_causal, scale=scale)[:2]


def _cuda_cudnn(query, key, value, mask, is_causal, scale):
    """cuDNN attention: fewer KV heads natively; its LSE may carry a trailing singleton dim."""
    bias = None if mask is None else additive_mask(mask, query, CUDNN_MASKED)
    return _ATEN._scaled_dot_product_cudnn_attention(
        query, key, value, bias, True, 0.0, is_causal, False, scale=scale
    )[:2]


LSE_KERNELS: dict[tuple[str, SDPBackend], LSEKernel] = {
    ("cpu", SDPBackend.FLASH_ATTENTION): _cpu_flash,
    ("cuda", SDPBackend.FLASH_ATTENTION): _cuda_flash,
    ("cuda", SDPBackend.EFFICIENT_ATTENTION): _cuda_efficient,
    ("cuda", SDPBackend.CUDNN_ATTENTION): _cuda_cudnn,
}


class SdpaArguments(NamedTuple):
    """What transformers' ``sdpa_attention_forward`` hands to SDPA for a layer's inputs."""

    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool
    enable_gqa: bool


def sdpa_arguments(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool | None = None,
) -> SdpaArguments:
    """The arguments of transformers' ``sdpa_attention_forward``: passed to ``_fused_sdp_choice``, they select the
    kernel a plain layer would run.

    GQA stays native where transformers asks SDPA for it (no mask), otherwise K/V are repeated to the query heads;
    the ``is_causal`` keyword wins over ``module.is_causal``; a 4-D mask is sliced to the key length, and a causal
    call without a mask to square (as transformers does for a longer, static cache).
    """
    n_rep = query.shape[1] // key.shape[1]
    enable_gqa = n_rep > 1 and use_gqa_in_sdpa(mask, key, value)
    if n_rep > 1 and not enable_gqa:
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, :, : key.shape[-2]]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    is_causal = query.shape[2] > 1 and mask is None and bool(causal)
    if is_causal and key.shape[2] > query.shape[2]:
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    return SdpaArguments(key, value, mask, is_causal, enable_gqa)


def sdpa_backend(query: torch.Tensor, args: SdpaArguments, scale: float) -> SDPBackend:
    """The backend SDPA would run for these arguments (``_fused_sdp_choice``)."""
    gqa = {"enable_gqa": True} if args.enable_gqa else {}  # keyword absent from older torch; only needed when set
    choice = _ATEN._fused_sdp_choice(query, args.key, args.value, args.mask, 0.0, args.is_causal, scale=scale, **gqa)
    return SDPBackend(choice)


def run_lse_kernel(
    kernel: LSEKernel, query: torch.Tensor, args: SdpaArguments, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = kernel(query, args.key, args.value, args.mask, args.is_causal, scale)
    lse = lse[..., 0] if lse.dim() == 4 else lse  # cuDNN: (B, H, T, 1)
    return out, lse[..., : query.shape[2]]  # efficient: padded to a multiple of 32 along T


def attention_with_lse(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Plain attention ``(B, H, T, D)`` and its log-sum-exp ``(B, H, T)`` from SDPA's own kernel, or ``None``.

    ``_fused_sdp_choice`` names the backend SDPA would run for this layer's inputs; the private op of that
    backend that also returns the log-sum-exp is called the way SDPA calls it (``attention.cpp``). The math
    backend and unknown devices have no such op: ``None`` sends the caller to the prefix-channel fallback.
    Unchecked: re-routed layers go through :func:`~kvemb_st.attention.self_check.checked_attention_with_lse`.
    """
    args = sdpa_arguments(module, query, key, value, mask, is_causal)
    kernel = LSE_KERNELS.get((query.device.type, sdpa_backend(query, args, scale)))
    return None if kernel is None else run_lse_kernel(kernel, query, args, scale)
