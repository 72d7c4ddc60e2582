"""experiments/prefix_attention/prefix_attention.py: its recording attention must compute what the package's re-routed forward computes
(else the shares it reports describe another model), and the prefix slot's share must respond to the bias."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from kvemb_st.config import KVEmbeddingConfig
from kvemb_st.methods import kv_routing
from kvemb_st.module import KVEmbedding

from kvemb_lab import prefix_attention as probe

TEXTS = [
    "A man is playing a guitar on a small stage in front of a quiet crowd of people.",
    "Short one.",
    "The committee postponed the vote on the new budget until the following week, citing missing figures.",
]


@pytest.mark.parametrize("arch,layers", [("llama", "1-2"), ("gemma3_text", "0-3")])  # Gemma 3: texts > window 8
def test_probe_attention_reproduces_the_rerouted_forward(tiny_models, arch, layers):
    folder = str(tiny_models[arch])
    module = KVEmbedding(KVEmbeddingConfig(base_model=folder, layers=layers, prefix_bias=1.5))
    features = module.preprocess(TEXTS)
    ids, mask = features["input_ids"], features["attention_mask"]
    recording = AutoModel.from_pretrained(folder, attn_implementation=probe.PROBE).eval()
    with torch.no_grad():
        want = module.auto_model(input_ids=ids, attention_mask=mask, kv_routing=kv_routing(module.auto_model, module.config, ids, mask))
        got = recording(input_ids=ids, attention_mask=mask, kv_routing=kv_routing(recording, module.config, ids, mask))
    real = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], atol=1e-4, rtol=1e-4)


def test_prefix_share_is_a_weight_that_grows_with_the_bias(tiny_models):
    folder = str(tiny_models["llama"])
    module = KVEmbedding(KVEmbeddingConfig(base_model=folder, layers="1-2"))
    recording = AutoModel.from_pretrained(folder, attn_implementation=probe.PROBE).eval()
    shares = [probe.measure(recording, module, TEXTS, bias)["prefix slot"] for bias in (-2.0, 1.0, 4.0)]
    assert [sorted(s) for s in shares] == [[1, 2]] * 3  # only the re-routed layers record a prefix share
    for layer in (1, 2):
        low, mid, high = (s[layer] for s in shares)
        assert 0.0 < low < mid < high < 1.0
