"""Every file a saved folder loads, damaged in each way a download or a disk can damage it, fails at load with an
error naming the file, what is wrong and what to do -- never a model that returns NaN or garbage vectors."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer

import kvemb_st
from kvemb_st.folder import REMEDY
from kvemb_st.postprocessing import STATISTICS_FILE

STATISTICS = f"1_PostProcessing/{STATISTICS_FILE}"
TEXTS = [f"Calibration sentence number {i} about {topic}." for i, topic in enumerate(["cats", "rain", "stocks", "tea"] * 4)]


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory) -> Path:
    """A default-style folder: KV-Embedding + whitening statistics."""
    folder = tmp_path_factory.mktemp("built")
    model = kvemb_st.from_base(tiny_llama, layers=[1, 2])
    kvemb_st.add_postprocessing(model, TEXTS, "whiten", components=8)
    model.save(str(folder))
    assert (folder / STATISTICS).is_file()
    return folder


@pytest.fixture
def folder(built, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(built, copy)
    return copy


def _edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)

    return damage


def _set(name: str, index: tuple[int, ...], value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][index] = value

    return change


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


STATISTICS_DAMAGE = {
    "nan": (_edit_tensors(_set("mean", (3,), float("nan"))), r"tensor 'mean' holds 1 NaN or infinite value"),
    "inf": (_edit_tensors(_set("projection", (0, 0), float("inf"))), r"tensor 'projection' holds 1 NaN or infinite"),
    "wrong_shape": (
        _edit_tensors(lambda t: t.update(projection=t["projection"][:, :-1].contiguous())),
        r"tensor 'projection' has shape \(64, 7\), but .*config\.json \(mode 'whiten' .*components=8\) needs \(64, 8\)",
    ),
    "wrong_dtype": (_edit_tensors(lambda t: t.update(mean=t["mean"].half())), r"tensor 'mean' is float16, expected float32"),
    "missing_tensor": (_edit_tensors(lambda t: t.pop("projection")), r"missing tensor\(s\) \['projection'\]"),
    "truncated": (_truncate, r"not a readable safetensors file .*: it is truncated or corrupt"),
    "garbage_bytes": (_garbage, r"not a readable safetensors file .*: it is truncated or corrupt"),
}


def _assert_names_file_problem_and_remedy(error: pytest.ExceptionInfo, file: str, problem: str) -> None:
    message = str(error.value)
    assert file in message, message
    assert re.search(problem, message), message
    assert REMEDY in message and "kvemb build" in message


@pytest.mark.parametrize("damage", sorted(STATISTICS_DAMAGE))
def test_damaged_statistics_fail_at_load_through_both_loaders(folder, damage):
    apply, problem = STATISTICS_DAMAGE[damage]
    apply(folder / STATISTICS)
    for load in (kvemb_st.load, lambda path: SentenceTransformer(path, trust_remote_code=True)):
        with pytest.raises(ValueError) as error:
            load(str(folder))
        _assert_names_file_problem_and_remedy(error, STATISTICS, problem)


def _cut_json(path: Path) -> None:
    path.write_text(path.read_text()[:-7])


JSON_DAMAGE = {  # file -> (damage, problem); kvemb_st.load reads all of them, ST's own loader the modules' files
    "kvemb_config.json:truncated": (_cut_json, r"not valid JSON .*: the file is damaged or truncated"),
    "kvemb_config.json:garbage_bytes": (_garbage, r"not valid JSON"),
    "kvemb_config.json:not_an_object": (lambda p: p.write_text("[1, 2]"), r"holds list \[1, 2\], expected an object"),
    "1_PostProcessing/config.json:truncated": (_cut_json, r"not valid JSON"),
    "1_PostProcessing/config.json:bad_value": (
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "in_features": "64"})),
        r"in_features must be a positive integer, got '64'",
    ),
    "modules.json:truncated": (_cut_json, r"not valid JSON"),
    "modules.json:path_not_a_string": (
        lambda p: p.write_text(json.dumps([{**m, "path": 1} for m in json.loads(p.read_text())])),
        r"must be a list of module entries with a string 'path'",
    ),
    "config_sentence_transformers.json:truncated": (_cut_json, r"not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(JSON_DAMAGE))
def test_damaged_json_files_fail_at_load_naming_the_file(folder, case):
    file, _ = case.split(":")
    apply, problem = JSON_DAMAGE[case]
    apply(folder / file)
    loaders = [kvemb_st.load]
    if file in ("kvemb_config.json", "1_PostProcessing/config.json"):  # read by our modules under ST's loader too
        loaders.append(lambda path: SentenceTransformer(path, trust_remote_code=True))
    for load in loaders:
        with pytest.raises(ValueError) as error:
            load(str(folder))
        _assert_names_file_problem_and_remedy(error, file, problem)


def test_intact_folder_loads_and_gives_finite_vectors(folder):
    vectors = kvemb_st.load(str(folder)).encode(["A cat sits on the mat."], convert_to_tensor=True)
    assert vectors.shape == (1, 8) and bool(torch.isfinite(vectors).all())
