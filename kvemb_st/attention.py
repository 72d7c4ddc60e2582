"""The KV re-routing attention, plugged into transformers through ``AttentionInterface``.

At a selected layer the key and value of each row's final real token -- computed by that layer in the
same forward pass -- are prepended as one extra "prefix" slot, so that every query (including the early
tokens that causal attention keeps blind to the rest of the text) can attend to a summary of the whole
sequence. Everything that changes per call travels in a :class:`KVRouting` object passed as the
``kv_routing`` keyword of the model call; transformers forwards it untouched to this function. There is
no global mutable state, so models with different settings can share a process and its threads.

Non-selected layers (and calls without ``kv_routing``) go straight to transformers' SDPA attention,
keeping its fast path. Selected layers run the fused kernel that SDPA itself would pick for the layer
(``_fused_sdp_choice``), through the private op of that kernel that also returns the log-sum-exp, and merge
the prefix slot in afterwards, exactly (:func:`merge_prefix`). Where the chosen kernel returns no
log-sum-exp (the math backend, an unknown device) they fall back to one public SDPA call with the prefix
logit on extra head channels. The first call of each kernel combination checks the merge against that portable
path (:func:`checked_attention_with_lse`, :mod:`kvemb_st.kernel_check`): a private op with another convention,
or one that raises, can never give wrong vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvemb_st import kernel_check

ATTN_IMPLEMENTATION = "kvemb_reroute"


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Apply the rotary map ``R = cos + sin * J`` used by Llama/Mistral/Qwen (or its transpose ``R^T``)."""
    return x * cos - _rotate_half(x) * sin if transpose else x * cos + _rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`rotate`, also when the rope type scales ``cos``/``sin`` (``R^-1 = R^T / |R|^2``)."""
    return rotate(x, cos, sin, transpose=True) / (cos * cos + sin * sin)


def prefix_slot(
    key: torch.Tensor, value: torch.Tensor, routing: KVRouting, tables: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final token's key and value ``(B, H_kv, D)``, the key placed as ``routing.prefix_rope`` says.

    ``keep``: as computed, rotated at the final token's position; ``start``: moved to position 0;
    ``relative0``: position-free (un-rotated), for :func:`prefix_logits` to rotate to each query's position.
    ``tables`` are the layer's ``(cos, sin)`` (:meth:`KVRouting.rotary_tables`), needed unless ``keep``.
    The key is moved in float32: it is one vector per row and KV head.
    """
    rows = torch.arange(key.shape[0], device=key.device)
    last = routing.last_index.to(key.device)
    prefix_key, prefix_value = key[rows, :, last], value[rows, :, last]
    if routing.prefix_rope == "keep":
        return prefix_key, prefix_value
    if tables is None:
        raise ValueError(f"prefix_rope={routing.prefix_rope!r} needs the layer's rotary tables")
    cos, sin = (table.to(key.device, torch.float32) for table in tables)
    prefix_key = unrotate(prefix_key.float(), cos[rows, last][:, None], sin[rows, last][:, None])
    if routing.prefix_rope == "start":
        prefix_key = rotate(prefix_key, cos[:, :1], sin[:, :1])  # as if it sat at position 0
    return prefix_key.to(key.dtype), prefix_value


# ``bmm(..., out_dtype=)``: half-precision inputs, float32 output; CUDA only, torch >= 2.8.
_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")


def _scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched) with an at least float32 result, as attention kernels keep their scores.

    On CUDA half-precision inputs go straight into a float32 GEMM output (``bmm`` with ``out_dtype``), so no
    float32 copy of the queries is made; elsewhere the inputs are upcast.
    """
    if a.dtype not in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b)
    if a.is_cuda and _BMM_OUT_DTYPE:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def prefix_logits(
    query: torch.Tensor,
    prefix_key: torch.Tensor,
    scale: float,
    bias: float = 0.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, H, T)`` logit (at least float32) of every query on the prefix slot, ``scale`` and ``bias`` included.

    ``query`` is ``(B, H, T, D)``, ``prefix_key`` ``(B, H_kv, D)``. With ``cos``/``sin`` ``(B, T, D)`` the key is
    position-free and each query ``i`` sees it at its own position (``relative0``): ``q_i . R(i) k``. The key,
    not the query, is rotated -- to every position at KV-head granularity ``(B, T, H_kv, D)`` -- and each group
    of ``H / H_kv`` query heads is multiplied with its KV head's key in one batched GEMM, with no copy of the
    queries for transformers' ``(B, T, H, D)`` memory layout and no repeat to the query heads.
    """
    batch, heads, length, dim = query.shape
    kv_heads = prefix_key.shape[1]
    key = (prefix_key * scale).to(query.dtype)[:, None]  # (B, 1, H_kv, D); the scale keeps fp16 in range
    if cos is not None:
        key = rotate(key, cos[:, :, None].to(query.dtype), sin[:, :, None].to(query.dtype))  # (B, T, H_kv, D)
    key = key.expand(batch, length, kv_heads, dim).reshape(-1, dim, 1)
    groups = query.transpose(1, 2).reshape(-1, heads // kv_heads, dim)  # (B*T*H_kv, H/H_kv, D)
    logits = _scores(groups, key).view(batch, length, heads).transpose(1, 2)
    return logits + bias


def merge_prefix(
    out: torch.Tensor, lse: torch.Tensor, prefix_logit: torch.Tensor, prefix_value: torch.Tensor
) -> torch.Tensor:
    """Add the prefix slot to a plain attention output, exactly, in one elementwise pass.

    ``out`` ``(B, H, T, D)`` and its log-sum-exp ``lse`` ``(B, H, T)`` come from any kernel; ``prefix_logit``
    ``(B, H, T)`` is the prefix slot's logit and ``prefix_value`` ``(B, H_kv, D)`` its value. Softmax over
    ``[s0; logits]`` gives ``O * sigmoid(L - s0) + v0 * sigmoid(s0 - L)``, i.e. ``lerp(O, v0, sigmoid(s0 - L))``.
    The weight is computed in float32 and the lerp runs in ``out``'s dtype, with the value broadcast over the
    query heads of its group (no repeat).
    """
    kv_heads = prefix_value.shape[1]
    weight = torch.sigmoid(prefix_logit - lse).to(out.dtype).unflatten(1, (kv_heads, -1))[..., None]
    value = prefix_value.to(out.dtype)[:, :, None, None]  # (B, H_kv, 1, 1, D)
    return torch.lerp(out.unflatten(1, (kv_heads, -1)), value, weight).flatten(1, 2)


# ------------------------------------------------------------------------ plain attention + log-sum-exp
# Ops are looked up on this namespace at call time so that tests can stand in CPU versions of CUDA-only ops.
_ATEN: Any = torch.ops.aten
CUDNN_MASKED = -65504.0  # what SDPA itself puts in masked cuDNN bias entries (cuDNN mishandles -inf)


def _additive_mask(attention_mask: torch.Tensor, query: torch.Tensor, blocked: float | None = None) -> torch.Tensor:
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
    additive = None if mask is None else _additive_mask(mask, query)  # the kernel takes no bool masks
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
    bias = None if mask is None else _aligned_bias(_additive_mask(mask, query), query, key)
    return _ATEN._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0, is_causal, scale=scale)[:2]


def _cuda_cudnn(query, key, value, mask, is_causal, scale):
    """cuDNN attention: fewer KV heads natively; its LSE may carry a trailing singleton dim."""
    bias = None if mask is None else _additive_mask(mask, query, CUDNN_MASKED)
    return _ATEN._scaled_dot_product_cudnn_attention(
        query, key, value, bias, True, 0.0, is_causal, False, scale=scale
    )[:2]


_LSE_KERNELS: dict[tuple[str, SDPBackend], LSEKernel] = {
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


def _run_lse_kernel(
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
    Unchecked: re-routed layers go through :func:`checked_attention_with_lse`.
    """
    args = sdpa_arguments(module, query, key, value, mask, is_causal)
    kernel = _LSE_KERNELS.get((query.device.type, sdpa_backend(query, args, scale)))
    return None if kernel is None else _run_lse_kernel(kernel, query, args, scale)


# --------------------------------------------------------------------------- the self-check of the fast path
SELF_CHECK_ROWS = 3  # batch rows compared: first, middle and last (sorted batches: the longest and the shortest)
_PROBE_LIMIT = 1e3  # fully masked rows have an LSE near the dtype's minimum; the probe stays representable in fp16


def _mask_kind(mask: torch.Tensor | None, is_causal: bool) -> str:
    return "mask" if mask is not None else "causal" if is_causal else "full"


def checked_attention_with_lse(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    prefix_value: torch.Tensor,
    is_causal: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`attention_with_lse`, self-checked once per :class:`~kvemb_st.kernel_check.Combination` per process.

    The first call of a combination compares the log-sum-exp merge with :func:`_attention_with_prefix_channel` on
    a few rows (:func:`_self_check_difference`); a mismatch or an exception from the private op (a convention
    that changed, ROCm, an opt-in FA3/FA4 backend) makes this return ``None`` for that combination from then on,
    i.e. the caller takes the portable path. Later calls cost one dictionary lookup.
    """
    args = sdpa_arguments(module, query, key, value, mask, is_causal)
    backend = sdpa_backend(query, args, scale)
    kernel = _LSE_KERNELS.get((query.device.type, backend))
    if kernel is None:
        return None
    if not kernel_check.enabled():
        return _run_lse_kernel(kernel, query, args, scale)
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    combination = kernel_check.Combination(
        query.device.type, backend.name, str(query.dtype), dim, heads, kv_heads, _mask_kind(args.mask, args.is_causal)
    )
    known = kernel_check.verdict(combination)
    if known is not None and not known.fast:
        return None
    try:
        plain = _run_lse_kernel(kernel, query, args, scale)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a private op that raises: never the user's problem
        kernel_check.fail(combination, error)
        return None
    if known is None:
        tolerance = kernel_check.TOLERANCE.get(query.dtype, kernel_check.TOLERANCE[torch.bfloat16])
        check = lambda: _self_check_difference(query, key, value, args, scale, plain, prefix_value)  # noqa: E731
        if not kernel_check.decide(combination, check, tolerance):
            return None
    return plain


def _self_check_difference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    args: SdpaArguments,
    scale: float,
    plain: tuple[torch.Tensor, torch.Tensor],
    prefix_value: torch.Tensor,
) -> float:
    """``max |merge - portable| / max |portable|`` on :data:`SELF_CHECK_ROWS` rows of the batch.

    The prefix logit is a probe, not the layer's: the kernel's own log-sum-exp, so the merge weighs the prefix
    by exactly 1/2, where the output is most sensitive to a wrong log-sum-exp, whatever the layer's bias; any
    error of the kernel's output shows at half size. Both paths get the same queries, keys, values and mask.
    """
    out, lse = plain
    batch = query.shape[0]
    rows = torch.linspace(0, batch - 1, min(batch, SELF_CHECK_ROWS)).round().long().unique().to(query.device)
    pick = lambda t: t if t is None or t.shape[0] == 1 else t.index_select(0, rows)  # noqa: E731
    probe = pick(lse).float().clamp(-_PROBE_LIMIT, _PROBE_LIMIT)
    fast = merge_prefix(pick(out), pick(lse), probe, pick(prefix_value))
    portable = _attention_with_prefix_channel(
        pick(query), pick(key), pick(value), pick(args.mask), scale, probe, pick(prefix_value), 0.0, args.is_causal
    )
    if fast.shape != portable.shape:
        raise ValueError(f"the kernel's output has shape {tuple(out.shape)}, expected {tuple(query.shape[:3])} + (D,)")
    difference = (fast.double() - portable.double()).abs().max() / portable.double().abs().max().clamp_min(1e-30)
    return float(difference.nan_to_num(nan=float("inf")))


def _attention_with_prefix_channel(
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
        mask = _additive_mask(mask[..., : key.shape[2] - 1], query).expand(batch, 1, q_len, key.shape[2] - 1)
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
        out = _attention_with_prefix_channel(
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


register()
