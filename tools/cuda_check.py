"""CUDA path of the re-routing attention against the CPU path (which the tests check against the loop reference).

Random-weight backbone of the Qwen3-0.6B attention shape (4 layers), fp32 and bf16, padded and unpadded batches,
rope ``relative0`` and ``keep``, both the log-sum-exp kernel path and the prefix-channel fallback. Prints the
relative max error of each case, which kernel SDPA picked for the re-routed layers, then PASS or FAIL. Run by
``tools/gpu_check.sh run`` on a lent GPU; ``python tools/cuda_check.py cpu 40`` runs it on CPU (a smoke check).

    python tools/cuda_check.py [DEVICE] [LENGTH]
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys

import torch
from torch.nn.attention import SDPBackend
from transformers import AutoModel, Qwen3Config

import kvemb_st  # noqa: F401  (registers the attention)
from kvemb_st import kernel_check
from kvemb_st.attention import kernels, reroute
from kvemb_st.config import KVEmbeddingConfig
from kvemb_st.methods import kv_routing

LIMITS = {"torch.float32": 1e-4, "torch.bfloat16": 3e-2}


class _ChoiceSpy:
    """Stands in for ``torch.ops.aten`` in :mod:`kvemb_st.attention.kernels` and counts the backend SDPA picks."""

    def __init__(self) -> None:
        self.chosen: collections.Counter = collections.Counter()

    def __getattr__(self, name: str):
        return getattr(torch.ops.aten, name)

    def _fused_sdp_choice(self, *args, **kwargs):
        backend = torch.ops.aten._fused_sdp_choice(*args, **kwargs)
        self.chosen[(str(args[0].dtype), SDPBackend(backend).name)] += 1
        return backend


def main(device: str = "cuda", length: int = 300) -> bool:
    torch.manual_seed(0)
    shape = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    config = Qwen3Config(vocab_size=1000, num_hidden_layers=4, max_position_embeddings=4096, **shape)
    cpu = AutoModel.from_config(config, attn_implementation="kvemb_reroute").eval()
    ids = torch.randint(0, 1000, (4, length))
    masks = {"padded": torch.ones_like(ids), "unpadded": torch.ones_like(ids)}
    masks["padded"][1, length * 2 // 3 :] = 0
    masks["padded"][2, 37:] = 0
    spy = _ChoiceSpy()
    kernels._ATEN = spy
    real_lse = reroute.checked_attention_with_lse

    def hidden(model, on: str, dtype: torch.dtype, kv: KVEmbeddingConfig, mask: torch.Tensor) -> torch.Tensor:
        model = model.to(on, dtype)
        routing = kv_routing(model, kv, ids.to(on), mask.to(on))
        with torch.no_grad():
            out = model(input_ids=ids.to(on), attention_mask=mask.to(on), kv_routing=routing).last_hidden_state
        return out.float().cpu()[mask.bool()]

    worst: dict[str, float] = {}
    try:
        for rope in ("relative0", "keep"):
            kv = KVEmbeddingConfig(base_model="random-qwen3-0.6b-shape", layers=[1, 2, 3], prefix_rope=rope)
            for name, mask in masks.items():
                reroute.checked_attention_with_lse = real_lse
                want = hidden(cpu, "cpu", torch.float32, kv, mask)
                for dtype in (torch.float32, torch.bfloat16):
                    for path in ("lse", "prefix_channel"):
                        reroute.checked_attention_with_lse = real_lse if path == "lse" else (lambda *args, **kwargs: None)
                        got = hidden(copy.deepcopy(cpu), device, dtype, kv, mask)
                        err = ((got - want).abs().max() / want.abs().max()).item()
                        worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
                        print(f"{rope:9s} {name:8s} {str(dtype):14s} {path:14s} {device} vs cpu fp32: {err:.2e}")
    finally:
        reroute.checked_attention_with_lse = real_lse
        kernels._ATEN = torch.ops.aten
    print("backends chosen for re-routed layers:", dict(spy.chosen))
    print("attention path per combination (self-check):\n" + kernel_check.summary())
    ok = all(worst[k] < LIMITS[k] for k in worst)
    print("PASS" if ok else f"FAIL {worst}")
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("device", nargs="?", default="cuda")
    parser.add_argument("length", nargs="?", type=int, default=300, help="tokens of the longest text")
    args = parser.parse_args()
    sys.exit(0 if main(args.device, args.length) else 1)
