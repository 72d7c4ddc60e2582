"""``kvemb eval`` without the team's data files: its clear errors, the Hub path (its loading stood in for), the whole
command on hand-written task files, and the model card written from mteb's results.

Budget: ~15 s (a tiny random model on five hand-written pairs per task).
"""

from __future__ import annotations

import json
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


def test_an_mteb_outside_the_extras_range_is_refused_with_the_upgrade_line(monkeypatch, capsys, tmp_path):
    mteb = pytest.importorskip("mteb")
    monkeypatch.setattr(mteb, "__version__", "2.3.1")  # before the wrappers and result cache this package uses
    assert main(["eval", str(tmp_path), "--tasks", "BIOSSES"]) == 1
    err = capsys.readouterr().err
    assert "mteb 2.3.1 is installed" in err and "kvemb-st[mteb]' --upgrade" in err and "Traceback" not in err


def test_the_checked_range_is_the_extras_range():
    """MTEB_VERSIONS, which import_mteb checks, repeats by hand the range pyproject.toml gives the `mteb` extra."""
    import tomllib
    from pathlib import Path

    from kvemb_st.benchmark import MTEB_VERSIONS

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    low, high = (".".join(map(str, bound)) for bound in MTEB_VERSIONS)
    wanted = f"mteb>={low},<{high.removesuffix('.0')}"
    for extra in ("mteb", "ray", "test"):
        assert wanted in extras["optional-dependencies"][extra], extra


def test_unknown_task_and_a_card_of_a_slice_are_refused(capsys, tmp_path):
    pytest.importorskip("mteb")
    assert main(["eval", str(tmp_path), "--tasks", "NoSuchTask"]) == 1
    assert "NoSuchTask" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", "Banking77"]) == 1  # the README's example once said this
    assert "in MTEB(eng, v1): Banking77Classification" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", "BIOSSES", "--card", "--max-examples", "5"]) == 1
    assert "leave out --max-examples" in capsys.readouterr().err


def test_the_card_round_trips_and_its_hub_metadata_validates(tiny_llama, tmp_path):
    mteb = pytest.importorskip("mteb")
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results
    from datasets import Dataset, DatasetDict

    from kvemb_st.benchmark.card import scores_table, write_model_index

    folder = tmp_path / "kv-tiny"
    model = kvemb_st.from_base(tiny_llama, layers="1-2")
    model.save(str(folder))
    body = ModelCard.load(folder / "README.md").text
    task = mteb.get_task("BIOSSES")  # a registered task (the card names its Hub dataset), fed a few pairs
    task.dataset = DatasetDict({"test": Dataset.from_dict(dict(zip(("sentence1", "sentence2", "score"), PAIRS)))})
    task.data_loaded = True
    result = mteb.evaluate(model, task, cache=None, show_progress_bar=False).task_results[0]
    for _ in range(2):  # a second run replaces its entries instead of adding copies
        write_model_index(folder, "kv-tiny", [result], {"BIOSSES": "mteb"})
    card = ModelCard.load(folder / "README.md")
    # ST's card keeps its text; the scores follow it once, under an Evaluation heading
    assert card.text == f"{body.rstrip()}\n\n## Evaluation\n\n{scores_table(card.data.eval_results)}\n"
    assert f"| cosine_spearman | {result.get_score():.4f} | MTEB (data: mteb) |" in card.text
    name, results = model_index_to_eval_results(metadata_load(folder / "README.md")["model-index"])  # validates
    assert name == card.data.model_name and len(results) == 1
    (entry,) = results
    assert (entry.dataset_type, entry.metric_type, entry.dataset_split) == ("mteb/biosses-sts", "cosine_spearman", "test")
    assert entry.metric_value == pytest.approx(result.get_score(), abs=1e-6) and entry.source_name == "MTEB (data: mteb)"


def write_sts_task(data_dir, name: str) -> None:
    """A task file in the offline copy's layout (``<Task>/test.tsv``), hand-written."""
    (data_dir / name).mkdir(parents=True)
    lines = ["sentence1\tsentence2\tscore", *("\t".join(map(str, row)) for row in zip(*PAIRS))]
    (data_dir / name / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_a_missing_file_names_the_file_and_the_option(tmp_path, capsys):
    pytest.importorskip("mteb")
    from kvemb_st.benchmark.local_tasks import load_local_task

    with pytest.raises(FileNotFoundError, match=r"STS12/test\.tsv is missing from --data-dir"):
        load_local_task("STS12", tmp_path)
    # the command checks the data before it loads the model (a folder that does not exist)
    assert main(["eval", str(tmp_path / "no-model"), "--tasks", "STS12", "--data-dir", str(tmp_path)]) == 1
    assert "STS12/test.tsv is missing" in capsys.readouterr().err


def test_two_runs_into_one_output_keep_every_tasks_score_origin_and_card_entry(tiny_llama, tmp_path, capsys):
    pytest.importorskip("mteb")
    from huggingface_hub import ModelCard

    data, out, folder = tmp_path / "my-copy", tmp_path / "out", tmp_path / "kv-tiny"
    for name in ("BIOSSES", "STS12"):
        write_sts_task(data, name)
    kvemb_st.from_base(tiny_llama, layers="1-2").save(str(folder))
    for name in ("BIOSSES", "STS12"):
        argv = ["eval", str(folder), "--tasks", name, "--data-dir", str(data), "--output", str(out), "--card"]
        assert main(argv) == 0
        assert f"{name} " in capsys.readouterr().out  # the summary table's line
    (summary_file,) = out.rglob("kvemb_summary.json")
    summary = json.loads(summary_file.read_text())
    assert set(summary["scores"]) == {"BIOSSES", "STS12"} and summary["data"]["BIOSSES"]["source"] == "my-copy"
    assert {p.name for p in summary_file.parent.glob("*.json")} >= {"BIOSSES.json", "STS12.json"}
    card = ModelCard.load(folder / "README.md")
    assert {r.dataset_name for r in card.data.eval_results} == {"BIOSSES (default)", "STS12 (default)"}
    for name in ("BIOSSES", "STS12"):
        score = summary["scores"][name]
        assert f"| {name} (default) | STS | test | cosine_spearman | {score:.4f} | MTEB (data: my-copy) |" in card.text


def test_the_hub_path_scopes_tasks_as_the_english_benchmark_and_names_its_data(monkeypatch):
    """Without --data-dir a task loads as mteb loads it (stood in for here: no Hub), scoped as MTEB(eng, v1) scores
    it: AmazonCounterfactual on its test split and English subset, not mteb's default of two splits and four
    languages. A loading failure names the dataset and the option that works offline."""
    mteb = pytest.importorskip("mteb")
    from kvemb_st.benchmark.local_tasks import Sampling
    from kvemb_st.benchmark.run import load_tasks

    task_class = type(mteb.get_task("AmazonCounterfactualClassification"))
    monkeypatch.setattr(task_class, "load_data", lambda self, **kwargs: setattr(self, "data_loaded", True))
    ((task, origin),) = load_tasks(["AmazonCounterfactualClassification"], None, Sampling())
    assert (task.eval_splits, task.hf_subsets) == (["test"], ["en"])
    dataset = task.metadata.dataset
    assert origin.source == f"huggingface:{dataset['path']}@{dataset['revision']}"

    def unreachable(self, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(task_class, "load_data", unreachable)
    with pytest.raises(ConnectionError, match=rf"{dataset['path']}.*Couldn't reach.*--data-dir"):
        load_tasks(["AmazonCounterfactualClassification"], None, Sampling())
    monkeypatch.setattr(task_class, "load_data", lambda self, **kwargs: 1 / 0)  # a bug is not "no internet"
    with pytest.raises(ZeroDivisionError):
        load_tasks(["AmazonCounterfactualClassification"], None, Sampling())
