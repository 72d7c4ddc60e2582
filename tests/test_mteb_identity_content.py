"""The content revision mteb keys its cache on changes with everything that changes the vectors: a side's knobs,
the statistics of each post-processing route, and a module appended by ``add_postprocessing``. Budget: ~3 s."""

from __future__ import annotations

import torch

import kvemb_st
from kvemb_st.benchmark.identity import content_revision
from kvemb_st.postprocessing import PostProcessing
from kvemb_st.side_router import side_router

SIDES = {"query": {"pooling": "mean"}, "document": {"pooling": "mean+last", "last_weight": 0.5}}


def revision(model) -> str:
    return model.model_card_data.base_model_revision  # what mteb reads as the revision


def test_a_side_knob_changes_the_revision(tiny_llama):
    revisions = {
        revision(kvemb_st.from_base(tiny_llama, layers="1-2", sides=sides))
        for sides in (SIDES, {**SIDES, "document": {**SIDES["document"], "last_weight": 0.25}}, {"query": SIDES["query"]})
    }
    assert len(revisions) == 3
    assert revision(kvemb_st.from_base(tiny_llama, layers="1-2", sides=SIDES)) in revisions  # and is reproducible


def _centre(value: float) -> PostProcessing:
    return PostProcessing("center", 64, mean=torch.full((64,), value))


def test_each_routes_statistics_change_the_revision(tiny_llama):
    model = kvemb_st.from_base(tiny_llama, layers="1-2", sides=SIDES)
    revisions = []
    for default, document in ((0.0, 1.0), (0.0, 2.0), (3.0, 1.0)):
        routed = side_router(_centre(default), {"document": _centre(document)}, {"query": "document", "document": "document"})
        revisions.append(content_revision([*model, routed]))
    assert len(set(revisions)) == 3, revisions
    same = side_router(_centre(0.0), {"document": _centre(1.0)}, {"query": "document", "document": "document"})
    assert content_revision([*model, same]) == revisions[0]


def test_add_postprocessing_gives_the_revision_the_saved_folder_loads_with(tiny_llama, tmp_path):
    model = kvemb_st.from_base(tiny_llama, layers="1-2")
    before = revision(model)
    kvemb_st.add_postprocessing(model, [f"Calibration sentence {i} is about {w}." for i, w in enumerate("abcdef")], "center")
    assert revision(model) != before
    model.save(str(tmp_path / "kv"))
    assert revision(kvemb_st.load(str(tmp_path / "kv"))) == revision(model)
