"""``kvemb build`` end to end: folder contents, loading, the model card, Hub upload (to a recorder), errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import HfApi
from safetensors.numpy import load_file
from sentence_transformers import SentenceTransformer

import kvemb_st
from kvemb_st import layer_selection
from kvemb_st.build import DOCUMENT_READOUT, build
from kvemb_st.calibration import calibration_hash, load_calibration
from kvemb_st.cli import main
from kvemb_st.layer_spec import format_layer_spec
from kvemb_st.postprocessing_fit import fit_postprocessing
from kvemb_st.side_router import route_of
from kvemb_st.window_rule import SelectionParams, curve_spread, mean_position

from kvemb_lab.assets import smollm2_folder

EXPECTED_FILES = {"modules.json", "config_sentence_transformers.json", "kvemb_config.json", "id_curve.png", "README.md"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".onnx")
# a default build's post-processing: ST's Router, one statistics module per route (plain encode / the sides)
ROUTES = ("default_0_PostProcessing", "document_0_PostProcessing")
DEFAULT_STATISTICS = f"1_Router/{ROUTES[0]}"
SENTENCES = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply."]


def read_card(folder) -> tuple[dict, str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory):
    """One CLI build of the tiny model with explicit knobs, evaluation results and a recorded Hub push."""
    root = tmp_path_factory.mktemp("build")
    (root / "eval.json").write_text(json.dumps({"STS-B dev Spearman": 0.5123, "pairs": 1500}), encoding="utf-8")
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, "token": self.token, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path, **kwargs):
        files = sorted(os.listdir(folder_path))  # what upload_folder would send: the folder, recursively flat here
        calls.append(("upload_folder", {"files": files, **kwargs}))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HfApi, "create_repo", create_repo)
        patch.setattr(HfApi, "upload_folder", upload_folder)
        argv = [
            "build", tiny_llama, "-o", str(root / "model"), "--calibration-limit", "32",
            "--cache-dir", str(root / "cache"),
            "--prefix-bias", "3.5", "--prefix-rope", "keep", "--pooling", "mean+last", "--last-weight", "0.25",
            "--max-seq-length", "64", "--query-template", 'Query : "{text}" means in one word:"',
            "--eval-results", str(root / "eval.json"), "--push-to-hub", "someone/kvemb-tiny", "--private",
            "--token", "hf_SECRET", "--quiet",
        ]  # fmt: skip
        status = main(argv)
    return status, root / "model", calls, tiny_llama


def test_cli_build_writes_a_weight_free_folder(built, capsys):
    status, folder, _, _ = built
    assert status == 0
    assert {p.name for p in folder.iterdir()} == EXPECTED_FILES | {"1_Router"}  # default: whitening, per side
    assert (folder / "id_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((folder / "kvemb_config.json").read_text())
    selection = config["layer_selection"]
    assert config["layers"] == selection["layers"] and selection["mode"] == "auto"
    assert len(selection["id_curve"]) == 4 and selection["num_calibration_texts"] == 32
    assert selection["calibration_hash"].startswith("sha256:") and selection["window"] == [config["layers"][0]] * 2
    near, curve = selection["near_minimum"], selection["id_curve"]
    assert selection["argmin"] in near and mean_position(near) == selection["anchor_layer"]
    assert config["layers"] == [min(selection["anchor_layer"], 1)]  # 4 layers: ends 2 layers before the last
    assert selection["params"]["end_margin"] == 2
    assert all(curve[i] <= curve[selection["argmin"]] * (1 + 1 / 32**0.5) + 1e-9 for i in near)  # one SE of 32 texts
    card = (folder / "README.md").read_text()
    expected = f"the minimum is at layer {selection['argmin']}"
    if len(near) > 1:
        expected += f"; layers {format_layer_spec(near)} are within 1 standard error(s) of it"
    assert expected in card, card
    assert "shifted to fit inside the model and to end at least 2 layers before the last" in card
    post = json.loads((folder / DEFAULT_STATISTICS / "config.json").read_text())
    assert (post["mode"], post["components"]) == ("whiten", None)  # the default: whitened on the same 32 texts
    assert post["calibration"]["hash"] == selection["calibration_hash"] and post["calibration"]["count"] == 32
    assert (config["prefix_bias"], config["prefix_rope"], config["pooling"]) == (3.5, "keep", "mean+last")
    assert (config["last_weight"], config["max_seq_length"]) == (0.25, 64)


@pytest.mark.parametrize(
    "curve,extra,warned",
    [
        ([5.0, 9.0, 12.0, 14.0], [], []),  # minimum at layer 0, steep: window [0], nothing to check
        ([14.0, 12.0, 9.0, 5.0], [], []),  # a late minimum: the window is kept off the last two layers, [1]
        ([14.0, 12.0, 9.0, 5.0], ["--end-margin", "0"], ["reaches the last 2 layers"]),  # allowed there: [3]
        ([7.0, 7.3, 7.5, 7.6], ["--min-tolerance", "0"], ["the ID curve is flat (relative spread 0.08"]),
        ([7.0, 7.3, 7.5, 7.0], ["--end-margin", "0"], ["the ID curve is flat", "reaches the last 2 layers"]),
    ],
    ids=["clear", "late-capped", "late", "flat", "flat-and-late"],
)
def test_cli_build_prints_the_spread_and_warns(tiny_llama, tmp_path, capsys, caplog, monkeypatch, curve, extra, warned):
    """Synthetic ID curves (the tiny model's forward passes are stood in for) through the real CLI."""
    monkeypatch.setattr(layer_selection, "compute_id_curve", lambda *args, **kwargs: curve)
    argv = ["build", tiny_llama, "-o", str(tmp_path / "m"), "--calibration-limit", "32", "--postprocess", "none"]
    assert main([*argv, "--no-cache", "--quiet", *extra]) == 0
    spread = curve_spread(curve)
    printed = f"ID curve spread: {spread:.2f} ((max - min) / mean past the skipped layers; below 0.2 counts as flat)"
    assert printed in capsys.readouterr().out
    logged = [r.getMessage() for r in caplog.records if r.name == layer_selection.__name__ and r.levelname == "WARNING"]
    saved = json.loads((tmp_path / "m" / "kvemb_config.json").read_text())["layer_selection"]
    assert saved["spread"] == pytest.approx(spread) and saved["flat_curve"] == any("flat" in w for w in warned)
    assert saved["window"][1] <= (3 if "--end-margin" in extra else 1)  # by default 2 layers short of layer 3
    if not warned:
        assert logged == [] and saved["warnings"] == []
        return
    assert len(logged) == 1 and all(w in logged[0] for w in warned) and "--layers START-END" in logged[0]
    assert len(saved["warnings"]) == len(warned) + 1 and "**Note:** the" in (tmp_path / "m" / "README.md").read_text()


def test_folder_loads_with_sentence_transformers_and_kvemb_load(built):
    _, folder, _, _ = built
    remote = SentenceTransformer(str(folder), trust_remote_code=True)
    safe = kvemb_st.load(str(folder))
    assert (
        remote[0].config.layers
        == safe[0].config.layers
        == json.loads((folder / "kvemb_config.json").read_text())["layers"]
    )
    assert remote.prompts["query"] == "<kvemb-side:query>"  # the side's name tag; the template is in the config
    torch.testing.assert_close(
        remote.encode(SENTENCES, convert_to_tensor=True), safe.encode(SENTENCES, convert_to_tensor=True)
    )


def test_model_card_has_hub_metadata_and_the_build(built):
    _, folder, _, _ = built
    metadata, body = read_card(folder)
    assert metadata["library_name"] == "sentence-transformers"
    assert metadata["pipeline_tag"] == "sentence-similarity"
    assert {"sentence-transformers", "kv-embedding"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # a local path is not a Hub id
    layers = json.loads((folder / "kvemb_config.json").read_text())["layers"]
    assert f"| Re-routed layers | {layers[0]} (4-layer model) |" in body
    assert "kvemb build " in body and "--prefix-bias 3.5" in body and "hf_SECRET" not in body
    assert "| STS-B dev Spearman | 0.5123 |" in body and "| pairs | 1500 |" in body
    assert 'SentenceTransformer("someone/kvemb-tiny", trust_remote_code=True)' in body
    assert "kvemb_st.load(" in body and "arXiv 2601.01046" in body and "eprint        = {2601.01046}" in body
    assert "![Intrinsic dimension per layer" in body
    assert 'kvemb_st.load("someone/kvemb-tiny", base_model="<Hub id or path>")' in body  # the base is a local path


def test_push_uploads_the_folder_and_no_weights(built):
    _, _, calls, _ = built
    assert [name for name, _ in calls] == ["create_repo", "upload_folder"]
    repo = calls[0][1]
    assert (repo["repo_id"], repo["repo_type"], repo["private"], repo["exist_ok"]) == (
        "someone/kvemb-tiny",
        "model",
        True,
        True,
    )
    assert repo["token"] == "hf_SECRET"
    upload = calls[1][1]
    assert upload["repo_id"] == "someone/kvemb-tiny" and upload["repo_type"] == "model"
    assert set(upload["files"]) == EXPECTED_FILES | {"1_Router"}
    assert not [f for f in upload["files"] if f.endswith(WEIGHT_SUFFIXES)]


def test_python_build_with_explicit_layers(built, tmp_path):
    _, _, _, tiny_llama = built
    texts = [f"calibration sentence {i} about topic {i % 5}" for i in range(20)]
    result = build(tiny_llama, tmp_path / "m", layers="1-2", calibration=texts, cache_dir=tmp_path, progress=False)
    assert result.selection.layers == [1, 2] and result.selection.mode == "explicit"
    reloaded = kvemb_st.load(str(tmp_path / "m"))
    assert reloaded[0].config.layers == [1, 2]
    torch.testing.assert_close(result.model.encode(SENTENCES), reloaded.encode(SENTENCES))
    metadata, body = read_card(tmp_path / "m")
    assert metadata["library_name"] == "sentence-transformers"
    assert "build(" in body and "layers='1-2'" in body and "calibration='<list of 20 texts>'" in body
    assert "given explicitly" in body


def test_build_with_postprocessing_saves_its_statistics_and_describes_them(built, tmp_path, capsys):
    _, _, _, tiny_llama = built
    argv = ["build", tiny_llama, "-o", str(tmp_path / "m"), "--layers", "1-2", "--calibration-limit", "32",
            "--postprocess", "whiten", "--components", "12", "--cache-dir", str(tmp_path / "c"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "post-processing: whiten, 12 dimensions" in capsys.readouterr().out
    folder = tmp_path / "m"
    assert {p.name for p in folder.iterdir()} == EXPECTED_FILES | {"1_Router"}
    assert {p.name for p in (folder / "1_Router").iterdir()} == {"router_config.json", *ROUTES}
    for route in ROUTES:
        assert {p.name for p in (folder / "1_Router" / route).iterdir()} == {"config.json", "statistics.safetensors"}
        stats = load_file(folder / "1_Router" / route / "statistics.safetensors")
        assert {name: tuple(value.shape) for name, value in stats.items()} == {"mean": (64,), "projection": (64, 12)}
    config = json.loads((folder / DEFAULT_STATISTICS / "config.json").read_text())
    calibration = config["calibration"]
    assert (config["mode"], config["in_features"], config["components"]) == ("whiten", 64, 12)
    assert calibration["count"] == 32 and "calibration.txt" in calibration["name"]
    selection = json.loads((folder / "kvemb_config.json").read_text())["layer_selection"]
    assert calibration["hash"] == selection["calibration_hash"]
    _, body = read_card(folder)
    assert "| Embedding dimension | 12 |" in body and "| Post-processing | whiten (see below) |" in body
    assert "Each route's `1_Router/<route>/statistics.safetensors` (`1_Router/router_config.json` maps sides to " \
        "routes) holds float32 tensors `mean` (64,), `projection` (64, 12)" in body
    assert f"on 32 calibration texts ({calibration['name']}, `{calibration['hash']}`)" in body
    assert "**12 dimensions** (reduced from 64)" in body and "no weights of the base model" in body
    for loaded in (SentenceTransformer(str(folder), trust_remote_code=True), kvemb_st.load(str(folder))):
        assert loaded.encode(SENTENCES).shape == (3, 12)


def test_postprocessing_is_fitted_on_the_calibration_texts_or_its_own_set(built, tmp_path):
    _, _, _, tiny_llama = built
    mine = [f"my domain text number {i}" for i in range(20)]
    own = build(tiny_llama, tmp_path / "o", layers="1-2", calibration=mine, cache_dir=tmp_path, progress=False)
    assert route_of(own.model[1], None).calibration["hash"] == calibration_hash(mine) == own.selection.calibration_hash
    joined = build(tiny_llama, tmp_path / "j", layers="1-2", postprocess="center", cache_dir=tmp_path,
                   postprocess_calibration="sts-b-train+sts-b-train-paragraphs", progress=False)  # fmt: skip
    record, texts = route_of(joined.model[1], None).calibration, load_calibration("sts-b-train+sts-b-train-paragraphs")
    assert record["count"] == len(texts) == len(set(texts)) and record["hash"] == calibration_hash(texts)
    assert "calibration.txt + calibration_paragraphs.txt" in record["name"]
    assert joined.selection.calibration_hash == calibration_hash(load_calibration())  # layers: the default set
    paragraphs = build(tiny_llama, tmp_path / "g", layers="1-2", postprocess_calibration="sts-b-train-paragraphs",
                       calibration_limit=32, cache_dir=tmp_path, progress=False)  # fmt: skip
    assert route_of(paragraphs.model[1], None).calibration["hash"] == calibration_hash(
        load_calibration("sts-b-train-paragraphs", 32))


def test_card_without_postprocessing_says_so(built, tmp_path):
    _, _, _, tiny_llama = built
    argv = ["build", tiny_llama, "-o", str(tmp_path / "m"), "--layers", "1-2", "--calibration-limit", "16",
            "--postprocess", "none", "--cache-dir", str(tmp_path / "c"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert {p.name for p in (tmp_path / "m").iterdir()} == EXPECTED_FILES
    _, body = read_card(tmp_path / "m")
    assert "| Post-processing | none |" in body and "configuration only -- no weights" in body


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--postprocess", "remove_pcs"], "needs components"),
        (["--postprocess", "none", "--components", "4"], "pass postprocess (--postprocess) too"),
        (["--postprocess", "none", "--postprocess-calibration", "general"], "pass postprocess (--postprocess) too"),
        (["--postprocess", "center", "--postprocess-calibration", "general+news"], "not named sets"),
        (["--postprocess", "whiten", "--components", "65"], "components must be at most 64"),
        (["--postprocess", "whiten", "--eigenvalue-floor", "2"], "eigenvalue_floor"),
        (["--layers", "2-5"], "out of range for a base model with 4 layers"),
        (["--layers", ""], "is empty"),
        (["--window", "9"], "window of 9 layers does not fit"),
        (["--prefix-rope", "keep", "--template", "no placeholder"], "placeholder"),
    ],
)
def test_bad_selection_fails_cleanly_without_output(built, tmp_path, capsys, extra, message):
    _, _, _, tiny_llama = built
    status = main(["build", tiny_llama, "-o", str(tmp_path / "out"), "--calibration-limit", "16", "--quiet", *extra])
    assert status == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("kvemb build: error: ") and message in last_line
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_a_non_empty_folder(built, tmp_path, capsys):
    _, _, _, tiny_llama = built
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["build", tiny_llama, "-o", str(tmp_path), "--quiet"]) == 1
    assert "not empty" in capsys.readouterr().err and (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_smollm2_build_offline_prints_its_layers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["build", str(smollm2_folder()), "-o", str(tmp_path / "smollm2"), "--local-files-only",
            "--calibration-limit", "16", "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    print(out)
    line = next(line for line in out.splitlines() if line.startswith("selected layers: "))
    layers = kvemb_st.layer_spec.parse_layer_spec(line.split()[2])
    assert len(layers) == SelectionParams().width(30) and layers[-1] <= 29
    selection = json.loads((tmp_path / "smollm2" / "kvemb_config.json").read_text())["layer_selection"]
    assert len(selection["id_curve"]) == 30
    assert min(selection["near_minimum"]) >= 6 and selection["anchor_layer"] in layers  # minima past the skipped 20%
    routes = tmp_path / "smollm2" / "1_Router"  # the default whitening: one fit for encode, one for the sides
    assert all((routes / route / "statistics.safetensors").is_file() for route in ROUTES)


TEXTS = ["A man plays a guitar on the street.", "Rates rose again this quarter.", "Cats sleep most of the day."]


def test_document_side_flags_and_the_shared_whitening_over_both_sides(tiny_llama, tmp_path):
    """--document-* flags make the side; the whitening is fitted on the sentences through ``encode`` and the
    document calibration texts through ``encode_document``, together."""
    argv = ["build", tiny_llama, "-o", str(tmp_path / "m"), "--layers", "1-2", "--calibration-limit", "16",
            "--cache-dir", str(tmp_path), "--quiet", "--document-template", 'Passage: "{text}" in one word:"',
            "--document-pooling", "mean", "--document-pool-layers", "1", "--document-pool-span", "text",
            "--document-calibration", "sts-b-train-paragraphs", "--document-whitening", "shared",
            "--query-side", "default"]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((tmp_path / "m" / "kvemb_config.json").read_text())
    assert config["sides"] == {"document": {"template": 'Passage: "{text}" in one word:"', "pooling": "mean",
                                            "last_weight": 0.5, "pool_layers": [1], "pool_span": "text"}}  # fmt: skip
    loaded = kvemb_st.load(str(tmp_path / "m"))
    record = loaded[1].calibration
    sentences, paragraphs = load_calibration(None, 16), load_calibration("sts-b-train-paragraphs", 16)
    assert record["count"] == 16 and record["document"]["count"] == 16
    assert record["document"]["hash"] == calibration_hash(paragraphs)
    bare = kvemb_st.from_base(tiny_llama, "1-2", sides=config["sides"])
    both = np.concatenate([bare.encode(sentences), bare.encode_document(paragraphs)])
    expected = fit_postprocessing(both, "whiten").transform(bare.encode_document(TEXTS))
    np.testing.assert_allclose(loaded.encode_document(TEXTS), expected, atol=2e-5)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "`encode_document` side" in card and "embedded by `encode_document`" in card
    # without a document side, no document texts join the fit
    assert main(["build", tiny_llama, "-o", str(tmp_path / "n"), "--layers", "1-2", "--calibration-limit", "16",
                 "--cache-dir", str(tmp_path), "--quiet", "--no-document-side"]) == 0  # fmt: skip
    plain = kvemb_st.load(str(tmp_path / "n"))
    assert json.loads((tmp_path / "n" / "kvemb_config.json").read_text())["sides"] == {}
    assert "document" not in plain[1].calibration


def test_default_build_reads_queries_like_documents_with_their_own_whitening(tiny_llama, tmp_path):
    """The default sides: encode_query and encode_document read out the document side and go through statistics
    fitted on the calibration sentences embedded by that side; encode keeps the top-level side and its own fit."""
    argv = ["build", tiny_llama, "-o", str(tmp_path / "m"), "--layers", "1-2", "--calibration-limit", "16",
            "--cache-dir", str(tmp_path), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((tmp_path / "m" / "kvemb_config.json").read_text())
    assert config["sides"] == {"query": DOCUMENT_READOUT, "document": DOCUMENT_READOUT}
    sentences = load_calibration(None, 16)
    bare = kvemb_st.from_base(tiny_llama, "1-2", sides=config["sides"])
    default = fit_postprocessing(bare.encode(sentences), "whiten").transform(bare.encode(TEXTS))
    documents = fit_postprocessing(bare.encode_document(sentences), "whiten").transform(bare.encode_document(TEXTS))
    assert not np.allclose(default, documents, atol=1e-3)  # the sides really differ
    for loaded in (kvemb_st.load(str(tmp_path / "m")), SentenceTransformer(str(tmp_path / "m"), trust_remote_code=True)):
        router = loaded[1]  # one PostProcessing per statistics set, routed by side (ST's task)
        assert route_of(router, "query") is route_of(router, "document") is not route_of(router, None)
        np.testing.assert_allclose(loaded.encode(TEXTS), default, atol=2e-5)
        np.testing.assert_allclose(loaded.encode_document(TEXTS), documents, atol=2e-5)
        np.testing.assert_allclose(loaded.encode_query(TEXTS), documents, atol=2e-5)
        np.testing.assert_allclose(loaded.encode(TEXTS, prompt_name="document"), documents, atol=2e-5)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "`encode_document` and `encode_query` use statistics of their own" in card
