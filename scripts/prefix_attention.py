"""How much attention the re-routed prefix slot draws, per layer, on real sentences (a diagnostic, not a benchmark).

Runs the backbone with an explicit-softmax attention (softmax over ``[prefix; causal keys]``, float32) that
records, at every re-routed layer, the prefix slot's weight averaged over heads and real query tokens, and
the weight the *first* token (the attention sink of most LLMs) gets at the same layers without re-routing.

    python scripts/prefix_attention.py --backbone qwen25 --layers 16-23 --texts 64
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

import torch
from transformers import AttentionInterface, AutoModel
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvemb_st.assets import gemma3_folder, load_sts_b, qwen25_folder, smollm2_folder
from kvemb_st.attention import rotate, unrotate
from kvemb_st.config import KVEmbeddingConfig
from kvemb_st.methods import kv_routing
from kvemb_st.module import KVEmbedding

PROBE = "kvemb_prefix_probe"
BACKBONES = {"smollm2": smollm2_folder, "qwen25": qwen25_folder, "gemma3": gemma3_folder}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="qwen25", choices=list(BACKBONES))
    parser.add_argument("--layers", required=True)
    parser.add_argument("--bias", type=float, default=3.0)
    parser.add_argument("--rope", default="relative0")
    parser.add_argument("--texts", type=int, default=64, help="STS-B dev sentences (seed 0)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = str(BACKBONES[args.backbone]())
    texts = [a for a, _, _ in random.Random(0).sample(load_sts_b("dev"), args.texts)]
    config = KVEmbeddingConfig(base_model=folder, layers=args.layers, prefix_bias=args.bias, prefix_rope=args.rope)
    module = KVEmbedding(config)
    model = AutoModel.from_pretrained(folder, attn_implementation=PROBE).eval()
    with torch.inference_mode():
        for start in range(0, len(texts), 16):
            features = module.preprocess(texts[start : start + 16])
            ids, mask = features["input_ids"], features["attention_mask"]
            model(input_ids=ids, attention_mask=mask, kv_routing=kv_routing(model, config, ids, mask))
            model(input_ids=ids, attention_mask=mask)  # plain: the first token's share without re-routing
    table = {name: {layer: sum(v) / len(v) for layer, v in sorted(per.items())} for name, per in RECORD.items()}
    print(json.dumps({"backbone": args.backbone, "layers": args.layers, "bias": args.bias, "rope": args.rope,
                      "texts": args.texts, "mean_weight": table}))
    for layer in sorted(table["prefix slot"]):
        print(f"layer {layer:2d}: prefix {table['prefix slot'][layer]:.3f}  first token re-routed "
              f"{table['first token, re-routed'][layer]:.3f}  first token plain {table['first token, no re-routing'][layer]:.3f}")


if __name__ == "__main__":
    main()
