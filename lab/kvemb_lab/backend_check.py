"""Every SDPA backend forced in turn against float64 math: ``attention_with_lse`` and whole-model states.

For each backend (flash, memory-efficient, cuDNN, math), forced with ``torch.nn.attention.sdpa_kernel``:

- *kernel*: ``attention_with_lse`` (unchecked: the private op through our wrapper) on random q/k/v, head dim 12
  and 128, GQA and MHA, a padding mask and ``is_causal``; output and log-sum-exp against float64 math on CPU;
- *model*: a random Llama (3 layers, two re-routed) on a right-padded batch, the mask dropped and kept, head dim
  12 and 128 with GQA; real-token hidden states against the same model in float64 with math SDPA (the portable
  path), once through the self-check and once with it off (the bare fast path), plus the path the self-check chose.

It prints ``_fused_sdp_choice`` (SDPA's own pick, nothing forced) and the cuDNN version, and writes the tables to
``OUT/backend_check.{md,json}``. Exit status 1 if any fast path that ran is off by more than the dtype's limit.

    python tools/backend_check.py --device cuda --out results/gpu      # on a GPU (tools/gpu_check.sh run)
    python tools/backend_check.py --device cpu --tiny --out /tmp/bc    # the dry run on CPU (tested)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModel, LlamaConfig

from kvemb_st import kernel_check
from kvemb_st.attention import kernels
from kvemb_st.config import KVEmbeddingConfig
from kvemb_st.methods import kv_routing

BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
HEAD_DIMS = (12, 128)
# relative max error against float64 (max |got - want| / max |want|); log-sum-exp: max absolute error
LIMITS = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
MODEL_LIMITS = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def environment(device: str) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "hip": torch.version.hip,
    }


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    error = (got.double().cpu() - want).abs().max() / want.abs().max()
    return float(error.nan_to_num(nan=math.inf))


def reference(q, k, v, mask, scale):
    """Float64 math attention on CPU, K/V repeated to the query heads: output and log-sum-exp."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.double().cpu().repeat_interleave(rep, dim=1) for t in (k, v))
    scores = q.double().cpu() @ k.transpose(-1, -2) * scale
    visible = torch.ones_like(scores, dtype=torch.bool).tril() if mask is None else mask.cpu()
    scores = scores.masked_fill(~visible, -math.inf)
    return scores.softmax(-1) @ v, scores.logsumexp(-1)


def padding_mask(batch: int, length: int) -> torch.Tensor:
    """(B, T) right padding: row 0 full, the others shorter."""
    lengths = torch.tensor([length] + [max(1, length * (batch - i) // (batch + 1)) for i in range(1, batch)])
    return (torch.arange(length)[None] < lengths[:, None]).long()


def forced(backend: SDPBackend | None):
    return contextlib.nullcontext() if backend is None else sdpa_kernel([backend])


def kernel_rows(args: argparse.Namespace, dtype: torch.dtype) -> list[dict[str, Any]]:
    batch, heads, length = (2, 4, 37) if args.tiny else (2, 8, 300)
    rows = []
    for dim in HEAD_DIMS:
        for kv_heads in (heads // 2, heads):
            for masked in (False, True):
                torch.manual_seed(0)
                q = torch.randn(batch, length, heads, dim).transpose(1, 2).to(args.device, dtype)  # transformers' layout
                k, v = (torch.randn(batch, length, kv_heads, dim).transpose(1, 2).to(args.device, dtype) for _ in "kv")
                mask = None
                if masked:
                    causal = torch.ones(length, length, dtype=torch.bool).tril()
                    mask = (causal[None, None] & padding_mask(batch, length).bool()[:, None, None]).to(args.device)
                module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
                scale = dim**-0.5
                want_out, want_lse = reference(q, k, v, mask, scale)
                case = {"head_dim": dim, "heads": f"{heads}/{kv_heads}", "mask": "mask" if masked else "causal"}
                for backend in [None, *BACKENDS]:
                    row = {**case, "forced": backend.name if backend else "none (SDPA's choice)"}
                    with forced(backend):
                        sdpa = kernels.sdpa_arguments(module, q, k, v, mask)
                        try:
                            row["chosen"] = kernels.sdpa_backend(q, sdpa, scale).name
                        except RuntimeError as err:
                            row.update(chosen="-", path="not available", note=str(err).split("\n")[0][:80])
                            rows.append(row)
                            continue
                        try:
                            plain = kernels.attention_with_lse(module, q, k, v, mask, scale)
                        except Exception as err:  # noqa: BLE001 - reported, and the self-check would fall back
                            row.update(path="error", note=f"{type(err).__name__}: {str(err)[:80]}", ok=False)
                            rows.append(row)
                            continue
                    if plain is None:
                        row["path"] = "no LSE op (portable path)"
                    else:
                        out, lse = plain
                        row.update(path="lse op", out_error=relative(out, want_out))
                        row["lse_error"] = float((lse.double().cpu() - want_lse).abs().max().nan_to_num(nan=math.inf))
                        row["ok"] = row["out_error"] < LIMITS[dtype] and row["lse_error"] < LIMITS[dtype] * 10
                    rows.append(row)
    return rows


def model_rows(args: argparse.Namespace, dtype: torch.dtype) -> list[dict[str, Any]]:
    batch, heads, length = (3, 4, 40) if args.tiny else (4, 8, 300)
    ids = torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = padding_mask(batch, length)
    real = mask.bool()
    kv = KVEmbeddingConfig(base_model="random-llama", layers=[1, 2], prefix_rope="relative0", prefix_bias=3.0)
    rows = []
    for dim in HEAD_DIMS:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                             num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=dim,
                             max_position_embeddings=4096)  # fmt: skip
        cpu = AutoModel.from_config(config, attn_implementation="kvemb_reroute").eval().double()
        model = AutoModel.from_config(config, attn_implementation="kvemb_reroute").eval()
        model.load_state_dict(cpu.state_dict())
        model = model.to(args.device, dtype)
        for mask_kept in (False, True):

            def states(net: torch.nn.Module, on: str) -> torch.Tensor:
                routing = kv_routing(net, kv, ids.to(on), mask.to(on))
                if mask_kept:
                    routing = dataclasses.replace(routing, right_padded=False)
                with torch.no_grad():
                    out = net(input_ids=ids.to(on), attention_mask=mask.to(on), kv_routing=routing).last_hidden_state
                return out.double().cpu()[real]

            with sdpa_kernel([SDPBackend.MATH]):
                want = states(cpu, "cpu")
            case = {"head_dim": dim, "heads": f"{heads}/{heads // 2}", "mask": "kept" if mask_kept else "dropped"}
            for backend in BACKENDS:
                row = {**case, "forced": f"{backend.name} (+ MATH for the rest)"}
                enabled = [backend] if backend == SDPBackend.MATH else [backend, SDPBackend.MATH]
                with sdpa_kernel(enabled):
                    kernel_check.reset()
                    row["checked_error"] = relative(states(model, args.device), want)
                    row["path"] = "; ".join(f"{v.path} ({v.error})" for v in kernel_check.results().values()) or (
                        "prefix_channel (no LSE op)"
                    )
                    os.environ[kernel_check.ENV] = "0"
                    try:
                        row["unchecked_error"] = relative(states(model, args.device), want)
                    except Exception as err:  # noqa: BLE001 - the bare fast path may raise; the checked one may not
                        row["unchecked_error"], row["note"] = math.inf, f"{type(err).__name__}: {str(err)[:80]}"
                    finally:
                        os.environ.pop(kernel_check.ENV)
                row["ok"] = row["checked_error"] < MODEL_LIMITS[dtype]
                rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1e}"
    return "" if value is None else str(value)


def table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    return lines + ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tiny", action="store_true", help="small shapes (the CPU dry run)")
    parser.add_argument("--out", default="results/gpu")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    result = {"environment": environment(args.device), "dtype": args.dtype, "tiny": args.tiny}
    result["kernel"] = kernel_rows(args, dtype)
    result["model"] = model_rows(args, dtype)
    env = result["environment"]
    lines = [
        f"# Backends forced one by one, {args.dtype}, against float64 math",
        "",
        f"torch {env['torch']}, {env['device']}, cuDNN {env['cudnn']}, HIP {env['hip']}.",
        "",
        "Kernel: `attention_with_lse` (the private op through our wrapper, unchecked); relative max error of the "
        "output, max absolute error of the log-sum-exp. `chosen` is `_fused_sdp_choice` under the forcing; the rows "
        "'none' are SDPA's own choice.",
        "",
        *table(result["kernel"], ["head_dim", "heads", "mask", "forced", "chosen", "path", "out_error", "lse_error", "ok", "note"]),
        "",
        "Model: random Llama, 3 layers (1, 2 re-routed), real-token states vs the float64 model with math SDPA; "
        "*checked* = the default (self-checked) path, *unchecked* = KVEMB_SELF_CHECK=0.",
        "",
        *table(result["model"], ["head_dim", "heads", "mask", "forced", "checked_error", "unchecked_error", "path", "ok", "note"]),
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backend_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "backend_check.md").write_text("\n".join(lines))
    print("\n".join(lines))
    ok = all(row.get("ok", True) for row in result["kernel"] + result["model"])
    print("PASS" if ok else "FAIL")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
