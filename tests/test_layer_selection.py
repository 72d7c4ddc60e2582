"""Layer selection: window placement and its edge cases, explicit specs, the ID curve, its cache, calibration sets."""

from __future__ import annotations

import hashlib

import pytest
import torch

from kvemb_st import layer_selection
from kvemb_st.backbone import load_backbone
from kvemb_st.calibration import DEFAULT_CALIBRATION_FILE, calibration_hash, load_calibration
from kvemb_st.config import PROMPTEOL_TEMPLATE
from kvemb_st.layer_spec import parse_layer_spec
from kvemb_st.id_curve import compute_id_curve
from kvemb_st.intrinsic_dim import twonn
from kvemb_st.layer_selection import select_layers
from kvemb_st.layer_spec import explicit_layers, format_layer_spec
from kvemb_st.window_rule import (
    FLAT_SPREAD,
    SelectionParams,
    curve_spread,
    is_flat,
    near_minimum,
    place_window,
    select_window,
    selection_warnings,
)

# A 30-layer curve shaped like SmolLM2's: low at the very start (skipped), a hump, a minimum at 23.
CURVE30 = [
    9.0,
    10,
    11,
    12,
    12,
    13,
    13,
    14,
    14,
    15,
    15,
    15,
    16,
    16,
    16,
    16,
    15,
    15,
    14,
    13,
    12,
    11,
    10.5,
    10.0,
    10.2,
    10.4,
    10.6,
    10.8,
    11,
    11,
]


# ---------------------------------------------------------------------------------------- windows
def test_window_starts_at_the_minimum_and_is_shifted_to_fit():
    assert select_window(CURVE30, SelectionParams(window=5, anchor="start")) == ([23, 24, 25, 26, 27], 23)
    # 10 layers from 23 would run past layer 29: without an end margin the window ends at the last layer instead...
    uncapped = SelectionParams(window=10, anchor="start", end_margin=0)
    assert select_window(CURVE30, uncapped) == (list(range(20, 30)), 23)
    assert select_window(CURVE30, SelectionParams(anchor="start", end_margin=0)) == (list(range(20, 30)), 23)
    # ...and by default two layers before it (the last two layers are never re-routed unless asked for)
    assert select_window(CURVE30, SelectionParams(window=10, anchor="start")) == (list(range(18, 28)), 23)


def test_end_margin_moves_only_windows_that_reach_the_end_and_yields_on_shallow_models():
    early = SelectionParams(window=4, anchor="start", end_margin=3)
    assert place_window(2, 12, early) == [2, 3, 4, 5]  # far from the end: untouched
    assert place_window(7, 12, early) == [5, 6, 7, 8]  # would end at 10: ends at 8 = 11 - 3
    assert place_window(0, 5, early) == [0, 1, 2, 3]  # 4 layers + a margin of 3 do not fit 5: start at 0
    assert place_window(9, 12, SelectionParams(window=4, anchor="start", end_margin=0)) == [8, 9, 10, 11]


# The measured curves (512 calibration texts, results/id_curve/smollm2/id_curve.json and results/id_curve/qwen25/id_curve.json).
SMOLLM2_CURVE = [10.6, 10.0, 10.8, 11.4, 12.3, 11.8, 12.3, 13.0, 12.3, 12.0, 12.7, 12.7, 14.2, 14.3, 14.3, 14.0,
                 15.2, 14.9, 14.8, 15.1, 14.9, 14.6, 11.6, 10.2, 10.4, 10.5, 10.8, 10.4, 10.6, 10.7]
QWEN25_CURVE = [10.3, 10.3, 10.5, 11.3, 12.6, 12.1, 12.0, 12.2, 11.8, 11.3, 11.5, 11.7, 12.3, 12.1, 11.7, 11.2, 12.3,
                11.9, 11.6, 10.9, 11.0, 11.1, 11.5, 11.7]


def test_the_default_rule_on_the_measured_curves():
    """SmolLM2's deep, clear minimum keeps its window; Qwen's noise-level minimum no longer drags it to the end."""
    assert near_minimum(SMOLLM2_CURVE, SelectionParams(), 512) == (23, [23, 24, 25, 27, 28])  # SE = 10.2/sqrt(512)
    assert select_window(SMOLLM2_CURVE, SelectionParams(), 512) == (list(range(18, 28)), 23)  # anchor 25, capped
    assert select_window(SMOLLM2_CURVE, SelectionParams(end_margin=0), 512) == (list(range(20, 30)), 23)  # the old rule
    assert near_minimum(QWEN25_CURVE, SelectionParams(), 512) == (19, [9, 15, 19, 20, 21])  # mean 16.8 -> 17
    assert select_window(QWEN25_CURVE, SelectionParams(), 512) == (list(range(14, 22)), 19)
    # the old rule (the single lowest layer, window starting there) put Qwen's window at the last layer
    old_rule = SelectionParams(anchor="start", min_tolerance=0, end_margin=0)
    assert select_window(QWEN25_CURVE, old_rule, 512)[0] == list(range(16, 24))


def test_spread_and_warnings_on_the_measured_curves():
    """Qwen2.5's curve is flat by the spread rule, SmolLM2's is not; a window reaching the last 2 layers is flagged."""
    assert curve_spread(SMOLLM2_CURVE) == pytest.approx(0.39, abs=0.01)  # layers 6-29: (15.2 - 10.2) / 12.9
    assert curve_spread(QWEN25_CURVE) == pytest.approx(0.15, abs=0.01)  # layers 4-23: (12.6 - 10.9) / 11.7
    assert curve_spread(QWEN25_CURVE) < FLAT_SPREAD < curve_spread(SMOLLM2_CURVE)
    assert selection_warnings(SMOLLM2_CURVE, range(12, 22), 0.2) == []
    smollm2 = selection_warnings(SMOLLM2_CURVE, range(20, 30), 0.2)  # the default window ends at the last layer
    assert len(smollm2) == 2 and "reaches the last 2 layers (28-29" in smollm2[0] and "--layers" in smollm2[1]
    qwen = selection_warnings(QWEN25_CURVE, range(14, 22), 0.2)  # ends at 21 of 23: not at the end
    assert len(qwen) == 2 and qwen[0].startswith("the ID curve is flat (relative spread 0.14 < 0.2")  # rounded curve
    both = selection_warnings(QWEN25_CURVE, range(16, 24), 0.2)  # the old rule's window
    assert "flat" in both[0] and "reaches the last 2 layers (22-23" in both[1]
    assert selection_warnings(QWEN25_CURVE, range(20, 23), 0.2)[1].startswith("the window 20-22 reaches")  # 22 of 23


def test_min_tolerance_is_in_standard_errors_of_the_estimate():
    params = SelectionParams(skip_fraction=0.2, window=1)  # layers 0-1 are skipped
    curve = [5.0, 5.0, 10.0, 10.99, 11.01, 12.5, 10.7, 13.0, 13.0, 13.0]  # lowest 10.0; SE with 100 texts: 1.0
    assert near_minimum(curve, params, 100) == (2, [2, 3, 6])  # 10.99 is within one SE of 10.0, 11.01 is not
    assert near_minimum(curve, SelectionParams(skip_fraction=0.2, min_tolerance=2), 100)[1] == [2, 3, 4, 6]
    assert near_minimum(curve, params, 400)[1] == [2]  # 4x the texts, half the standard error
    assert near_minimum(curve, SelectionParams(skip_fraction=0.2, min_tolerance=0), 100)[1] == [2]
    assert select_window(curve, params, 100) == ([4], 2)  # mean of 2, 3, 6 = 3.67 -> 4
    with pytest.raises(ValueError, match="num_points"):
        near_minimum(curve, params, 0)


def test_centre_anchor():
    assert select_window(CURVE30, SelectionParams(window=5, anchor="center")) == ([21, 22, 23, 24, 25], 23)


def test_skipped_layers_never_hold_the_minimum():
    curve = [1.0, 2.0, 5.0, 4.0, 3.0, 6.0, 7.0, 8.0, 9.0, 9.5]
    assert select_window(curve, SelectionParams(skip_fraction=0.2, window=2)) == ([4, 5], 4)
    assert select_window(curve, SelectionParams(skip_fraction=0.0, window=2)) == ([0, 1], 0)


def test_minimum_at_the_last_layer():
    curve = [5.0, 4.0, 3.5, 3.0, 2.9, 2.8, 2.5, 2.0]
    assert select_window(curve, SelectionParams(window=3, end_margin=0)) == ([5, 6, 7], 7)
    assert select_window(curve, SelectionParams(window=3, anchor="start", end_margin=0)) == ([5, 6, 7], 7)
    assert select_window(curve, SelectionParams(window=3)) == ([3, 4, 5], 7)  # kept off the last two layers


def test_minimum_at_the_first_eligible_layer():
    curve = [1.0, 0.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert select_window(curve, SelectionParams(window=3, anchor="center")) == ([1, 2, 3], 2)


def test_flat_curve_is_centred_on_the_eligible_layers_and_is_flagged():
    flat = [12.0] * 10
    assert select_window(flat, SelectionParams(window=3), 512) == ([5, 6, 7], 2)  # layers 2-9 all minimal: mean 5.5
    assert select_window(flat, SelectionParams(window=3, anchor="start", end_margin=0)) == ([6, 7, 8], 2)
    assert select_window(flat, SelectionParams(window=3, anchor="start")) == ([5, 6, 7], 2)  # ends at 9 - 2
    assert is_flat(flat) and is_flat([12.0, 12.05, 11.98] * 3) and not is_flat(CURVE30)
    assert is_flat([1.0, 12.0, 13.0, 12.5, 12.2]) and not is_flat([1.0, 12.0, 13.0, 12.5, 12.2], skip_fraction=0.0)


def test_ties_are_all_the_minimum_and_argmin_is_the_earliest():
    curve = [9.0, 9.0, 3.0, 5.0, 3.0, 5.0, 3.0 + 1e-12, 8.0, 8.0, 8.0]
    assert near_minimum(curve, SelectionParams(), None) == (2, [2, 4, 6])
    assert select_window(curve, SelectionParams(window=1)) == ([4], 2)


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
@pytest.mark.parametrize("anchor", ["start", "center"])
def test_tiny_models_get_a_valid_window(num_layers, anchor):
    for argmin in range(num_layers):
        curve = [5.0] * num_layers
        curve[argmin] = 1.0
        layers, found = select_window(curve, SelectionParams(anchor=anchor, end_margin=0))
        assert layers == [found] and 0 <= found < num_layers  # a third of <= 4 layers is one layer
        capped, _ = select_window(curve, SelectionParams(anchor=anchor))
        assert capped == [min(found, max(0, num_layers - 3))]  # as far from the last two layers as the depth allows
        wide, _ = select_window(curve, SelectionParams(window=num_layers, anchor=anchor))
        assert wide == list(range(num_layers))


def test_window_wider_than_the_model_is_an_error():
    with pytest.raises(ValueError, match="window of 5 layers does not fit a base model with 4 layers"):
        select_window([1.0, 2.0, 3.0, 4.0], SelectionParams(window=5))


def test_non_finite_curve_is_an_error():
    with pytest.raises(ValueError, match=r"not finite at layers \[2\]"):
        select_window([1.0, 2.0, float("inf"), 3.0], SelectionParams())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(skip_fraction=1.0), "skip_fraction"),
        (dict(skip_fraction=-0.1), "skip_fraction"),
        (dict(window=0), "window must be a positive"),
        (dict(window=2.5), "window must be a positive"),
        (dict(window_fraction=0.0), "window_fraction"),
        (dict(anchor="end"), "anchor must be one of"),
        (dict(min_tolerance=-1.0), "min_tolerance"),
        (dict(min_tolerance=True), "min_tolerance"),
        (dict(min_tolerance=float("inf")), "min_tolerance"),
        (dict(end_margin=-1), "end_margin"),
        (dict(end_margin=1.5), "end_margin"),
        (dict(end_margin=True), "end_margin"),
    ],
)
def test_bad_selection_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectionParams(**kwargs)


# ------------------------------------------------------------------------------------ explicit specs
def test_explicit_layers():
    assert explicit_layers("20-29", 30) == list(range(20, 30))
    assert explicit_layers([5, 3], 30) == [3, 5]
    with pytest.raises(ValueError, match="is empty"):
        explicit_layers("", 30)
    with pytest.raises(ValueError, match="is empty"):
        explicit_layers([], 30)
    with pytest.raises(
        ValueError, match=r"layers \[30, 31\] in '28-31' are out of range .* 30 layers \(valid: 0..29\)"
    ):
        explicit_layers("28-31", 30)
    with pytest.raises(ValueError, match="cannot parse layer spec"):
        explicit_layers("twenty", 30)


@pytest.mark.parametrize("layers", [[0], [3, 5, 6, 7], list(range(20, 30)), [1, 3, 5], [2, 3, 9, 10, 11, 14]])
def test_format_layer_spec_round_trips(layers):
    assert parse_layer_spec(format_layer_spec(layers)) == layers


# ------------------------------------------------------------------------------------- calibration
def test_default_calibration_set():
    texts = load_calibration()
    assert len(texts) == len(set(texts)) == 512
    assert calibration_hash(texts) == "sha256:" + hashlib.sha256(DEFAULT_CALIBRATION_FILE.read_bytes()).hexdigest()
    assert load_calibration(limit=20) == texts[:20]


def test_calibration_from_file_and_list(tmp_path):
    texts = [f"sentence number {i}" for i in range(20)]
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(texts[:10]) + "\n\n  \n" + "\n".join(texts[10:]) + "\n", encoding="utf-8")
    assert load_calibration(path) == texts == load_calibration(str(path))
    assert load_calibration(texts) == texts
    with pytest.raises(ValueError, match="at position 3"):
        load_calibration(texts[:3] + [""] + texts[3:])
    with pytest.raises(ValueError, match="5 distinct text"):
        load_calibration(texts[:5] * 4)
    with pytest.raises(ValueError, match="does not exist"):
        load_calibration(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="calibration limit"):
        load_calibration(texts, limit=2)


# ------------------------------------------------------------------------------------ the ID curve
@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_backbone(tiny_llama)


def test_id_curve_equals_unbatched_reference(tiny):
    model, tokenizer = tiny
    texts = load_calibration(limit=16)
    curve = compute_id_curve(model, tokenizer, texts, PROMPTEOL_TEMPLATE, batch_size=7, progress=False)
    states = []
    with torch.no_grad():
        for text in texts:  # one text at a time: no padding, the final token is simply the last one
            ids = tokenizer(PROMPTEOL_TEMPLATE.replace("{text}", text), return_tensors="pt")
            hidden = model(**ids, output_hidden_states=True).hidden_states[1:]
            states.append(torch.stack([h[0, -1] for h in hidden]))
    reference = [twonn(layer) for layer in torch.stack(states, dim=1)]
    assert len(curve) == model.config.num_hidden_layers
    assert curve == pytest.approx(reference, rel=1e-4)
    again = compute_id_curve(model, tokenizer, texts, PROMPTEOL_TEMPLATE, batch_size=7, progress=False)
    assert again == curve  # deterministic


def test_curve_is_cached_per_calibration_set(tiny, tiny_llama, tmp_path, monkeypatch):
    model, tokenizer = tiny
    texts = load_calibration(limit=20)
    common = dict(
        base_model=tiny_llama, base_revision=None, template=PROMPTEOL_TEMPLATE, cache_dir=tmp_path, progress=False
    )
    first = select_layers(model, tokenizer, texts=texts, **common)
    assert first.mode == "auto" and len(first.id_curve) == 4 and first.layers == [min(first.anchor_layer, 1)]
    assert first.calibration_hash == calibration_hash(texts) and first.num_calibration_texts == 20

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cached ID curve should have been used")

    monkeypatch.setattr(layer_selection, "compute_id_curve", no_recompute)
    assert select_layers(model, tokenizer, texts=texts, **common) == first
    explicit = select_layers(model, tokenizer, texts=texts, layers="1-2", **common)
    assert explicit.layers == [1, 2] and explicit.mode == "explicit" and explicit.id_curve == first.id_curve
    with pytest.raises(AssertionError, match="cached"):
        select_layers(model, tokenizer, texts=texts[:-1], **common)  # another calibration set: another key
    with pytest.raises(ValueError, match="out of range"):
        select_layers(model, tokenizer, texts=texts, layers="3-4", **common)


def test_flat_curve_of_a_tiny_model_is_recorded(tiny, tiny_llama, tmp_path, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(layer_selection, "compute_id_curve", lambda *args, **kwargs: [7.0, 7.01, 7.0, 7.02])
    selection = select_layers(
        model, tokenizer, base_model=tiny_llama, base_revision=None, template=PROMPTEOL_TEMPLATE,
        texts=load_calibration(limit=16), cache_dir=tmp_path, use_cache=False,
    )  # fmt: skip
    assert selection.flat_curve and selection.near_minimum == [0, 1, 2, 3]  # one SE of 16 texts: 7 / 4
    assert selection.anchor_layer == 2  # mean 1.5, rounded up; the window ends two layers before the last one
    assert selection.layers == [1] and selection.window == [1, 1]
    assert not list(tmp_path.iterdir())  # use_cache=False writes nothing


def test_named_sets_join_by_name():
    joined = load_calibration("sts-b-train+sts-b-train-paragraphs")
    assert joined == list(dict.fromkeys(load_calibration("sts-b-train") + load_calibration("sts-b-train-paragraphs")))
    assert load_calibration("sts-b-train+sts-b-train-paragraphs", limit=20) == joined[:20]
    with pytest.raises(ValueError, match=r"\['news'\] are not named sets"):
        load_calibration("sts-b-train+news")
    with pytest.raises(ValueError, match="does not exist"):  # the lab's gensim set is no product name
        load_calibration("general")
