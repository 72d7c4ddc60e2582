"""The re-routing attention equals a plain reference: explicit softmax over [prefix; keys] with RoPE via complex numbers."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import kvemb_st
from kvemb_st import attention
from kvemb_st.config import KVEmbeddingConfig
from kvemb_st.module import KVEmbedding

REFERENCE = "kvemb_test_reference"
TEXTS = [
    "A cat sits on the mat.",
    "The quarterly report shows that revenue grew by twelve percent while costs stayed flat, "
    "which the board welcomed after a difficult year.",
    "Hi",
]


def _as_complex(x: torch.Tensor) -> torch.Tensor:
    """Pairs (x_j, x_{j+D/2}) as one complex number: the half-split RoPE of Llama/Mistral/Qwen is z * e^{i p theta}."""
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half].double(), x[..., half:].double())


def reference_attention(module, query, key, value, attention_mask, scaling, kv_routing=None, **kwargs):
    """Plain, loop-based attention: causal + padding mask, and at selected layers one prefix slot first."""
    batch, heads, length, dim = query.shape
    n_rep = heads // key.shape[1]
    inv_freq = module.rotary_fn_inv_freq.double()  # set by the test: the model's own RoPE frequencies
    rerouted = kv_routing is not None and module.layer_idx in kv_routing.layers
    out = torch.zeros(batch, length, heads, dim, dtype=torch.float64)
    for b in range(batch):
        last = int(kv_routing.last_index[b]) if kv_routing is not None else length - 1
        for h in range(heads):
            q, k, v = query[b, h].double(), key[b, h // n_rep].double(), value[b, h // n_rep].double()
            for i in range(length):
                visible = [j for j in range(min(i, last) + 1)]
                logits = [float(q[i] @ k[j]) * scaling for j in visible]
                values = [v[j] for j in visible]
                if rerouted:
                    angle = lambda p: torch.exp(1j * p * inv_freq)  # noqa: E731
                    raw = _as_complex(k[last]) * angle(last).conj()  # the final token's key, un-rotated
                    mode = kv_routing.prefix_rope
                    position = {"keep": last, "start": 0, "relative0": i}[mode]
                    prefix = raw * angle(position)
                    logit = float((_as_complex(q[i]) * prefix.conj()).real.sum()) * scaling
                    logits.insert(0, logit + kv_routing.prefix_bias)
                    values.insert(0, v[last])
                weights = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=0)
                out[b, i, h] = sum(w * val for w, val in zip(weights, values))
    return out.to(query.dtype), None


AttentionInterface.register(REFERENCE, reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


@pytest.fixture(params=["lse_merge", "prefix_channel"])
def kernel(request, monkeypatch):
    """Both ways of computing the re-routed layers: the exact log-sum-exp merge (CPU) and the public-SDPA fallback."""
    if request.param == "prefix_channel":
        monkeypatch.setattr(attention, "_attention_with_lse", lambda *args: None)
    return request.param


def reference_backbone(folder: str):
    model = AutoModel.from_pretrained(folder, attn_implementation=REFERENCE).eval()
    for layer in model.layers:
        layer.self_attn.rotary_fn_inv_freq = model.rotary_emb.inv_freq
    return model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    "rope,bias,layers",
    [("keep", 0.0, [1, 2]), ("start", 1.5, [0, 3]), ("relative0", 3.0, [2, 3]), ("relative0", -1.0, [0, 1, 2, 3])],
)
def test_rerouted_hidden_states_equal_reference(tiny_models, kernel, arch, rope, bias, layers):
    folder = str(tiny_models[arch])
    module = KVEmbedding(KVEmbeddingConfig(base_model=folder, layers=layers, prefix_bias=bias, prefix_rope=rope))
    features = module.preprocess(TEXTS)
    ids, mask = features["input_ids"], features["attention_mask"]
    with torch.no_grad():
        got = module.forward(dict(features))["token_embeddings"]
        want = reference_backbone(folder)(
            input_ids=ids, attention_mask=mask, kv_routing=module.routing(ids, mask)
        ).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    # and re-routing really changed something
    with torch.no_grad():
        plain = reference_backbone(folder)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got[real] - plain[real]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_no_selected_layers_equals_stock_model(tiny_models, arch):
    folder = str(tiny_models[arch])
    module = KVEmbedding(KVEmbeddingConfig(base_model=folder, method="prompteol"))  # same path, no layers
    features = module.preprocess(TEXTS)
    stock = AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    with torch.no_grad():
        got = module.forward(dict(features))["token_embeddings"]
        want = stock(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).last_hidden_state
    real = features["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rope", ["keep", "start", "relative0"])
def test_text_alone_equals_text_in_padded_batch(tiny_llama, kernel, rope):
    model = kvemb_st.from_base(tiny_llama, layers=[1, 3], prefix_rope=rope, prefix_bias=2.0, pooling="mean+last")
    batch = TEXTS + ["word " * 200, ""]
    together = model.encode(batch, batch_size=len(batch), convert_to_tensor=True)
    for i, text in enumerate(batch):
        alone = model.encode([text], convert_to_tensor=True)[0]
        torch.testing.assert_close(alone, together[i], atol=1e-5, rtol=0)
    shuffled = model.encode(batch[::-1], batch_size=2, convert_to_tensor=True)
    torch.testing.assert_close(shuffled.flip(0), together, atol=1e-5, rtol=0)


def test_two_models_with_different_settings_share_the_process(tiny_llama):
    """Settings travel with the call, not in globals: interleaved use gives each model its own vectors."""
    a = kvemb_st.from_base(tiny_llama, layers=[1, 2], prefix_bias=0.0, prefix_rope="keep")
    b = kvemb_st.from_base(tiny_llama, layers=[3], prefix_bias=4.0, prefix_rope="relative0")
    ea, eb = a.encode(TEXTS), b.encode(TEXTS)
    assert abs(ea - eb).max() > 1e-3
    assert abs(a.encode(TEXTS) - ea).max() == 0
    assert abs(b.encode(TEXTS) - eb).max() == 0
