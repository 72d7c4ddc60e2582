"""The card keeps one model-index entry per task, split, subset and metric: a run on another split adds its
entries, a rerun of a split replaces only that split's. mteb's result objects are stood in for by the
``EvalResult`` entries they give (written out here). Budget: < 1 s."""

from __future__ import annotations

from huggingface_hub import EvalResult, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from kvemb_st.benchmark.card import write_model_index


class _Result:
    """What write_model_index reads of an mteb TaskResult: its Hub eval results."""

    def __init__(self, split: str, score: float, subset: str = "default") -> None:
        self.entry = dict(task_type="STS", dataset_type="mteb/stsbenchmark-sts", dataset_name="MTEB STSBenchmark",
                          dataset_config=subset, dataset_split=split, metric_type="cosine_spearman", metric_value=score)  # fmt: skip

    def get_hf_eval_results(self) -> list[EvalResult]:
        return [EvalResult(**self.entry)]


def _entries(folder) -> dict[tuple[str, str], float]:
    _, results = model_index_to_eval_results(metadata_load(folder / "README.md")["model-index"])
    return {(r.dataset_split, r.dataset_config): r.metric_value for r in results}


def test_each_split_keeps_its_own_entry(tmp_path):
    write_model_index(tmp_path, "kv", [_Result("test", 0.81234567)], "mteb")
    write_model_index(tmp_path, "kv", [_Result("validation", 0.85)], "mteb")
    assert _entries(tmp_path) == {("test", "default"): 0.812346, ("validation", "default"): 0.85}
    write_model_index(tmp_path, "kv", [_Result("test", 0.7), _Result("test", 0.6, "en")], None)
    assert _entries(tmp_path) == {("test", "default"): 0.7, ("validation", "default"): 0.85, ("test", "en"): 0.6}
