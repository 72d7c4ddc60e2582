"""The document-side choice rule (experiments/doc_levers/RULE.md) on hand-made rows, and the chunking helper."""

from __future__ import annotations

import pytest

from kvemb_lab import doc_levers as levers


def row(backbone, setting, depth, width, pooling, whiten, lee, ng, ndcg):
    return {"backbone": backbone, "setting": setting, "depth": depth, "width": width, "pooling": pooling,
            "whiten": whiten, "lee_pearson": lee, "newsgroups_5nn": ng, "retrieval_ndcg@10": ndcg}  # fmt: skip


def results(rows):
    by = {}
    for r in rows:
        by.setdefault(r["backbone"], []).append(r)
    return [{"backbone": b, "rows": rs} for b, rs in by.items()]


def test_depth_layers_centre_and_clip():
    assert levers.depth_layers(1.0, 1, 30) is None  # the final, normed output
    assert levers.depth_layers(0.5, 1, 30) == (15,) and levers.depth_layers(0.5, 3, 24) == (11, 12, 13)
    assert levers.depth_layers(1.0, 5, 30) == (25, 26, 27, 28, 29)  # clipped at the last layer
    assert levers.depth_layers(0.95, 3, 18) == (15, 16, 17)


def test_stage1_averages_backbones_prefers_simpler_within_0005_and_skips_ineligible():
    rows = []
    for backbone, bump in (("a", 0.0), ("b", 0.02)):
        rows += [
            row(backbone, "kv", 1.0, 1, "mean", "sentences", 0.60 + bump, 0.90, 0.30),        # 0.600 / 0.620
            row(backbone, "kv", 0.8, 3, "mean/text", "sentences", 0.61 + bump, 0.90, 0.30),   # +0.0033: within 0.005
            row(backbone, "kv_compression", 1.0, 1, "mean", "sentences", 0.63 + bump, 0.90, 0.30),  # +0.01
            row(backbone, "kv", 1.0, 1, "mean", "general", 0.90, 0.99, 0.90),               # not eligible
            row(backbone, "kv_bias0", 1.0, 1, "mean", "sentences", 0.64 + bump, 0.90, 0.30),  # +0.0133 > same + 0.01?
        ]
    ranked = levers.rank_stage1(results(rows))
    assert ranked[0]["key"][4] == "general"  # ranked, but never chosen
    chosen = levers.choose_stage1(ranked)
    # kv_bias0 beats the best template candidate (kv_compression) by 0.0033 < 0.01: forward settings do not count
    assert chosen["key"] == ("kv_compression", 1.0, 1, "mean", "sentences")
    assert chosen["score"] == pytest.approx((0.63 + 0.90 + 0.30) / 3 + 0.01 / 3)
    rows = [r for r in rows if r["setting"] != "kv_compression"]
    # without it the best of the default pass is the window (0.0033 above the single layer): the simpler wins
    assert levers.choose_stage1(levers.rank_stage1(results(rows)))["key"] == ("kv", 1.0, 1, "mean", "sentences")
    one_backbone_only = [*rows, row("a", "kv", 0.3, 1, "last", "none", 0.99, 0.99, 0.99)]
    assert all(e["key"][1] != 0.3 for e in levers.rank_stage1(results(one_backbone_only)))  # needs both backbones


def test_stage2_keeps_sentences_on_every_backbone_then_prefers_simpler():
    def s2(backbone, query, post, sts, ndcg):
        return {"backbone": backbone, "query": query, "post": post, "sts_dev": sts, "retrieval_ndcg@10": ndcg}

    rows = [
        s2("smollm2", "default side", "one whitening", 0.799, 0.40), s2("qwen25", "default side", "one whitening", 0.79, 0.40),
        s2("smollm2", "document side", "one per side", 0.805, 0.30), s2("qwen25", "document side", "one per side", 0.787, 0.30),
        s2("smollm2", "default side", "one per side", 0.805, 0.297), s2("qwen25", "default side", "one per side", 0.787, 0.297),
    ]  # fmt: skip
    choice = levers.choose_stage2(rows)  # one whitening drops SmolLM2's STS under 0.800: not allowed
    assert (choice["query"], choice["post"]) == ("default side", "one per side")  # 0.003 below the best: simpler
    with pytest.raises(ValueError, match="keeps STS-B dev"):
        levers.choose_stage2([r for r in rows if r["post"] == "one whitening"])
