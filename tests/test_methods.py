"""Baseline methods of the module: sound vectors, save/load, and equality with plain references written here.

Budget: < 60 s on 2 cores (tiny random models only).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

import kvemb_st
from kvemb_st.config import ECHO_TEMPLATE, PLACEHOLDER, TOKEN_PREPENDING_TEMPLATE, ConfigError
from kvemb_st.methods import METHODS

SHORT = "Hi."
LONG = (
    "The committee met on Tuesday to review the budget, and after a long debate about schools, roads and the "
    "new library it approved a plan that raises spending by four percent while keeping taxes flat."
)
TEXTS = [SHORT, LONG, "A man is playing a guitar"]


def plain_model(folder) -> torch.nn.Module:
    return AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def built(tiny_llama):
    return {
        name: kvemb_st.from_base(tiny_llama, method=name, layers="1-2" if name == "kv" else ()) for name in METHODS
    }


@pytest.mark.parametrize("name", list(METHODS))
def test_method_vectors_are_sound_and_survive_save_load(built, name, tmp_path):
    model = built[name]
    batch = model.encode(TEXTS)
    assert batch.shape == (len(TEXTS), 64) and np.isfinite(batch).all()
    np.testing.assert_array_equal(batch, model.encode(TEXTS))  # deterministic
    alone = np.stack([model.encode([text])[0] for text in TEXTS])  # no padding at all
    np.testing.assert_allclose(batch, alone, atol=1e-5)

    model.save(str(tmp_path))
    saved = json.loads((tmp_path / "kvemb_config.json").read_text())
    assert saved["method"] == name and saved["template"] == METHODS[name].template
    for loaded in (SentenceTransformer(str(tmp_path), trust_remote_code=True), kvemb_st.load(str(tmp_path))):
        np.testing.assert_allclose(loaded.encode(TEXTS), batch, atol=1e-6)


def test_echo_equals_mean_of_second_copy_in_a_plain_forward(built, tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = plain_model(tiny_llama)
    first_part, between, _ = ECHO_TEMPLATE.split("{text}")
    expected = []
    for text in TEXTS:
        ids = tokenizer(ECHO_TEMPLATE.replace("{text}", text), return_tensors="pt")["input_ids"]
        # the space ending the template's middle part is the first character of the second copy's first token
        start = len(tokenizer(first_part + text + between.rstrip(" "))["input_ids"])
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state[0]
        expected.append(F.normalize(hidden[start:].mean(0), dim=-1).numpy())
    np.testing.assert_allclose(built["echo"].encode(TEXTS), np.stack(expected), atol=1e-5)


def token_prepending_reference(folder, texts: list[str], tp_layers: list[int]) -> np.ndarray:
    """Layer-by-layer loop: before each TP layer the placeholder's state becomes the final token's state."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = plain_model(folder)
    expected = []
    for text in texts:
        prompt = TOKEN_PREPENDING_TEMPLATE.replace(PLACEHOLDER, tokenizer.eos_token).replace("{text}", text)
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        placeholder = ids[0].tolist().index(tokenizer.eos_token_id)
        positions = torch.arange(ids.shape[1])[None]
        with torch.no_grad():
            hidden = model.embed_tokens(ids)
            rope = model.rotary_emb(hidden, positions)
            for index, layer in enumerate(model.layers):
                if index in tp_layers:
                    hidden[:, placeholder] = hidden[:, -1]
                hidden = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=positions)
            expected.append(F.normalize(model.norm(hidden)[0, -1], dim=-1).numpy())
    return np.stack(expected)


@pytest.mark.parametrize(
    ("arch", "tp_layers"), [("llama", None), ("llama", [1, 2]), ("mistral", [0, 2]), ("qwen2", [1, 3]), ("qwen3", [2])]
)
def test_token_prepending_equals_layer_loop_reference(tiny_models, arch, tp_layers):
    folder = str(tiny_models[arch])
    model = kvemb_st.from_base(folder, method="token_prepending", tp_layers=tp_layers)
    expected_layers = [1] if tp_layers is None else tp_layers  # default for 4 layers: layer 1 only
    expected = token_prepending_reference(folder, TEXTS, expected_layers)
    np.testing.assert_allclose(model.encode(TEXTS), expected, atol=1e-5)


def test_token_prepending_changes_the_vector(built):
    assert not np.allclose(built["token_prepending"].encode(TEXTS), built["prompteol"].encode(TEXTS), atol=1e-3)


def test_echo_truncation_cuts_both_copies_and_pools_the_second(tiny_llama):
    model = kvemb_st.from_base(tiny_llama, method="echo", max_seq_length=24)
    features = model[0].preprocess([LONG * 3])
    ids, text_mask = features["input_ids"][0], features["text_mask"][0].bool()
    assert len(ids) <= 24
    tokenizer = model.tokenizer
    second = tokenizer.decode(ids[text_mask]).strip()
    first = tokenizer.decode(ids).split("rewritten sentence:")[0].removeprefix("Rewrite the sentence:").strip(" ,")
    assert second == first and LONG.startswith(second) and len(second) > 10


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"method": "bert"}, "'method' must be one of"),
        ({"method": "echo", "layers": "1-2"}, "only apply to method 'kv'"),
        ({"method": "kv", "layers": "1", "tp_layers": "1"}, "only applies to method 'token_prepending'"),
        ({"method": "echo", "template": "Text: {text}"}, "exactly 2 '{text}'"),
        ({"method": "prompteol", "template": "{text} and {text}"}, "exactly one '{text}'"),
        ({"method": "token_prepending", "template": 'This sentence : "{text}" <PST>'}, "exactly once, before"),
        ({"method": "token_prepending", "tp_layers": "9"}, "out of range"),
    ],
)
def test_bad_method_knobs_fail_clearly(tiny_llama, knobs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        kvemb_st.from_base(tiny_llama, **knobs)


def test_bad_method_inputs_fail_clearly(built):
    with pytest.raises(ValueError, match="exactly 2"):
        built["echo"].encode(["a"], prompt="Query: {text}")
    with pytest.raises(ValueError, match="placeholder '<PST>'"):
        built["token_prepending"].encode(["a"], prompt='Query: "{text}"')
    with pytest.raises(ValueError, match="gives no tokens"):
        built["mean"].encode(["fine", ""])


def test_echo_prompt_template_repeats_the_text(built):
    """An echo ST prompt with two copies is a whole template of its own and pools its own second copy."""
    prompt = "Query: {text}\nQuery again: {text}"
    features = built["echo"][0].preprocess(["red apples"], prompt=prompt)
    tokens = built["echo"].tokenizer.decode(features["input_ids"][0][features["text_mask"][0].bool()])
    assert tokens.strip() == "red apples"
