"""Half-precision backbones: float32 vectors out, numpy conversion works, and batching stays within tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvemb_st

TEXTS = ["A short one.", "A considerably longer sentence that forces a lot of padding onto the short one.", ""]
HALF_TOLERANCE = 2e-2  # max abs difference of unit vectors between batched and alone (bf16 has 8 mantissa bits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backbone_gives_float32_numpy(tiny_llama, dtype):
    model = kvemb_st.from_base(tiny_llama, layers=[1, 2], pooling="mean+last", model_kwargs={"dtype": dtype})
    assert model[0].auto_model.dtype == dtype
    embeddings = model.encode(TEXTS, convert_to_numpy=True)
    assert embeddings.dtype == np.float32 and np.isfinite(embeddings).all()
    for i, text in enumerate(TEXTS):
        alone = model.encode([text])[0]
        assert np.abs(alone - embeddings[i]).max() < HALF_TOLERANCE
    full = kvemb_st.from_base(tiny_llama, layers=[1, 2], pooling="mean+last").encode(TEXTS)
    assert (embeddings * full).sum(axis=1).min() > 0.99  # close to the fp32 model's vectors
