"""The kernel self-check in the precisions GPU users run: a kernel with a wrong convention is caught in bfloat16 and
float16 as in float32 (``test_attention_kernels.py``), a right one is not, and a subtle fault (a log-sum-exp off by
0.01) still fails the float32 check.

The CUDA kernels run as the CPU stand-ins of ``test_attention_kernels.py`` (each op's result broken in one way),
through the public ``encode`` of a tiny re-routed model loaded in each dtype. Measured on that model (CPU, torch
2.13): the self-check's difference for a right kernel is 1.7e-7 (float32), 5.7e-3 (bfloat16), 7.2e-4 (float16);
for a base-2 log-sum-exp 0.31 in every dtype; for a log-sum-exp off by 0.01 in float32 3.4e-3.
"""

from __future__ import annotations

import warnings
from functools import cache

import pytest
import torch
from torch.nn.attention import SDPBackend
from test_attention_kernels import (  # noqa: F401 - stand_in is a fixture
    BACKENDS,
    SELF_CHECK_TEXTS,
    WRONG_CONVENTIONS,
    CudaStandIns,
    WrongStandIns,
    stand_in,
)

import kvemb_st
from kvemb_st import kernel_check

HALF = [torch.bfloat16, torch.float16]
# How far the vectors of the portable path (where a broken kernel is sent) may be from those of the CPU kernel
# in each dtype: measured 9e-8, 1.7e-3, 3.6e-4. A base-2 log-sum-exp that ran unchecked moves them by 7e-2.
VECTOR_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


class LseOffBy(WrongStandIns):
    """The stand-ins with every op's log-sum-exp off by ``offset``: plausible vectors, slightly wrong."""

    def __init__(self, backend, offset: float):
        CudaStandIns.__init__(self, backend, efficient_gqa=True)
        self.wrong = lambda out, lse: (out, lse + offset)


@pytest.fixture(scope="module")
def dtype_model(tiny_llama):
    """A re-routed model in a given dtype, and its vectors on the CPU kernel (itself self-checked): the reference."""

    @cache
    def build(dtype: torch.dtype):
        model = kvemb_st.from_base(
            tiny_llama, layers=[1, 3], prefix_rope="relative0", prefix_bias=2.0, model_kwargs={"dtype": dtype}
        )
        assert model[0].auto_model.dtype == dtype
        kernel_check.reset()  # the reference's verdict must not decide for the test
        return model, model.encode(SELF_CHECK_TEXTS, convert_to_tensor=True)

    def get(dtype: torch.dtype):
        model, reference = build(dtype)
        kernel_check.reset()
        return model, reference

    return get


def encode_and_verdict(model):
    """Encode the texts; the vectors, the one verdict (both layers alike) and the self-check's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.encode(SELF_CHECK_TEXTS, convert_to_tensor=True)
    warned = [str(w.message) for w in caught if "self-check" in str(w.message)]
    [(combination, verdict)] = kernel_check.results().items()
    return got, combination, verdict, warned


def assert_caught(model, reference, dtype):
    got, combination, verdict, warned = encode_and_verdict(model)
    assert combination.dtype == str(dtype) and verdict.path == "prefix_channel", verdict.error
    assert len(warned) == 1 and "failed its self-check" in warned[0], warned
    torch.testing.assert_close(got, reference, atol=VECTOR_TOLERANCE[dtype], rtol=0)


# float32 runs every convention on every kernel in test_attention_kernels.py
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_base2_log_sum_exp_is_caught_in_half_precision(dtype_model, stand_in, backend, dtype):
    model, reference = dtype_model(dtype)
    ops = stand_in(backend, WrongStandIns, wrong="log2_lse")
    assert_caught(model, reference, dtype)
    assert ops.calls  # the broken kernel really ran


# The other conventions whose error is a number (not a shape or an exception), each on the kernel it concerns.
NUMERIC = {"lse_unsliced": SDPBackend.EFFICIENT_ATTENTION, "output_transposed": SDPBackend.FLASH_ATTENTION}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("wrong", sorted(NUMERIC))
def test_other_wrong_conventions_are_caught_in_half_precision(dtype_model, stand_in, wrong, dtype):
    assert wrong in WRONG_CONVENTIONS
    model, reference = dtype_model(dtype)
    ops = stand_in(NUMERIC[wrong], WrongStandIns, wrong=wrong)
    assert_caught(model, reference, dtype)
    assert ops.calls


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_right_kernel_keeps_the_fast_path_in_half_precision(dtype_model, stand_in, dtype):
    """No false alarm: the rounding of half precision stays under the tolerance (float32: test_attention_kernels)."""
    model, reference = dtype_model(dtype)
    ops = stand_in(SDPBackend.CUDNN_ATTENTION)
    got, combination, verdict, warned = encode_and_verdict(model)
    assert ops.calls and combination.dtype == str(dtype)
    assert verdict.path == "lse_merge" and not warned, verdict.error
    torch.testing.assert_close(got, reference, atol=VECTOR_TOLERANCE[dtype], rtol=0)


def test_log_sum_exp_off_by_a_hundredth_fails_the_float32_check(dtype_model, stand_in, monkeypatch):
    model, reference = dtype_model(torch.float32)
    stand_in(SDPBackend.CUDNN_ATTENTION, LseOffBy, offset=0.01)
    assert_caught(model, reference, torch.float32)
    monkeypatch.setenv(kernel_check.ENV, "0")  # what the check prevents: the fault, unchecked, moves the vectors
    assert (model.encode(SELF_CHECK_TEXTS, convert_to_tensor=True) - reference).abs().max() > 1e-4
