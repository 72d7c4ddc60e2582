"""How much attention the re-routed prefix slot draws, per layer, on real sentences (a diagnostic, not a benchmark).

Runs the backbone with an explicit-softmax attention (softmax over ``[prefix; causal keys]``, float32) that
records, at every re-routed layer, the prefix slot's weight averaged over heads and real query tokens, and
the weight the *first* token (the attention sink of most LLMs) gets at the same layers without re-routing.
The texts are label-free: the first ``--texts`` calibration sentences (or STS-B dev sentences, ``--source sts-dev``,
as the first runs in ``results/prefix_attention/qwen25/`` used), so the share can steer a knob without labels.

    python experiments/prefix_attention/prefix_attention.py --backbone qwen25 --layers 14-21 --biases 1,3,5
        --texts 64 --out results/bias_share/qwen25/qwen25_14-21.json    # (one command)
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModel
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvemb_st.attention.prefix import rotate, unrotate
from kvemb_st.calibration import load_calibration
from kvemb_st.config import KVEmbeddingConfig
from kvemb_st.methods import kv_routing
from kvemb_st.module import KVEmbedding

from kvemb_lab.assets import STS_DISTRIBUTION, load_sts_b
from kvemb_lab.backbones import BACKBONES, run_assets
from kvemb_lab.evaluation import write_json

PROBE = "kvemb_prefix_probe"
RECORD: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))


def probe_attention(module, query, key, value, attention_mask, scaling, kv_routing=None, **kwargs):
    """Plain softmax attention, plus the prefix slot at re-routed layers; records the weights it gives."""
    heads = query.shape[1]
    key, value = repeat_kv(key, heads // key.shape[1]).float(), repeat_kv(value, heads // value.shape[1]).float()
    query = query.float()
    blocked = ~attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask < -1e30
    logits = (query @ key.transpose(-1, -2) * scaling).masked_fill(blocked, float("-inf"))
    real = ~blocked[:, 0].all(-1)  # (B, T) query rows with at least one visible key
    layer = module.layer_idx
    if kv_routing is None or layer not in kv_routing.layers:
        weights = logits.softmax(-1)
        if kv_routing is None:
            RECORD["first token, no re-routing"][layer].append(float(weights[..., 0].mean(1)[real].mean()))
        return (weights @ value).transpose(1, 2).contiguous().to(value.dtype), None
    rows, last = torch.arange(query.shape[0]), kv_routing.last_index
    prefix_key, prefix_value = key[rows, :, last], value[rows, :, last]  # (B, H, D)
    if kv_routing.prefix_rope != "keep":
        cos, sin = (table.float() for table in kv_routing.rotary_tables(module))  # the layer's own (Gemma 3)
        prefix_key = unrotate(prefix_key, cos[rows, last][:, None], sin[rows, last][:, None])
    if kv_routing.prefix_rope == "start":
        prefix_key = rotate(prefix_key, cos[:, :1], sin[:, :1])
    if kv_routing.prefix_rope == "relative0":  # each query sees the key at its own position
        prefix_logit = (query * rotate(prefix_key[:, :, None], cos[:, None], sin[:, None])).sum(-1)
    else:
        prefix_logit = query @ prefix_key[..., None]
        prefix_logit = prefix_logit[..., 0]
    prefix_logit = prefix_logit * scaling + kv_routing.prefix_bias
    weights = torch.cat([prefix_logit[..., None], logits], dim=-1).softmax(-1)
    RECORD["prefix slot"][layer].append(float(weights[..., 0].mean(1)[real].mean()))
    RECORD["first token, re-routed"][layer].append(float(weights[..., 1].mean(1)[real].mean()))
    out = weights[..., :1] * prefix_value[:, :, None] + weights[..., 1:] @ value
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PROBE, probe_attention)
AttentionMaskInterface.register(PROBE, sdpa_mask)


def measure(model, module: KVEmbedding, texts: list[str], bias: float, batch_size: int = 16) -> dict[str, dict[int, float]]:
    """Mean recorded weights per layer for one prefix bias (plain first-token shares from the same batches)."""
    RECORD.clear()
    config = replace(module.config, prefix_bias=bias)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            features = module.preprocess(texts[start : start + batch_size])
            ids, mask = features["input_ids"], features["attention_mask"]
            model(input_ids=ids, attention_mask=mask, kv_routing=kv_routing(model, config, ids, mask))
            model(input_ids=ids, attention_mask=mask)  # plain: the first token's share without re-routing
    return {name: {layer: sum(v) / len(v) for layer, v in sorted(per.items())} for name, per in RECORD.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="qwen25", choices=list(BACKBONES))
    parser.add_argument("--layers", required=True)
    parser.add_argument("--biases", default="3", help="comma-separated prefix biases, one forward pass each")
    parser.add_argument("--rope", default="relative0")
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--source", default="calibration", choices=["calibration", "sts-dev"],
                        help="the first calibration sentences, or STS-B dev sentences (seed 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None,
                        help="write the JSON here too (results/bias_share/BACKBONE/BACKBONE_LAYERS.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = str(BACKBONES[args.backbone].folder())
    if args.source == "calibration":
        texts = load_calibration(limit=args.texts)
    else:
        texts = [a for a, _, _ in random.Random(0).sample(load_sts_b("dev"), args.texts)]
    module = KVEmbedding(KVEmbeddingConfig(base_model=folder, layers=args.layers, prefix_rope=args.rope))
    model = AutoModel.from_pretrained(folder, attn_implementation=PROBE).eval()
    runs = []
    for bias in (float(b) for b in args.biases.split(",")):
        table = measure(model, module, texts, bias)
        share = table["prefix slot"]
        runs.append({"bias": bias, "window_mean_prefix": sum(share.values()) / len(share), "mean_weight": table})
        print(f"bias {bias:g}: prefix slot mean over layers {args.layers} = {runs[-1]['window_mean_prefix']:.3f}")
        for layer in share:
            print(f"  layer {layer:2d}: prefix {share[layer]:.3f}  first token re-routed "
                  f"{table['first token, re-routed'][layer]:.3f}  first token plain {table['first token, no re-routing'][layer]:.3f}")
    result = {"backbone": args.backbone, "layers": args.layers, "rope": args.rope, "texts": args.texts,
              "source": args.source, "runs": runs}
    if args.out:
        write_json(args.out, result, run_assets([args.backbone], [STS_DISTRIBUTION] if args.source == "sts-dev" else []))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
