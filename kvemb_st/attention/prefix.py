"""The prefix slot: the final token's key and value placed as ``prefix_rope`` says, its attention logit for every
query, and the exact merge of that slot into a plain attention output through the output's log-sum-exp."""

from __future__ import annotations

import torch

from kvemb_st.attention.routing import KVRouting



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
