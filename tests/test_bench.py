"""tools/bench.py on tiny models: what its tables promise (every point, exact tokens, finite ratios), the
random backbones of real shapes, the memory worker and the per-op profile. Speed itself is never asserted."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvemb_lab.bench.cli import main, parse_args
from kvemb_lab.bench.measure import profile_ops
from kvemb_lab.bench.report import profile_markdown
from kvemb_lab.bench.shapes import SHAPES, describe, random_backbone

# Parameter counts of the released checkpoints (the Hub's safetensors counts; an untied LM head counted once):
# a shape table entry that is off in any dimension changes them.
PUBLISHED_PARAMETERS = {
    "qwen3-0.6b": 596_049_920,
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_248_023_552,
    "qwen2.5-0.5b": 494_032_768,
    "smollm2-135m": 134_515_008,
}


def _finite_positive(ratio: dict) -> bool:
    low, high = ratio["range"]
    return all(math.isfinite(r) and r > 0 for r in (low, ratio["median"], high)) and low <= high


def test_shape_tiny_bench_reports_every_point_and_column(smollm2_tokenizer_dir, tmp_path):
    out = tmp_path / "bench"
    main(
        ["--shape", "tiny", "--tokenizer", str(smollm2_tokenizer_dir), "--grid", "24x2,40x1", "--repeats", "2",
         "--threads", "1", "--no-rss", "--tokenize", "3x60@48", "--out", str(out)]
    )  # fmt: skip
    result = json.loads((tmp_path / "bench.json").read_text())
    tiny = SHAPES["tiny"]
    built = result["backbone"]
    assert (built["layers"], built["heads"], built["kv_heads"], built["head_dim"], built["hidden"]) == (
        tiny.layers, tiny.heads, tiny.kv_heads, tiny.head_dim, tiny.hidden
    )  # fmt: skip
    assert result["kv_config"]["layers"] == "3-3"  # the last third of 4 layers
    assert [(row["length"], row["batch"]) for row in result["rows"]] == [(24, 2), (40, 1)]
    for row in result["rows"]:
        tokens = row["tokens"]
        assert tokens["plain"] == tokens["kv"] == tokens["kv_keep"] == row["length"]
        assert row["length"] < tokens["echo"] < 2 * row["length"]  # the text twice, the template once
        assert row["repeats"] == 2 and len(row["times_s"]) == 8  # forward and encode of four variants
        assert all(len(times) == 2 for times in row["times_s"].values())
        for column in ("forward_ratio", "encode_ratio", "encode_cpu_ratio"):
            assert set(row[column]) == {"kv", "kv_keep", "echo"}, column
            assert all(_finite_positive(r) for r in row[column].values()), column
        assert "peak_rss_ratio" not in row  # --no-rss
    tokenization = result["tokenization"]
    assert (tokenization["texts"], tokenization["cut"]["max_length"]) == (3, 48)
    assert tokenization["cut"]["cut"] == 3 and tokenization["fit"]["cut"] == 0  # same texts, cut and uncut
    assert tokenization["cut"]["tokens_dropped"] >= 3 * (60 - 48) and tokenization["fit"]["tokens_dropped"] == 0
    for case in ("fit", "cut"):
        assert math.isfinite(tokenization[case]["ratio"]) and tokenization[case]["ratio"] > 0, case
    table = (tmp_path / "bench.md").read_text()
    assert "| 24 / 24 / 24 / " in table and "| 40 / 40 / 40 / " in table
    assert "**kv / plain forward**" in table and "kv / plain encode" in table and "kv_keep / plain forward" in table
    assert "| fit | 240 | 0 |" in table and "| cut | 48 | 3 |" in table
    assert "Command: `python " in table
    assert f"Provenance: `{json.dumps(result['provenance'])}`" in table
    # which path the re-routed layers took: CPU flash, self-checked, log-sum-exp merge
    assert "cpu FLASH_ATTENTION float32 head_dim=16 heads=4/2 causal: lse_merge (checked" in result["attention_paths"]
    assert "Re-routed attention path" in table and "lse_merge" in table


def test_shapes_match_the_published_models():
    for name, published in PUBLISHED_PARAMETERS.items():
        shape = SHAPES[name]
        model = random_backbone(shape, 0, torch.bfloat16, "meta")  # meta: no memory, no init
        built = describe(model)
        assert (built["layers"], built["heads"], built["kv_heads"], built["head_dim"]) == (
            shape.layers, shape.heads, shape.kv_heads, shape.head_dim
        ), name  # fmt: skip
        assert built["qkv_bias"] == (name == "qwen2.5-0.5b"), name
        head = 0 if shape.tied_embeddings else shape.vocab * shape.hidden
        assert built["parameters"] + head == published, name


def test_shape_vocabulary_grows_to_fit_the_tokenizer():
    model = random_backbone(SHAPES["mistral-7b"], 49_152, torch.bfloat16, "meta")
    assert model.config.vocab_size == 49_152  # SmolLM2's ids would overflow Mistral's 32,768


def test_memory_worker_prints_one_encode_peak(tiny_llama, tmp_path, capsys):
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(["a short text"] * 2))
    main(["--worker", "--variant", "kv", "--texts-file", str(texts), "--base", tiny_llama, "--layers", "1-3",
          "--max-seq-length", "64", "--device", "cpu", "--threads", "1"])  # fmt: skip
    peak = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < peak["rss_before_mb"] <= peak["peak_rss_mb"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--grid", "128"], "expected TOKENSxBATCH"),
        (["--grid", "128x64", "--lengths", "64"], "not allowed with argument"),
        (["--grid", "128x64", "--batch", "2"], "--batch goes with --lengths"),
        (["--tokenize", "32x400@512"], "T > M"),
        (["--variants", "kv,plain"], "start with plain"),
        (["--shape", "tiny", "--base", "x"], "not allowed with argument"),
        (["--shape", "gpt-9"], "invalid choice"),
    ],
)
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_profile_splits_time_by_op(tiny_llama, tmp_path):
    args = parse_args(["--base", tiny_llama, "--layers", "1-3", "--profile", "32", "--threads", "1"])
    self_ms = profile_ops(args)
    assert set(self_ms["kv"]) - set(self_ms["plain"]), "re-routing runs ops that the plain forward does not"
    table = profile_markdown(self_ms, 32)
    assert "One forward pass of 32 templated tokens" in table
    assert "| **total** |" in table and table.count("\n| `") >= min(25, len(self_ms["plain"]))
