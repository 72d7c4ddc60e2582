"""The pieces of the re-routed attention against plain references, on every device -- the CUDA ones on CPU too.

``merge_prefix`` and ``prefix_logits`` take the plain output and log-sum-exp from any kernel; the wrappers of
the CUDA kernels run here against CPU stand-ins that return what the real ops return (head dim multiple of 8
for flash, no GQA for efficient attention, its LSE padded along T, cuDNN's trailing LSE dim, flash's
(B, T, H, D) memory layout), so their padding, slicing, GQA and causal logic is checked without a GPU. The real
private CUDA ops run through the same wrappers on ``device="meta"`` (their schemas and output shapes), and stand-ins
that break one convention each show that the self-check catches it, warns once and keeps the vectors right.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import kvemb_st
from kvemb_st import kernel_check
from kvemb_st.attention import kernels, reroute, self_check
from kvemb_st.attention.prefix import merge_prefix, prefix_logits
from kvemb_st.attention.routing import KVRouting, is_right_padded

BATCH, HEADS, LENGTH = 2, 4, 37  # T neither a multiple of 8 nor of 32: bias alignment and LSE padding matter
LENGTHS = [LENGTH, 23]  # row 1 right-padded


def padding_mask(device="cpu") -> torch.Tensor:
    return (torch.arange(LENGTH)[None] < torch.tensor(LENGTHS)[:, None]).to(device)


def causal_padding_mask(device="cpu") -> torch.Tensor:
    """(B, 1, T, T) bool, as transformers' ``sdpa_mask`` builds it for a right-padded batch."""
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool, device=device).tril()
    return causal[None, None] & padding_mask(device)[:, None, None, :]


def reference_attention(q, k, v, mask=None, is_causal=False, scale=1.0):
    """Plain softmax attention in float64 with K/V repeated to the query heads: output and log-sum-exp."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale
    if is_causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    return (scores.softmax(-1) @ v), scores.logsumexp(-1)


def qkv(kv_heads, dim, dtype=torch.float32, device="cpu", seed=0):
    """Random q (B, H, T, D) in transformers' memory layout (B, T, H, D), and k, v (B, H_kv, T, D)."""
    torch.manual_seed(seed)
    q = torch.randn(BATCH, LENGTH, HEADS, dim).transpose(1, 2)
    k, v = (torch.randn(BATCH, LENGTH, kv_heads, dim).transpose(1, 2) for _ in range(2))
    return (t.to(device, dtype) for t in (q, k, v))


def rope_tables(dim, magnitude=1.0, device="cpu"):
    """(B, T, D) half-split rotary tables; ``magnitude`` != 1 as yarn / longrope scale them."""
    angles = torch.arange(LENGTH)[:, None] * 10000 ** (-torch.arange(dim // 2) / (dim // 2))
    angles = torch.cat([angles, angles], dim=-1).expand(BATCH, -1, -1)
    return (magnitude * angles.cos()).to(device), (magnitude * angles.sin()).to(device)


# ------------------------------------------------------------------------------- merge + prefix logit
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rope", ["keep", "relative0"])
def test_merge_and_prefix_logit_equal_softmax_over_prefix_and_keys(device, dtype, tolerance, rope):
    dim, kv_heads, scale, bias = 16, 2, 0.3, 1.5
    q, k, v = qkv(kv_heads, dim, dtype, device)
    prefix_key, prefix_value = torch.randn(BATCH, kv_heads, dim, device=device), torch.randn(BATCH, kv_heads, dim)
    cos, sin = rope_tables(dim, magnitude=1.3, device=device)

    # reference: explicit softmax over [prefix; keys 0..i]; query i sees the key rotated to position i (complex)
    z = torch.complex(*prefix_key.double().cpu().chunk(2, dim=-1))  # (B, H_kv, D/2)
    if rope == "relative0":
        turn = torch.complex(*cos.double().cpu().chunk(2, -1)[:1], *sin.double().cpu().chunk(2, -1)[:1])
        z = z[:, :, None] * turn[:, None]  # (B, H_kv, T, D/2)
    else:
        z = z[:, :, None].expand(-1, -1, LENGTH, -1)
    keys_seen = torch.cat([z.real, z.imag], dim=-1).repeat_interleave(HEADS // kv_heads, dim=1)  # (B, H, T, D)
    logit = (q.double().cpu() * keys_seen).sum(-1) * scale + bias
    rep = HEADS // kv_heads
    scores = q.double().cpu() @ k.double().cpu().repeat_interleave(rep, 1).transpose(-1, -2) * scale
    scores = scores.masked_fill(~torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril(), -math.inf)
    weights = torch.cat([logit[..., None], scores], dim=-1).softmax(-1)
    values = torch.cat(
        [prefix_value.double().repeat_interleave(rep, 1)[:, :, None].expand(-1, -1, LENGTH, -1)[..., None, :],
         v.double().cpu().repeat_interleave(rep, 1)[:, :, None].expand(-1, -1, LENGTH, -1, -1)],
        dim=3,
    )  # (B, H, i, 1 + j, D)
    want = (weights[..., None] * values).sum(3)

    got_logit = prefix_logits(q, prefix_key, scale, bias, *((cos, sin) if rope == "relative0" else ()))
    assert got_logit.shape == (BATCH, HEADS, LENGTH) and got_logit.dtype == torch.float32
    out, lse = reference_attention(q.cpu(), k.cpu(), v.cpu(), is_causal=True, scale=scale)  # any kernel's output
    got = merge_prefix(out.to(device, dtype), lse.float().to(device), got_logit, prefix_value.to(device, dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got_logit.double().cpu(), logit, atol=tolerance * 10, rtol=tolerance)
    torch.testing.assert_close(got.double().cpu(), want, atol=tolerance, rtol=tolerance)


# --------------------------------------------------------------------------- transformers' SDPA inputs
def longer_mask(mask: torch.Tensor, extra: int = 3) -> torch.Tensor:
    """``mask`` with ``extra`` more key columns (as a static cache's mask has): sliced away to the key length."""
    return torch.cat([mask, mask.new_ones(*mask.shape[:-1], extra)], dim=-1)


@pytest.mark.parametrize("is_causal", [None, False], ids=["module_causal", "keyword_not_causal"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_sdpa_arguments_are_the_ones_transformers_passes(monkeypatch, masked, kv_heads, is_causal):
    q, k, v = qkv(kv_heads, 16)
    mask = longer_mask(causal_padding_mask()) if masked else None
    module = SimpleNamespace(num_key_value_groups=HEADS // kv_heads, is_causal=True)
    seen = {}

    def capture(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        seen.update(key=key, value=value, mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)
        return torch.zeros_like(query)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", capture)
    sdpa_attention_forward(module, q, k, v, mask, scaling=0.25, is_causal=is_causal)
    key, value, got_mask, got_causal, enable_gqa = kernels.sdpa_arguments(module, q, k, v, mask, is_causal)
    assert (got_causal, enable_gqa) == (seen["is_causal"], seen["enable_gqa"])
    assert got_causal is (not masked and is_causal is None)
    assert torch.equal(key, seen["key"]) and torch.equal(value, seen["value"])
    if masked:  # the mask, cut to the key length (transformers' flex path does this; SDPA would reject the rest)
        assert torch.equal(got_mask, seen["mask"][..., :LENGTH])


def reference_rerouted(q, k, v, mask, scale, last, bias, causal):
    """Softmax over [final token's key; keys] in float64, ``mask`` (bool (B, 1, T, S)) or causal or neither."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    rows = torch.arange(q.shape[0])
    prefix_k, prefix_v = k[rows, :, last], v[rows, :, last]  # (B, H, D)
    scores = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[..., : k.shape[2]], -math.inf)
    elif causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), -math.inf)
    prefix = (q.double() * prefix_k[:, :, None]).sum(-1, keepdim=True) * scale + bias
    weights = torch.cat([prefix, scores], dim=-1).softmax(-1)
    return weights[..., :1] * prefix_v[:, :, None] + weights[..., 1:] @ v


@pytest.mark.parametrize("path", ["lse_merge", "prefix_channel"])
@pytest.mark.parametrize("is_causal", [None, False], ids=["module_causal", "keyword_not_causal"])
@pytest.mark.parametrize("mask_kind", ["none", "causal_padding", "padding_only"])
def test_rerouted_layer_honours_is_causal_keyword_and_slices_the_mask(monkeypatch, path, is_causal, mask_kind):
    """A layer called with ``is_causal=False`` attends to every key (a bidirectional layer): its mask is never
    dropped for right padding, and without a mask no causal kernel runs. Masks wider than the keys are sliced."""
    if path == "prefix_channel":
        monkeypatch.setattr(reroute, "checked_attention_with_lse", lambda *args, **kwargs: None)
    q, k, v = qkv(2, 16)
    masks = {"none": None, "causal_padding": causal_padding_mask(),
             "padding_only": padding_mask()[:, None, None, :].expand(BATCH, 1, LENGTH, LENGTH)}  # fmt: skip
    mask = None if masks[mask_kind] is None else longer_mask(masks[mask_kind])
    last = torch.tensor(LENGTHS) - 1
    routing = KVRouting(layers=frozenset({0}), last_index=last, prefix_bias=1.5, right_padded=mask_kind != "padding_only")
    module = SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=2)
    out, _ = reroute.kv_reroute_attention(module, q, k, v, mask, scaling=0.3, is_causal=is_causal, kv_routing=routing)
    causal = is_causal is None
    want = reference_rerouted(q, k, v, mask if not (causal and routing.right_padded) else None, 0.3, last, 1.5, causal)
    real = padding_mask()[:, :, None].expand(-1, -1, HEADS)  # (B, T, H): rows pooling reads
    torch.testing.assert_close(out.double()[real], want.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- kernels, real on this device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_with_lse_equals_reference(device, dtype, masked):
    q, k, v = qkv(2, 16, dtype, device)
    mask = causal_padding_mask(device) if masked else None
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    plain = kernels.attention_with_lse(module, q, k, v, mask, 0.25)
    if device == "cpu":
        assert plain is not None  # CPU flash returns the log-sum-exp for every dtype and mask
    if plain is None:  # allowed only where SDPA itself runs math: the prefix-channel path then applies
        assert kernels.sdpa_backend(q, kernels.sdpa_arguments(module, q, k, v, mask), 0.25) == SDPBackend.MATH
        return
    out, lse = plain
    want_out, want_lse = reference_attention(q, k, v, mask, is_causal=mask is None, scale=0.25)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(out.double(), want_out, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lse.double(), want_lse, atol=tolerance, rtol=tolerance)


# ------------------------------------------------------------------- CUDA kernel wrappers on CPU stand-ins
class CudaStandIns:
    """CPU versions of the CUDA SDPA ops, returning what the real ones return and checking what they require.

    ``_fused_sdp_choice`` picks ``backend`` where SDPA could (flash: no mask; efficient: no GQA, unless
    ``efficient_gqa`` -- a newer torch whose efficient kernel takes fewer KV heads natively), else math.
    """

    def __init__(self, backend: SDPBackend, efficient_gqa: bool = False):
        self.backend, self.efficient_gqa, self.calls = backend, efficient_gqa, []

    def __getattr__(self, name):
        return getattr(torch.ops.aten, name)

    def _fused_sdp_choice(self, q, k, v, mask, dropout_p, is_causal, *, scale=None, enable_gqa=False):
        assert enable_gqa or k.shape[1] == q.shape[1]
        if self.backend == SDPBackend.FLASH_ATTENTION and mask is not None:
            return int(SDPBackend.MATH.value)
        if self.backend == SDPBackend.EFFICIENT_ATTENTION and k.shape[1] != q.shape[1] and not self.efficient_gqa:
            return int(SDPBackend.MATH.value)
        return int(self.backend.value)

    def _scaled_dot_product_flash_attention(self, q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):
        assert q.shape[-1] % 8 == 0 and q.shape[1] % k.shape[1] == 0 and dropout_p == 0.0
        self.calls.append(("flash", k.shape[1], is_causal))
        out, lse = reference_attention(q, k, v, is_causal=is_causal, scale=scale)
        out = out.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) in memory
        return (out, lse.float(), None, None, LENGTH, LENGTH, None, None, None)

    def _scaled_dot_product_efficient_attention(self, q, k, v, bias, compute_lse, dropout_p, is_causal, *, scale):
        assert compute_lse and dropout_p == 0.0
        assert k.shape[1] == q.shape[1] or (self.efficient_gqa and q.shape[1] % k.shape[1] == 0)
        if bias is not None:
            assert bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) and bias.dtype == q.dtype
            assert bias.stride(-1) == 1 and bias.stride(-2) % 8 == 0
        self.calls.append(("efficient", k.shape[1], is_causal))
        out, lse = reference_attention(q, k, v, bias, is_causal=is_causal, scale=scale)
        padded = torch.full((*lse.shape[:2], -(-lse.shape[2] // 32) * 32), math.nan)
        padded[..., : lse.shape[2]] = lse
        return (out.to(q.dtype), padded, None, None)

    def _scaled_dot_product_cudnn_attention(self, q, k, v, bias, compute_lse, dropout_p, is_causal, debug, *, scale):
        assert compute_lse and q.shape[1] % k.shape[1] == 0 and dropout_p == 0.0
        assert bias is None or (bias.dtype == q.dtype and bias.min() == kernels.CUDNN_MASKED)
        self.calls.append(("cudnn", k.shape[1], is_causal))
        out, lse = reference_attention(q, k, v, bias, is_causal=is_causal, scale=scale)
        return (out.to(q.dtype), lse.float()[..., None], None, None, LENGTH, LENGTH, None, None, None)


@pytest.fixture
def stand_in(monkeypatch):
    """Route CPU tensors through the CUDA wrapper of ``backend`` with the stand-in ops."""

    def use(backend: SDPBackend, ops_class: type = CudaStandIns, **options) -> CudaStandIns:
        ops = ops_class(backend, **options)
        monkeypatch.setattr(kernels, "_ATEN", ops)
        monkeypatch.setitem(kernels.LSE_KERNELS, ("cpu", backend), kernels.LSE_KERNELS[("cuda", backend)])
        return ops

    return use


BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("dim", [12, 16])
def test_cuda_kernel_wrappers_equal_reference(stand_in, backend, masked, kv_heads, dim):
    ops = stand_in(backend)
    q, k, v = qkv(kv_heads, dim)
    mask = causal_padding_mask() if masked else None
    module = SimpleNamespace(num_key_value_groups=HEADS // kv_heads, is_causal=True)
    plain = kernels.attention_with_lse(module, q, k, v, mask, 0.3)
    supported = not (backend == SDPBackend.FLASH_ATTENTION and masked) and not (
        backend == SDPBackend.EFFICIENT_ATTENTION and kv_heads != HEADS and not masked
    )
    if not supported:  # SDPA would run math here: the caller takes the prefix-channel path
        assert plain is None and not ops.calls
        return
    out, lse = plain
    want_out, want_lse = reference_attention(q, k, v, mask, is_causal=not masked, scale=0.3)
    # K/V reach the kernel un-repeated exactly where transformers asks SDPA for GQA (no mask)
    assert ops.calls == [(backend.name.split("_")[0].lower(), kv_heads if not masked else HEADS, not masked)]
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("mask_kept", [False, True])
@pytest.mark.parametrize("rope", ["keep", "relative0"])
def test_rerouted_model_on_cuda_kernel_stand_ins_equals_cpu_path(tiny_llama, stand_in, monkeypatch, backend, mask_kept, rope):
    """The whole re-routed forward of a padded batch through each CUDA wrapper equals the CPU path (itself checked
    against the loop reference in test_attention.py), with the mask dropped (right padding) or kept. Where SDPA
    would run math instead (flash with a mask, efficient with native GQA), the prefix-channel path must agree."""
    model = kvemb_st.from_base(tiny_llama, layers=[1, 3], prefix_rope=rope, prefix_bias=2.0)
    texts = ["A cat sits on the mat.", "The quarterly report shows that revenue grew by twelve percent.", "Hi"]
    want = model.encode(texts, convert_to_tensor=True)
    if mask_kept:
        monkeypatch.setattr("kvemb_st.methods.is_right_padded", lambda mask: False)
    ops = stand_in(backend)
    got = model.encode(texts, convert_to_tensor=True)
    runs_math = (backend == SDPBackend.FLASH_ATTENTION and mask_kept) or (
        backend == SDPBackend.EFFICIENT_ATTENTION and not mask_kept  # tiny Llama has GQA
    )
    assert bool(ops.calls) is not runs_math
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_efficient_kernel_takes_native_gqa_where_sdpa_chooses_it(stand_in):
    """A torch whose SDPA picks the efficient kernel with ``enable_gqa`` gets K/V un-repeated (no mask)."""
    ops = stand_in(SDPBackend.EFFICIENT_ATTENTION, efficient_gqa=True)
    q, k, v = qkv(2, 16)
    out, lse = kernels.attention_with_lse(SimpleNamespace(num_key_value_groups=2, is_causal=True), q, k, v, None, 0.3)
    assert ops.calls == [("efficient", 2, True)]
    want_out, want_lse = reference_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- the real CUDA ops' schemas, on meta
class ForcedChoice:
    """``torch.ops.aten`` with only ``_fused_sdp_choice`` replaced: every other op is the real one."""

    def __init__(self, backend: SDPBackend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(torch.ops.aten, name)

    def _fused_sdp_choice(self, *args, **kwargs):
        return int(self.backend.value)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("dim", [12, 16])
def test_real_cuda_ops_run_through_our_wrappers_on_meta(monkeypatch, backend, masked, kv_heads, dim):
    """The private CUDA ops themselves (their meta kernels: the schemas and output shapes of this torch) called by
    our wrappers exactly as on a GPU: a schema change between torch versions fails here, in CI, without a GPU."""
    monkeypatch.setattr(kernels, "_ATEN", ForcedChoice(backend))
    monkeypatch.setitem(kernels.LSE_KERNELS, ("meta", backend), kernels.LSE_KERNELS[("cuda", backend)])
    q, k, v = qkv(kv_heads, dim, torch.bfloat16, "meta")
    mask = causal_padding_mask("meta") if masked else None
    module = SimpleNamespace(num_key_value_groups=HEADS // kv_heads, is_causal=True)
    if backend == SDPBackend.FLASH_ATTENTION and masked:  # SDPA never picks flash with a mask: refused, not dropped
        with pytest.raises(ValueError, match="takes no attention mask"):
            kernels.attention_with_lse(module, q, k, v, mask, 0.3)
        return
    out, lse = kernels.attention_with_lse(module, q, k, v, mask, 0.3)
    assert out.device.type == "meta" and lse.device.type == "meta"
    assert out.shape == (BATCH, HEADS, LENGTH, dim) and out.dtype == torch.bfloat16
    assert lse.shape == (BATCH, HEADS, LENGTH) and lse.dtype == torch.float32  # LSE length = T after slicing
    prefix_value = torch.empty(BATCH, kv_heads, dim, device="meta", dtype=torch.bfloat16)
    merged = merge_prefix(out, lse, torch.empty(BATCH, HEADS, LENGTH, device="meta"), prefix_value)
    assert merged.shape == q.shape and merged.dtype == q.dtype


# ------------------------------------------------------------------ the self-check: wrong conventions caught
def _front_padded(lse: torch.Tensor) -> torch.Tensor:
    """The values at the end of a 32-multiple buffer, garbage first: slicing ``[..., :T]`` reads the wrong ones."""
    length = lse.shape[2]
    padded = torch.full((*lse.shape[:2], -(-length // 32) * 32 + 32), 7.0)
    padded[..., -length:] = lse[..., :length]
    return padded


def _raise(out, lse):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


WRONG_CONVENTIONS = {
    "log2_lse": lambda out, lse: (out, lse / math.log(2)),
    "lse_unsliced": lambda out, lse: (out, _front_padded(lse.squeeze(-1) if lse.dim() == 4 else lse)),
    "lse_unpadded_short": lambda out, lse: (out, (lse.squeeze(-1) if lse.dim() == 4 else lse)[..., : LENGTH // 2]),
    "output_transposed": lambda out, lse: (out.transpose(1, 2).reshape(out.shape), lse),
    "raises": _raise,
}


class WrongStandIns(CudaStandIns):
    """The stand-ins with one convention broken in every op's result (``WRONG_CONVENTIONS``)."""

    def __init__(self, backend: SDPBackend, wrong: str):
        super().__init__(backend, efficient_gqa=True)
        self.wrong = WRONG_CONVENTIONS[wrong]

    def _broken(self, result):
        return (*self.wrong(*result[:2]), *result[2:])

    def _scaled_dot_product_flash_attention(self, *args, **kwargs):
        return self._broken(super()._scaled_dot_product_flash_attention(*args, **kwargs))

    def _scaled_dot_product_efficient_attention(self, *args, **kwargs):
        return self._broken(super()._scaled_dot_product_efficient_attention(*args, **kwargs))

    def _scaled_dot_product_cudnn_attention(self, *args, **kwargs):
        return self._broken(super()._scaled_dot_product_cudnn_attention(*args, **kwargs))


SELF_CHECK_TEXTS = ["A cat sits on the mat.", "The quarterly report shows that revenue grew by twelve percent.", "Hi"]


@pytest.fixture(scope="module")
def kv_model(tiny_llama):
    return kvemb_st.from_base(tiny_llama, layers=[1, 3], prefix_rope="relative0", prefix_bias=2.0)


@pytest.fixture(scope="module")
def reference_vectors(kv_model):
    return kv_model.encode(SELF_CHECK_TEXTS, convert_to_tensor=True)  # CPU flash, itself checked in test_attention.py


@pytest.mark.parametrize("wrong", sorted(WRONG_CONVENTIONS))
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_wrong_kernel_convention_is_caught_warned_once_and_vectors_stay_right(
    kv_model, reference_vectors, stand_in, backend, wrong
):
    ops = stand_in(backend, WrongStandIns, wrong=wrong)
    with pytest.warns(RuntimeWarning, match="failed its self-check") as caught:
        got = kv_model.encode(SELF_CHECK_TEXTS, convert_to_tensor=True)
        again = kv_model.encode(SELF_CHECK_TEXTS[::-1], batch_size=2, convert_to_tensor=True)
    messages = [str(w.message) for w in caught if "self-check" in str(w.message)]
    assert len(messages) == 1, messages  # one combination (both layers alike), one warning, however many calls
    assert backend.name in messages[0] and torch.__version__ in messages[0]
    assert ops.calls  # the broken kernel really ran, and was caught
    torch.testing.assert_close(got, reference_vectors, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.flip(0), reference_vectors, atol=1e-5, rtol=1e-5)
    [(combination, verdict)] = kernel_check.results().items()
    assert combination.backend == backend.name and verdict.path == "prefix_channel"


def test_without_the_self_check_a_wrong_convention_gives_wrong_vectors(kv_model, reference_vectors, stand_in, monkeypatch):
    """What the check prevents: a base-2 LSE runs silently and moves every vector (the opt-out is for benchmarks)."""
    monkeypatch.setenv(kernel_check.ENV, "0")
    stand_in(SDPBackend.CUDNN_ATTENTION, WrongStandIns, wrong="log2_lse")
    got = kv_model.encode(SELF_CHECK_TEXTS, convert_to_tensor=True)
    assert (got - reference_vectors).abs().max() > 1e-3 and not kernel_check.results()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_right_kernel_passes_its_check_once_and_keeps_the_fast_path(kv_model, reference_vectors, stand_in, monkeypatch, backend):
    ops = stand_in(backend, efficient_gqa=True)
    checks = []
    real = self_check._self_check_difference
    monkeypatch.setattr(self_check, "_self_check_difference", lambda *a: checks.append(real(*a)) or checks[-1])
    for batch_size in (3, 2, 1):
        got = kv_model.encode(SELF_CHECK_TEXTS, batch_size=batch_size, convert_to_tensor=True)
        torch.testing.assert_close(got, reference_vectors, atol=1e-5, rtol=1e-5)
    assert len(checks) == 1 and checks[0] < kernel_check.TOLERANCE[torch.float32]  # once, not per call or layer
    assert len(ops.calls) == 2 * 6  # two layers x six batches, all on the checked kernel
    assert [v.path for v in kernel_check.results().values()] == ["lse_merge"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_right_kernel_passes_with_fully_masked_rows_in_every_dtype(recwarn, dtype):
    """Left padding with the mask kept: the first queries of a padded row see no key at all. No false alarm."""
    q, k, v = qkv(2, 16, dtype)
    keep = torch.arange(LENGTH)[None] >= torch.tensor([0, 14])[:, None]  # row 1: 14 pads on the left
    mask = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    routing = KVRouting(layers=frozenset({0}), last_index=torch.full((BATCH,), LENGTH - 1), prefix_bias=1.0)
    module = SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=2)
    reroute.kv_reroute_attention(module, q, k, v, mask, scaling=0.25, kv_routing=routing)
    [verdict] = kernel_check.results().values()
    assert verdict.fast and not [w for w in recwarn if "self-check" in str(w.message)]


def test_concurrent_first_calls_run_one_check():
    combination = kernel_check.Combination("cpu", "FLASH_ATTENTION", "torch.float32", 16, 4, 2, "causal")
    calls = []

    def slow_check() -> float:
        calls.append(1)
        time.sleep(0.05)
        return 0.0

    with ThreadPoolExecutor(4) as pool:
        decided = list(pool.map(lambda _: kernel_check.decide(combination, slow_check, 1e-4), range(8)))
    assert decided == [True] * 8 and len(calls) == 1


# ----------------------------------------------------------------------------- when the mask may go
def test_right_padding_is_recognised_only_when_present():
    assert is_right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not is_right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding
    assert not is_right_padded(torch.tensor([[1, 0, 1]]))  # a hole


@pytest.mark.parametrize(
    "right_padded,window,expected", [(True, None, True), (True, 64, True), (True, 8, False), (False, None, False)]
)
def test_mask_is_dropped_only_for_right_padding_without_a_short_sliding_window(right_padded, window, expected):
    routing = KVRouting(layers=frozenset({0}), last_index=torch.zeros(1, dtype=torch.long), right_padded=right_padded)
    module = SimpleNamespace(sliding_window=window)
    assert reroute._causal_suffices(module, routing, 32, True, {}) is expected
    assert reroute._causal_suffices(SimpleNamespace(), routing, 32, True, {"sliding_window": window}) is expected
    assert not reroute._causal_suffices(module, routing, 32, False, {})  # a bidirectional layer needs its mask
