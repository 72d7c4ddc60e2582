"""scripts/bench.py end to end on a tiny model: rows, exact token counts, ratios and the per-op profile."""

from __future__ import annotations

import json
import math


def test_bench_writes_ratios_for_every_length(load_script, tiny_llama, tmp_path):
    out = tmp_path / "bench"
    load_script("bench").main(
        ["--base", str(tiny_llama), "--layers", "1-3", "--lengths", "24,40", "--repeats", "2", "--batch", "2",
         "--threads", "1", "--out", str(out)]
    )  # fmt: skip
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [row["length"] for row in result["rows"]] == [24, 40]
    for row in result["rows"]:
        assert row["tokens"]["plain"] == row["tokens"]["kv"] == row["length"]
        assert row["tokens"]["echo"] > row["length"]  # the text twice
        assert row["repeats"] == 2 and all(len(times) == 2 for times in row["times_s"].values())
        for ratios in ("time_ratio", "cpu_ratio", "peak_rss_ratio"):
            assert all(math.isfinite(r) and r > 0 for r in row[ratios].values()), ratios
        low, high = row["time_ratio_range"]["kv"]
        assert low <= row["time_ratio"]["kv"] <= high
    table = (tmp_path / "bench.md").read_text()
    assert "| 24 / " in table and "| 40 / " in table and "Command: `python " in table


def test_bench_profile_splits_time_by_op(load_script, tiny_llama, tmp_path):
    out = tmp_path / "bench"
    load_script("bench").main(["--base", str(tiny_llama), "--layers", "1-3", "--profile", "32", "--out", str(out)])
    table = (tmp_path / "bench_profile_32.md").read_text()
    assert "One forward pass of 32 templated tokens" in table
    assert "| `aten::lerp` | 0.0 |" in table  # the prefix merge runs in kv only
    assert "| **total** |" in table
