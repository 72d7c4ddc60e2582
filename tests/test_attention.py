"""The re-routing attention equals a plain reference: explicit softmax over [prefix; keys] with RoPE via complex numbers.

Covers padded and unpadded batches (the masked and the ``is_causal`` kernels), the mask kept and dropped
(``right_padded``), scaled RoPE (yarn, longrope: |cos|^2 + |sin|^2 != 1), half precision against float32,
and both kernels: the exact log-sum-exp merge and the prefix-channel fallback. On a machine with a GPU the
``device`` fixture runs the model on CUDA too, against the same CPU reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ARCHS, GEMMA3_WINDOW
from transformers import AttentionInterface, AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import kvemb_st
from kvemb_st.attention import reroute
from kvemb_st.config import KVEmbeddingConfig
from kvemb_st.methods import kv_routing
from kvemb_st.module import KVEmbedding

REFERENCE = "kvemb_test_reference"
TEXTS = [
    "A cat sits on the mat.",
    "The quarterly report shows that revenue grew by twelve percent while costs stayed flat, "
    "which the board welcomed after a difficult year.",
    "Hi",
]
SCALED_ROPE = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 256},
    "longrope": {
        "rope_type": "longrope",
        "factor": 4.0,
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 256,
        "short_factor": [1.0 + 0.25 * i for i in range(8)],
        "long_factor": [2.0 + 0.25 * i for i in range(8)],
    },
}


def _as_complex(x: torch.Tensor) -> torch.Tensor:
    """Pairs (x_j, x_{j+D/2}) as one complex number: the half-split RoPE of Llama/Mistral/Qwen is z * e^{i p theta}."""
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half].double(), x[..., half:].double())


def reference_attention(
    module, query, key, value, attention_mask, scaling, kv_routing=None, sliding_window=None, **kwargs
):
    """Plain attention in float64, one row at a time: causal + right padding (+ the sliding window: query i sees
    key j if i - j < window), at selected layers one prefix slot first, seen by every query whatever the window,
    its key moved with unit-modulus rotations (any RoPE magnitude stays inside the key)."""
    batch, heads, length, dim = query.shape
    group = torch.arange(heads) // (heads // key.shape[1])  # the KV head of each query head
    inv_freq = module.rotary_fn_inv_freq.double().cpu()  # set by the test: the layer's own RoPE frequencies
    rerouted = kv_routing is not None and module.layer_idx in kv_routing.layers
    positions = torch.arange(length)
    out = torch.zeros(batch, length, heads, dim, dtype=torch.float64)
    for b in range(batch):
        last = int(kv_routing.last_index[b]) if kv_routing is not None else length - 1
        visible = (positions[None, :] <= positions[:, None]) & (positions[None, :] <= last)  # (query i, key j)
        if sliding_window is not None:
            visible &= positions[:, None] - positions[None, :] < sliding_window
        q, k, v = (t[b].double().cpu() for t in (query, key[:, group], value[:, group]))  # (H, T, D)
        logits = (q @ k.transpose(1, 2) * scaling).masked_fill(~visible, float("-inf"))  # (H, i, j)
        values = v[:, None].expand(heads, length, length, dim)  # (H, i, j, D)
        if rerouted:
            angle = lambda p: torch.exp(1j * p[:, None].double() * inv_freq)  # noqa: E731
            raw = _as_complex(k[:, last]) * angle(torch.tensor([last])).conj()  # final token's key, un-rotated
            where = {"keep": torch.full((length,), last), "start": torch.zeros(length), "relative0": positions}
            prefix = raw[:, None] * angle(where[kv_routing.prefix_rope])  # (H, i, D/2): the key each query sees
            prefix_logit = (_as_complex(q) * prefix.conj()).real.sum(-1) * scaling + kv_routing.prefix_bias
            logits = torch.cat([prefix_logit[..., None], logits], dim=-1)
            values = torch.cat([v[:, last][:, None, None].expand(heads, length, 1, dim), values], dim=2)
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # padding beyond a window sees no key: unread
        out[b] = (weights[..., None] * values).sum(2).transpose(0, 1)
    return out.to(query.dtype).to(query.device), None


AttentionInterface.register(REFERENCE, reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


@pytest.fixture(params=["lse_merge", "prefix_channel"])
def kernel(request, monkeypatch):
    """Both ways of computing the re-routed layers: the exact log-sum-exp merge and the public-SDPA fallback."""
    if request.param == "prefix_channel":
        monkeypatch.setattr(reroute, "checked_attention_with_lse", lambda *args, **kwargs: None)
    return request.param


def reference_backbone(folder: str):
    """The backbone with the reference attention; each layer is told its RoPE frequencies (Gemma 3: per layer type)."""
    model = AutoModel.from_pretrained(folder, attn_implementation=REFERENCE, dtype=torch.float32).eval()
    rotary = model.rotary_emb
    for layer in model.layers:
        per_type = f"{getattr(layer.self_attn, 'layer_type', None)}_inv_freq"
        layer.self_attn.rotary_fn_inv_freq = getattr(rotary, per_type) if hasattr(rotary, per_type) else rotary.inv_freq
    return model


def rerouted_and_reference(folder, texts, device="cpu", dtype=torch.float32, right_padded=None, **knobs):
    """Real-token hidden states of the package's re-routed forward and of the float64 reference, plus the mask."""
    module = KVEmbedding(
        KVEmbeddingConfig(base_model=folder, **knobs), model_kwargs={"dtype": dtype}
    ).to(device)
    features = module.preprocess(texts)
    ids, mask = features["input_ids"], features["attention_mask"]
    routing = kv_routing(module.auto_model, module.config, ids, mask)
    assert routing.right_padded  # the module always pads on the right
    if right_padded is not None:
        routing = dataclasses.replace(routing, right_padded=right_padded)
    with torch.no_grad():
        got = module.auto_model(
            input_ids=ids.to(device), attention_mask=mask.to(device), kv_routing=routing.to(device)
        ).last_hidden_state.float().cpu()
        reference = reference_backbone(folder)
        reference_routing = kv_routing(reference, module.config, ids, mask)
        want = reference(input_ids=ids, attention_mask=mask, kv_routing=reference_routing).last_hidden_state
    real = mask.bool()
    return got[real], want[real], ids, mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "rope,bias,layers",
    [("keep", 0.0, [1, 2]), ("start", 1.5, [0, 3]), ("relative0", 3.0, [2, 3]), ("relative0", -1.0, [0, 1, 2, 3])],
)
def test_rerouted_hidden_states_equal_reference(tiny_models, kernel, device, arch, rope, bias, layers):
    folder = str(tiny_models[arch])
    got, want, ids, mask = rerouted_and_reference(
        folder, TEXTS, device, layers=layers, prefix_bias=bias, prefix_rope=rope
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and re-routing really changed something
        plain = reference_backbone(folder)(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
    assert (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("rope,bias", [("relative0", 3.0), ("start", 1.0), ("keep", -1.0)])
def test_gemma3_sliding_and_full_layers_equal_reference(tiny_models, kernel, device, rope, bias):
    """Gemma 3: texts longer than the sliding window, re-routed at sliding (0, 2) and full (1, 3) layers.

    The prefix slot is seen by every query (also those whose window no longer reaches the final token); the
    ordinary keys keep the window; the prefix key moves with each layer's own (local or global) RoPE.
    """
    folder = str(tiny_models["gemma3_text"])
    model = AutoModel.from_pretrained(folder)
    assert [layer.self_attn.sliding_window for layer in model.layers] == [GEMMA3_WINDOW, None, GEMMA3_WINDOW, None]
    got, want, ids, mask = rerouted_and_reference(
        folder, TEXTS, device, layers=[0, 1, 2, 3], prefix_bias=bias, prefix_rope=rope
    )
    assert int(mask.sum(1).max()) > 3 * GEMMA3_WINDOW  # the window really cuts
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    cos = kv_routing(model, KVEmbeddingConfig(base_model=folder, layers=[0], prefix_rope="start"), ids, mask).cos
    assert not torch.allclose(cos["sliding_attention"], cos["full_attention"])  # local and global RoPE differ


@pytest.mark.parametrize(
    "texts,right_padded", [(TEXTS, True), (TEXTS, False), ([TEXTS[0], TEXTS[0].replace("cat", "dog")], True)],
    ids=["padded", "padded-mask_kept", "no_padding"],
)
def test_mask_dropped_or_kept_padded_or_not_equals_reference(tiny_models, kernel, device, texts, right_padded):
    """Unpadded batches reach the kernels with no mask (``is_causal``); padded ones with the mask unless
    ``right_padded`` lets the re-routed layers drop it."""
    got, want, _, mask = rerouted_and_reference(
        str(tiny_models["llama"]), texts, device, right_padded=right_padded, layers=[1, 3], prefix_bias=2.0
    )
    if texts is not TEXTS:
        assert bool(mask.all())  # really no padding
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=sorted(SCALED_ROPE))
def scaled_rope_llama(request, tmp_path_factory, smollm2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_parameters=SCALED_ROPE[request.param],
    )
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("rope", ["start", "relative0"])
def test_scaled_rope_equals_reference(scaled_rope_llama, kernel, device, rope):
    rotary = AutoModel.from_pretrained(scaled_rope_llama).rotary_emb
    cos, sin = rotary(torch.empty(0), torch.arange(4)[None])
    assert not torch.allclose(cos**2 + sin**2, torch.ones(()))  # the case the test is about
    got, want, _, _ = rerouted_and_reference(scaled_rope_llama, TEXTS, device, layers=[0, 2], prefix_rope=rope)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# Half precision: the re-routed forward's largest error against the float64 reference, relative to the largest
# reference state. Measured on tiny Llama (layers 1-3): re-routed 1.0e-2 (bf16) / 1.5e-3 (fp16), the same
# backbone's plain forward 7.5e-3 / 1.0e-3; the tolerance is twice the measured re-routed error.
HALF_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", sorted(HALF_TOLERANCE, key=str))
@pytest.mark.parametrize("rope", ["keep", "relative0"])
def test_half_precision_within_tolerance_of_float32_reference(tiny_llama, kernel, device, dtype, rope):
    got, want, _, _ = rerouted_and_reference(
        tiny_llama, TEXTS, device, dtype=dtype, layers=[1, 2, 3], prefix_rope=rope, prefix_bias=2.0
    )
    assert (got - want).abs().max() / want.abs().max() < HALF_TOLERANCE[dtype]


@pytest.mark.parametrize("arch", ARCHS)
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
