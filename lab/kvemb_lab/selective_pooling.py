"""Selective mean pooling (issue 18's SCSP lever): average only the text tokens the final token attends to most.

The document side is run once per text; a forward pre-hook on the last decoder layer's attention takes that
layer's input and rotary tables, and the final token's attention over the text's own tokens is recomputed from
its query and keys (softmax over every real token, averaged over heads; the prefix slot of a re-routed layer
only rescales these weights, so it leaves the ranking unchanged). The final hidden states are then pooled over
the top ``r`` of the text tokens by that attention, or weighted by it, and scored as the lever harness scores
every other readout (Lee, newsgroups-dev 5-NN, subject -> body retrieval-dev with the queries read the same way),
whitened on the calibration sentences + paragraphs like the stage-1 winner. Dev data only.

    python experiments/selective_pooling/selective_pooling.py smollm2 --sides '{"document": {...}}'
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kvemb_st.postprocessing_fit import fit_postprocessing

from kvemb_lab.backbones import BACKBONES, run_assets
from kvemb_lab.doc_scoring import Scorer, text_sets
from kvemb_lab.evaluation import markdown_table, write_json
from kvemb_lab.side_scripts import side_model, side_script_parser

FRACTIONS = (0.1, 0.25, 0.5)
SETS = ("cal_sentences", "cal_sts_paragraphs", "lee", "newsgroups", "subjects")


def final_token_attention(attn: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          last: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` attention of each row's final real token over its real tokens, averaged over heads."""
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model family's own RoPE
    batch, length, _ = hidden.shape
    head_dim = attn.head_dim
    query = attn.q_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    key = attn.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3, Gemma 3
        query, key = attn.q_norm(query), attn.k_norm(key)
    query, key = rope(query, key, cos, sin)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    rows = torch.arange(batch)
    scores = torch.einsum("bhd,bhtd->bht", query[rows, :, last], key) * attn.scaling
    scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
    return scores.softmax(-1).mean(1)


@torch.inference_mode()
def selective_vectors(model, texts: Sequence[str], batch_size: int = 16) -> dict[str, np.ndarray]:
    """Per variant (``top{r}``, ``weighted``), ``(texts, hidden)`` vectors of the document side."""
    module = model[0]
    layers = module.auto_model.model.layers if hasattr(module.auto_model, "model") else module.auto_model.layers
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        captured["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        captured["cos"], captured["sin"] = kwargs["position_embeddings"]

    handle = layers[-1].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    out = {f"top{r}": [] for r in FRACTIONS} | {"weighted": []}
    try:
        for start in range(0, len(texts), batch_size):
            features = module.preprocess(list(texts[start : start + batch_size]), task="document", text_mask=True)
            final = module.run(features).final
            mask, text = features["attention_mask"], features["text_mask"].bool()
            last = mask.sum(1) - 1
            weights = final_token_attention(layers[-1].self_attn, captured["hidden"], captured["cos"],
                                            captured["sin"], last, mask).masked_fill(~text, 0)  # fmt: skip
            out["weighted"].append(torch.einsum("bt,bth->bh", weights, final))
            counts = text.sum(1)
            order = weights.argsort(1, descending=True).argsort(1)  # rank of each token, 0 = most attended
            for r in FRACTIONS:
                keep = (order < (counts * r).ceil().clamp(min=1)[:, None]) & text
                out[f"top{r}"].append((final * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))
    finally:
        handle.remove()
    return {name: F.normalize(torch.cat(chunks), dim=-1).numpy() for name, chunks in out.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = side_script_parser(__doc__, "JSON of the model's sides (the document side is read)", "doc_levers")
    args = parser.parse_args(argv)
    backbone = BACKBONES[args.backbone]
    model = side_model(args)
    sets = text_sets(backbone)
    cache = args.cache / args.backbone / "selective"
    vectors = {}
    for name in SETS:
        path = cache / f"{name}.npz"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **selective_vectors(model, sets[name]))
        with np.load(path) as data:
            vectors[name] = dict(data)
    scorer = Scorer(args.cache, args.backbone)
    rows = []
    for variant in vectors["lee"]:
        apply = fit_postprocessing(np.concatenate(
            [vectors["cal_sentences"][variant], vectors["cal_sts_paragraphs"][variant]]), "whiten").transform  # fmt: skip
        docs = apply(vectors["newsgroups"][variant])
        rows.append({"backbone": args.backbone, "readout": f"selective {variant} (final layer)",
                     "whiten": "sentences+sts_paragraphs", **scorer.documents(apply(vectors["lee"][variant]), docs),
                     **scorer.retrieval(apply(vectors["subjects"][variant]), docs)})  # fmt: skip
    out = args.out / args.backbone
    write_json(out / f"selective_{args.backbone}.json", {"command": " ".join(sys.argv), "rows": rows},
               run_assets([args.backbone]))
    (out / f"selective_{args.backbone}.md").write_text(markdown_table(rows, [
        "backbone", "readout", "whiten", "lee_pearson", "newsgroups_5nn", "retrieval_ndcg@10", "retrieval_mrr@10"], 3))
    print(markdown_table(rows, ["readout", "lee_pearson", "newsgroups_5nn", "retrieval_ndcg@10"], 3))


if __name__ == "__main__":
    main()
