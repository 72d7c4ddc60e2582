"""``kvemb eval`` without data files: its clear errors, and the model card's ``model-index`` written from mteb's results.

Budget: ~10 s (a tiny random model on five hand-written BIOSSES-style pairs).
"""

from __future__ import annotations

import sys

import pytest

import kvemb_st
from kvemb_st.cli import main

PAIRS = (
    ["A man plays a guitar.", "Cats sleep a lot.", "The market fell today.", "Proteins fold quickly.", "It rains."],
    ["Someone plays music.", "A dog barks.", "Stocks dropped sharply.", "Folding of proteins is fast.", "It is sunny."],
    [4.0, 0.5, 3.5, 3.8, 1.0],
)


def test_without_mteb_the_error_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "mteb", None)  # makes `import mteb` fail
    assert main(["eval", str(tmp_path), "--tasks", "BIOSSES"]) == 1
    err = capsys.readouterr().err
    assert "kvemb-st[mteb]" in err and "Traceback" not in err


def test_unknown_task_and_a_card_of_a_slice_are_refused(capsys, tmp_path):
    pytest.importorskip("mteb")
    assert main(["eval", str(tmp_path), "--tasks", "NoSuchTask"]) == 1
    assert "NoSuchTask" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", "BIOSSES", "--card", "--max-examples", "5"]) == 1
    assert "leave out --max-examples" in capsys.readouterr().err


def test_the_card_round_trips_and_its_hub_metadata_validates(tiny_llama, tmp_path):
    mteb = pytest.importorskip("mteb")
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results
    from datasets import Dataset, DatasetDict

    from kvemb_st.benchmark.card import write_model_index

    folder = tmp_path / "kv-tiny"
    model = kvemb_st.from_base(tiny_llama, layers="1-2")
    model.save(str(folder))
    body = ModelCard.load(folder / "README.md").text
    task = mteb.get_task("BIOSSES")  # a registered task (the card names its Hub dataset), fed a few pairs
    task.dataset = DatasetDict({"test": Dataset.from_dict(dict(zip(("sentence1", "sentence2", "score"), PAIRS)))})
    task.data_loaded = True
    result = mteb.evaluate(model, task, cache=None, show_progress_bar=False).task_results[0]
    for _ in range(2):  # a second run replaces its entries instead of adding copies
        write_model_index(folder, "kv-tiny", [result], "mteb")
    card = ModelCard.load(folder / "README.md")
    assert card.text == body  # the card's text is kept; only the metadata header changes
    name, results = model_index_to_eval_results(metadata_load(folder / "README.md")["model-index"])  # validates
    assert name == card.data.model_name and len(results) == 1
    (entry,) = results
    assert (entry.dataset_type, entry.metric_type, entry.dataset_split) == ("mteb/biosses-sts", "cosine_spearman", "test")
    assert entry.metric_value == pytest.approx(result.get_score(), abs=1e-6) and entry.source_name == "MTEB (data: mteb)"
