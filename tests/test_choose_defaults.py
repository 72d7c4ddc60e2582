"""The written defaults rule (experiments/choose_defaults/choose_defaults.py) on hand-made dev results of two backbones."""

from __future__ import annotations

import json

import pytest

from kvemb_lab import choose_defaults


def _write(path, base, rows):
    results = [
        {"method": method, "pooling": pooling, "postprocessing": post, "config": {},
         "sts_spearman": s, "lee_pearson": l, "newsgroups_5nn": n}
        for method, pooling, post, (s, l, n) in rows
    ]  # fmt: skip
    path.write_text(json.dumps({"base": base, "results": results}))
    return path


@pytest.fixture
def files(tmp_path):
    a = _write(tmp_path / "a.json", "/x/ModelA", [
        ("kv", "last", "none", (0.70, 0.50, 0.80)),                 # mean 0.6667
        ("kv", "last", "whiten@s", (0.80, 0.55, 0.90)),             # 0.75
        ("kv", "last", "whiten:64@s", (0.80, 0.56, 0.90)),          # 0.7533
        ("kv", "mean", "whiten@s", (0.10, 0.10, 0.10)),             # only on A: never a candidate
        ("prompteol", "last", "whiten@s", (0.99, 0.99, 0.99)),      # a baseline: never chosen
    ])  # fmt: skip
    b = _write(tmp_path / "b.json", "/y/ModelB", [
        ("kv", "last", "none", (0.60, 0.40, 0.70)),
        ("kv", "last", "whiten@s", (0.70, 0.45, 0.80)),              # 0.65 -> mean over A, B 0.7
        ("kv", "last", "whiten:64@s", (0.70, 0.45, 0.80)),           # 0.65 -> 0.7017
        ("prompteol", "last", "whiten@s", (0.99, 0.99, 0.99)),
    ])  # fmt: skip
    return a, b


def test_the_simpler_candidate_wins_a_tie_and_baselines_are_never_chosen(files):
    text = choose_defaults.rank(files, tie=0.005)
    assert text.startswith("Chosen: `kv`, pooling `last`, post-processing `whiten@s` (score 0.7000")
    assert "| **kv** | **last** | **whiten@s** | 0.7000 |" in text
    assert "| kv | mean | whiten@s | - |" in text  # missing on one backbone: listed, not scored
    assert "ModelA sts_spearman" in text and "ModelB newsgroups_5nn" in text


def test_without_a_tie_margin_the_best_score_wins(files):
    text = choose_defaults.rank(files, tie=0.0)
    assert text.startswith("Chosen: `kv`, pooling `last`, post-processing `whiten:64@s` (score 0.7017")
