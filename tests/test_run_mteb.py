"""experiments/run_mteb/run_mteb.py: clear errors without mteb or without its data; a real run on an mteb mock task.

mteb is an optional extra (also in the test extra); the error paths use a stand-in module. Budget: < 20 s
(the mock-task run, only where mteb is installed).
"""

from __future__ import annotations

import json
import math
import sys
import types

import pytest

import kvemb_st

from kvemb_lab import run_mteb


def test_without_mteb_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mteb", None)  # makes `import mteb` fail
    assert run_mteb.main(["some/model", "--tasks", "STSBenchmark"]) == 2
    err = capsys.readouterr().err
    assert "mteb is not installed" in err and "pip install" in err and "Traceback" not in err


class OfflineTask:
    metadata = types.SimpleNamespace(name="STSBenchmark", dataset={"path": "mteb/stsbenchmark-sts"})

    def load_data(self, **kwargs):
        raise ConnectionError("Couldn't reach 'mteb/stsbenchmark-sts' on the Hub (LocalEntryNotFoundError)")


def test_offline_fails_naming_the_missing_data_before_loading_the_model(monkeypatch, capsys, tmp_path):
    fake = types.ModuleType("mteb")
    fake.get_task = lambda name: OfflineTask()
    monkeypatch.setitem(sys.modules, "mteb", fake)
    missing_model = str(tmp_path / "never-loaded")  # loading it would fail differently
    assert run_mteb.main([missing_model, "--tasks", "STSBenchmark", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "data of MTEB task 'STSBenchmark'" in err and "'mteb/stsbenchmark-sts'" in err
    assert "is not available" in err and "HF_HOME" in err and "Traceback" not in err


def test_unknown_task_is_named(monkeypatch, capsys):
    fake = types.ModuleType("mteb")

    def get_task(name):
        raise KeyError(f"KeyError: '{name}' not found and no similar keys were found.")

    fake.get_task = get_task
    monkeypatch.setitem(sys.modules, "mteb", fake)
    assert run_mteb.main(["m", "--tasks", "NoSuchTask"]) == 2
    assert "unknown MTEB task 'NoSuchTask'" in capsys.readouterr().err


def test_real_mteb_run_on_a_mock_task(tiny_llama, tmp_path):
    pytest.importorskip("mteb")  # optional extra; the error paths above run without it
    from mteb.mocks import MockSTSTask

    folder = tmp_path / "model"
    kvemb_st.from_base(tiny_llama, method="prompteol").save(str(folder))
    summary = run_mteb.run(str(folder), [MockSTSTask()], tmp_path / "out", batch_size=8)
    assert summary["name"] == "kvemb-st/model" and math.isfinite(summary["scores"]["MockSTSTask"])
    written = json.loads((tmp_path / "out" / "kvemb-st__model.json").read_text())
    assert written["scores"] == summary["scores"]
