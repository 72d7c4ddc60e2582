"""Every loaded model has a name and revision that mteb keys its result cache on, and a full mteb ModelMeta.

Before, a folder loaded either way was ``no_model_name/no_revision_available`` in mteb, so its cache handed a
different model the earlier model's score. Budget: ~15 s (tiny random models, mteb's mock STS task).
"""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
from sentence_transformers import SentenceTransformer

import kvemb_st
from kvemb_st.benchmark.identity import (
    Source,
    assign_identity,
    content_revision,
    folder_source,
    mteb_model_meta,
    refresh_revision,
)
from kvemb_st.calibration import DEFAULT_CALIBRATION_FILE, calibration_hash, read_calibration_file
from kvemb_st.postprocessing import PostProcessing

mteb = pytest.importorskip("mteb")  # optional extra (`kvemb-st[mteb]`, in the test extra)
from mteb.mocks import MockSTSTask  # noqa: E402
from mteb.models import SentenceTransformerEncoderWrapper  # noqa: E402


def identity(model) -> tuple[str, str]:
    meta = SentenceTransformerEncoderWrapper(model).mteb_model_meta  # what mteb.evaluate wraps a model in
    return meta.name, meta.revision


def score(model, cache) -> float:
    return mteb.evaluate(model, MockSTSTask(), cache=cache, show_progress_bar=False).task_results[0].get_score()


def test_one_config_has_one_revision_through_every_loader(tiny_llama, tmp_path):
    built = kvemb_st.from_base(tiny_llama, layers="1-2")
    folder = tmp_path / "my-model"
    built.save(str(folder))
    name, revision = identity(built)
    assert name == f"kvemb-st/{os.path.basename(tiny_llama)}" and len(revision) == 12
    assert identity(kvemb_st.load(str(folder))) == ("my-model", revision)
    assert identity(SentenceTransformer(str(folder), trust_remote_code=True)) == ("my-model", revision)


def test_a_knob_at_its_default_does_not_change_the_revision_but_any_other_value_does(tiny_llama, tmp_path):
    """A folder written before a knob existed (its config lacks the key) keeps its revision, so results filed under
    it stay valid; setting the knob to anything else is another model."""
    folder = tmp_path / "model"
    kvemb_st.from_base(tiny_llama, layers="1-2").save(str(folder))
    revision = identity(kvemb_st.load(str(folder)))[1]
    config_path = folder / "kvemb_config.json"
    config = json.loads(config_path.read_text())
    for key in ("long_inputs", "chunk_weights", "chunk_combine"):  # knobs added after kvemb-st 0.1's first folders
        del config[key]
    config_path.write_text(json.dumps(config))
    assert identity(kvemb_st.load(str(folder)))[1] == revision
    config_path.write_text(json.dumps({**config, "chunk_weights": "tokens"}))
    assert identity(kvemb_st.load(str(folder)))[1] != revision


def test_changing_a_default_moves_no_existing_revision(tiny_llama, monkeypatch):
    """Results are filed under revisions, so a later default (prefix bias 1.0 instead of 3.0, say) must leave the
    revision of every folder written under the old one as it was, and still tell the two values apart."""
    from kvemb_st.config import KVEmbeddingConfig

    old, new = (kvemb_st.from_base(tiny_llama, layers="1-2", prefix_bias=bias) for bias in (3.0, 1.0))
    baseline = kvemb_st.from_base(tiny_llama, method="prompteol")  # never reads the bias: its revision ignores it
    models = (old, new, baseline)
    before = [identity(model)[1] for model in models]
    for default in (3.0, 1.0, 7.0):
        monkeypatch.setattr(KVEmbeddingConfig.__dataclass_fields__["prefix_bias"], "default", default)
        for model in models:
            refresh_revision(model)
        assert [identity(model)[1] for model in models] == before
        # a baseline built under that default (the dataclass's __init__ keeps its own, so pass it as a new one would)
        assert identity(kvemb_st.from_base(tiny_llama, method="prompteol", prefix_bias=default))[1] == before[2]
    assert before[0] != before[1]


def test_two_folders_of_one_name_never_share_a_cache_entry(tiny_llama, tmp_path):
    """Same folder name, other knobs: another revision, so mteb's cache cannot hand over the first score."""
    first, second = tmp_path / "a" / "model", tmp_path / "b" / "model"
    # two models whose mock-STS scores differ (the mock task has two pairs, so its Spearman is +1 or -1)
    kvemb_st.from_base(tiny_llama, layers="1-2", prefix_bias=3.0).save(str(first))
    kvemb_st.from_base(tiny_llama, method="mean").save(str(second))
    cache = mteb.ResultCache(cache_path=tmp_path / "cache")
    models = [kvemb_st.load(str(first)), kvemb_st.load(str(second))]
    assert identity(models[0])[0] == identity(models[1])[0] == "model"
    assert identity(models[0])[1] != identity(models[1])[1]
    cached = [score(m, cache) for m in models]
    fresh = score(models[1], None)
    assert math.isclose(cached[1], fresh) and not math.isclose(cached[0], cached[1])


def test_a_local_base_is_adapted_from_the_hub_id_its_card_names(tiny_llama, tmp_path):
    from huggingface_hub import metadata_save

    folder = tmp_path / "kv"
    kvemb_st.from_base(tiny_llama, layers="1-2").save(str(folder))
    assert mteb_model_meta(kvemb_st.load(str(folder))).adapted_from is None  # a local path is not a Hub id
    metadata_save(folder / "README.md", {"base_model": "org/base-llm"})  # as `kvemb build --base-model-id` writes
    assert mteb_model_meta(kvemb_st.load(str(folder))).adapted_from == "org/base-llm"


def test_a_hub_download_is_named_by_its_id_at_its_commit(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    resolved = os.path.join(str(tmp_path), "models--org--kv", "snapshots", commit, "kvemb_config.json")
    source = folder_source("org/kv", resolved)
    assert (source.name, source.hub_commit) == ("org/kv", commit)


def test_model_meta_carries_what_mteb_cannot_read_itself(tiny_llama):
    model = kvemb_st.from_base(tiny_llama, layers="1-2")
    before = identity(model)[1]
    with warnings.catch_warnings(record=True) as caught:  # mteb's own deprecation noise is silenced at the source
        warnings.simplefilter("always")
        meta = mteb_model_meta(model)
    assert [str(w.message) for w in caught] == []
    assert (meta.name, meta.revision) == identity(model)
    assert meta.embed_dim == 64 and meta.max_tokens == 512 and meta.similarity_fn_name.value == "cosine"
    assert meta.n_parameters == sum(p.numel() for p in model.parameters()) and meta.loader is not None
    assert meta.training_datasets == set()  # no calibration texts seen
    stsb_train = read_calibration_file(DEFAULT_CALIBRATION_FILE)
    record = {"name": "sts-b-train", "hash": calibration_hash(stsb_train), "count": len(stsb_train)}
    model.append(PostProcessing("center", 64, calibration=record))
    refresh_revision(model)
    meta = mteb_model_meta(model)
    assert meta.training_datasets == {"STSBenchmark"}  # STS-B train: not zero-shot on mteb's STSBenchmark
    assert meta.revision != before  # another pipeline, another revision
    assert not meta.is_zero_shot_on([mteb.get_task("STSBenchmark")])


def test_a_card_without_a_metadata_header_names_no_base(tmp_path):
    """A hand-written README.md (no YAML header) must not stop a folder from loading: it just names no base."""
    folder = tmp_path / "kv"
    folder.mkdir()
    (folder / "README.md").write_text("# My model\n\nNotes, no metadata.\n", encoding="utf-8")
    source = folder_source(str(folder), None)
    assert (source.name, source.hub_commit, source.card_base_model) == ("kv", None, None)


def test_side_statistics_fitted_on_stsb_train_are_not_zero_shot_on_it(tiny_llama):
    """The calibration records of a Router's routes count as training data like a plain PostProcessing's."""
    from kvemb_st.side_router import side_router

    stsb_train = read_calibration_file(DEFAULT_CALIBRATION_FILE)
    record = {"name": "my calibration", "hash": calibration_hash(stsb_train), "count": len(stsb_train)}
    for default, document in ((record, None), (None, record)):  # the STS-B set on either route
        model = kvemb_st.from_base(tiny_llama, layers="1-2", sides={"document": {"pooling": "mean"}})
        routes = {"document": PostProcessing("center", 64, calibration=document)}
        model.append(side_router(PostProcessing("center", 64, calibration=default), routes, {"document": "document"}))
        assert mteb_model_meta(model).training_datasets == {"STSBenchmark"}


def test_a_model_changed_in_memory_after_loading_is_never_filed_under_its_old_revision(tiny_llama, tmp_path):
    """A knob changed after loading makes other vectors: the meta handed to mteb names the model as it is now, so
    mteb's cache (which keeps the first score of a revision) cannot hand it the old model's score."""
    folder = tmp_path / "kv"
    kvemb_st.from_base(tiny_llama, layers="1-2").save(str(folder))
    model = kvemb_st.load(str(folder))
    cache = mteb.ResultCache(cache_path=tmp_path / "cache")
    loaded = identity(model)[1]
    first = mteb.evaluate(kvemb_st.mteb_model(model), MockSTSTask(), cache=cache, show_progress_bar=False)
    model.max_seq_length = 12  # the template is 9 tokens: the mock task's sentences are cut, another model
    wrapped = kvemb_st.mteb_model(model)
    assert wrapped.mteb_model_meta.revision not in (loaded, None)
    second = mteb.evaluate(wrapped, MockSTSTask(), cache=cache, show_progress_bar=False)
    filed = sorted(path.parent.name for path in (tmp_path / "cache").rglob("MockSTSTask.json"))
    assert filed == sorted([loaded, wrapped.mteb_model_meta.revision])  # computed and filed apart, not handed over
    assert second.model_revision == wrapped.mteb_model_meta.revision and first.model_revision == loaded
    model.max_seq_length = 512
    assert kvemb_st.mteb_model(model).mteb_model_meta.revision == loaded  # the same content, the same revision


def test_a_hub_commit_names_the_model_only_while_it_holds_what_was_downloaded(tiny_llama):
    commit = "0123456789abcdef0123456789abcdef01234567"
    model = kvemb_st.from_base(tiny_llama, layers="1-2")
    assign_identity(model, Source("org/kv", commit), None)  # as loading a Hub snapshot does
    assert mteb_model_meta(model).revision == commit
    model[0].config.prefix_bias = 9.0
    assert mteb_model_meta(model).revision not in (commit, None)


def test_mteb_model_hands_mteb_the_full_meta(tiny_llama):
    """A bare SentenceTransformer gives mteb no parameter count and no training data; ``kvemb_st.mteb_model`` does."""
    model = kvemb_st.from_base(tiny_llama, layers="1-2")
    model.append(PostProcessing("center", 64, calibration={"name": "sts-b-train", "hash": "x", "count": 1}))
    bare, full = SentenceTransformerEncoderWrapper(model).mteb_model_meta, kvemb_st.mteb_model(model).mteb_model_meta
    assert (bare.n_parameters, bare.training_datasets) == (None, None)
    assert full.n_parameters == sum(p.numel() for p in model.parameters())
    assert full.training_datasets == {"STSBenchmark"}
    assert (full.name, full.revision) == (bare.name, content_revision(model))
    result = mteb.evaluate(kvemb_st.mteb_model(model), MockSTSTask(), cache=None, show_progress_bar=False)
    assert (result.model_name, result.model_revision) == (full.name, full.revision)  # what mteb files it under
