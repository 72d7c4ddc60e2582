"""Unsupported bases, bad layer lists and untrusted configs fail at load with messages naming the culprit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import BertConfig, Gemma3TextConfig, GPT2Config, T5Config

import kvemb_st
from kvemb_st.backbone import UnsupportedArchitectureError
from kvemb_st.config import ConfigError, KVEmbeddingConfig


@pytest.mark.parametrize(
    "config,model_type",
    [(GPT2Config(n_layer=2, n_embd=32, n_head=2), "gpt2"), (BertConfig(num_hidden_layers=2), "bert"), (T5Config(num_layers=2), "t5")],
)
def test_unsupported_architecture_is_named_with_the_supported_list(tmp_path, config, model_type):
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=rf"'{model_type}'.*supported model types: llama, mistral, qwen2, qwen3, gemma3_text"):
        kvemb_st.from_base(str(tmp_path), layers=[0])


def test_bidirectional_gemma3_is_refused(tmp_path):
    """EmbeddingGemma-style configs (``use_bidirectional_attention``) are not causal decoders."""
    Gemma3TextConfig(num_hidden_layers=2, use_bidirectional_attention=True).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="bidirectional attention.*needs a causal decoder"):
        kvemb_st.from_base(str(tmp_path), layers=[0])


@pytest.fixture()
def saved(tiny_llama, tmp_path) -> Path:
    kvemb_st.from_base(tiny_llama, layers=[1, 2]).save(str(tmp_path))
    return tmp_path


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "kvemb_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "layers,message",
    [
        ([1, 9], r"key 'layers': \[9\] out of range for base model .* with 4 layers \(valid: 0..3\)"),
        ([1, 1], r"key 'layers': duplicate layer indices \[1\]"),
        ([-1], r"key 'layers' must be >= 0"),
        (["a"], r"key 'layers': layers must be integers"),
        ("2-1", r"key 'layers': layer range '2-1' .* is reversed"),
    ],
)
def test_bad_layers_in_saved_config_name_file_and_key(saved, layers, message):
    _edit_config(saved, layers=layers)
    with pytest.raises(ConfigError, match=r"kvemb_config\.json: " + message):
        kvemb_st.load(str(saved))


def test_empty_layers_for_kv_method_is_an_error(saved):
    _edit_config(saved, layers=[])
    with pytest.raises(ConfigError, match=r"kvemb_config\.json: key 'layers' is empty"):
        kvemb_st.load(str(saved))


@pytest.mark.parametrize("key", ["trust_remote_code", "auto_map", "prefix_biass"])
def test_unknown_keys_are_rejected_and_remote_code_never_enabled(saved, key):
    _edit_config(saved, **{key: True})
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) \['{key}'\]"):
        kvemb_st.load(str(saved))


def test_remote_code_in_the_base_models_config_is_never_run(tiny_llama, tmp_path):
    """A base whose config.json asks for custom code is loaded with transformers' native class, the code ignored."""
    base = tmp_path / "base"
    for item in Path(tiny_llama).iterdir():
        (base / item.name).parent.mkdir(exist_ok=True)
        (base / item.name).write_bytes(item.read_bytes())
    marker = tmp_path / "pwned"
    (base / "evil_modeling.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil_modeling.EvilModel", "AutoConfig": "evil_modeling.EvilConfig"}
    config["trust_remote_code"] = True
    (base / "config.json").write_text(json.dumps(config))
    model = kvemb_st.from_base(str(base), layers=[1])
    assert model.encode(["hello"]).shape == (1, 64)
    assert not marker.exists()
    with pytest.raises(ValueError, match="model_kwargs may not set 'trust_remote_code'"):
        kvemb_st.from_base(str(base), layers=[1], model_kwargs={"trust_remote_code": True})


@pytest.mark.parametrize("base", ["/etc", "../../elsewhere/model", "C:\\\\models\\\\x", "a/b/c", "/tmp/x.gguf"])
def test_downloaded_config_may_not_point_the_base_at_a_local_path(saved, tmp_path, base, monkeypatch):
    """Simulate a Hub download by loading the folder through a repo id whose files resolve to it."""
    from kvemb_st import module as module_file

    _edit_config(saved, base_model=base)
    monkeypatch.setattr(module_file.os.path, "isdir", lambda path: False)  # "not a local folder": as from the Hub
    with pytest.raises(ConfigError, match=r"key 'base_model' is .* a local path, but this config was downloaded"):
        module_file.KVEmbedding.load(str(saved))


def test_downloaded_configs_hub_base_is_not_shadowed_by_a_local_folder(saved, tiny_llama, tmp_path, monkeypatch):
    """A folder named like the Hub id under the working directory would win in transformers' lookup."""
    from kvemb_st import module as module_file

    _edit_config(saved, base_model="some-org/base-model")
    (tmp_path / "some-org" / "base-model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    real_isdir = os.path.isdir
    monkeypatch.setattr(module_file.os.path, "isdir", lambda path: False if path == str(saved) else real_isdir(path))
    with pytest.raises(ConfigError, match=r"Hub id 'some-org/base-model', but a folder of that name exists"):
        module_file.KVEmbedding.load(str(saved))
    model = module_file.KVEmbedding.load(str(saved), base_model=tiny_llama)  # the explicit override still works
    assert model.config.base_model == tiny_llama


def test_base_model_override_replaces_the_configs_base(saved, tiny_llama):
    _edit_config(saved, base_model="/nonexistent/base")
    model = kvemb_st.load(str(saved), base_model=tiny_llama)
    assert model.encode(["x"]).shape == (1, 64)


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"prefix_rope": "sideways"}, "prefix_rope"),
        ({"pooling": "max"}, "pooling"),
        ({"prefix_bias": float("nan")}, "prefix_bias"),
        ({"last_weight": 2.0}, "last_weight"),
        ({"template": "no placeholder"}, "template"),
        ({"max_seq_length": 0}, "max_seq_length"),
    ],
)
def test_invalid_knob_values_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        KVEmbeddingConfig.from_dict({"base_model": "org/x", "layers": [1], **changes}, source="cfg.json")
