"""The self-check of the fast path: the first call of each kernel combination compares the log-sum-exp merge with
the portable path on a few rows (:mod:`kvemb_st.kernel_check` keeps the verdicts), so a private op with another
convention, or one that raises, can never give wrong vectors."""

from __future__ import annotations

import torch

from kvemb_st import kernel_check
from kvemb_st.attention.fallback import attention_with_prefix_channel
from kvemb_st.attention.kernels import LSE_KERNELS, SdpaArguments, run_lse_kernel, sdpa_arguments, sdpa_backend
from kvemb_st.attention.prefix import merge_prefix

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
    """:func:`~kvemb_st.attention.kernels.attention_with_lse`, self-checked once per :class:`~kvemb_st.kernel_check.Combination` per process.

    The first call of a combination compares the log-sum-exp merge with :func:`attention_with_prefix_channel` on
    a few rows (:func:`_self_check_difference`); a mismatch or an exception from the private op (a convention
    that changed, ROCm, an opt-in FA3/FA4 backend) makes this return ``None`` for that combination from then on,
    i.e. the caller takes the portable path. Later calls cost one dictionary lookup.
    """
    args = sdpa_arguments(module, query, key, value, mask, is_causal)
    backend = sdpa_backend(query, args, scale)
    kernel = LSE_KERNELS.get((query.device.type, backend))
    if kernel is None:
        return None
    if not kernel_check.enabled():
        return run_lse_kernel(kernel, query, args, scale)
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    combination = kernel_check.Combination(
        query.device.type, backend.name, str(query.dtype), dim, heads, kv_heads, _mask_kind(args.mask, args.is_causal)
    )
    known = kernel_check.verdict(combination)
    if known is not None and not known.fast:
        return None
    try:
        plain = run_lse_kernel(kernel, query, args, scale)
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
    portable = attention_with_prefix_channel(
        pick(query), pick(key), pick(value), pick(args.mask), scale, probe, pick(prefix_value), 0.0, args.is_causal
    )
    if fast.shape != portable.shape:
        raise ValueError(f"the kernel's output has shape {tuple(out.shape)}, expected {tuple(query.shape[:3])} + (D,)")
    difference = (fast.double() - portable.double()).abs().max() / portable.double().abs().max().clamp_min(1e-30)
    return float(difference.nan_to_num(nan=float("inf")))
