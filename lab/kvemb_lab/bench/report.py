"""The benchmark's report: JSON as measured, and the Markdown tables published from it."""

from __future__ import annotations

import platform
import sys
from collections.abc import Iterable
from typing import Any

import torch

from kvemb_lab.evaluation import write_result
from kvemb_lab.provenance import public_command


def this_command() -> str:
    return "python " + public_command(sys.argv)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({platform.machine()})"


def write(result: dict[str, Any], out: str, assets: Iterable[str] = ()) -> None:
    """``out.json`` (as measured, with its provenance) and ``out.md``."""
    write_result(out, result, markdown(result), assets)


def _ratio(ratio: dict[str, Any], digits: int = 3) -> str:
    low, high = ratio["range"]
    return f"{ratio['median']:.{digits}f} [{low:.2f}-{high:.2f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    others = list(rows[0]["forward_ratio"])
    kv, backbone = result["kv_config"], result["backbone"]
    shape = result["shape"]
    source = f"random weights, shape {shape['name']} ({shape['source']})" if shape else result["base"]
    lines = [
        f"Device: {result['device']}, {result['torch_threads']} torch thread(s), torch {result['torch']}. "
        f"Backbone: {source}: {backbone['model_type']}, {backbone['layers']} layers, {backbone['heads']} / "
        f"{backbone['kv_heads']} heads, head dim {backbone['head_dim']}, {backbone['parameters'] / 1e6:.0f}M "
        f"parameters, {backbone['dtype']}. `kv`: layers {kv['layers']}, prefix_rope {kv['prefix_rope']}, "
        f"prefix_bias {kv['prefix_bias']}; `kv_keep`: the same with prefix_rope keep.",
        "",
        "Time: *forward* = `module.forward` on features already tokenised and on the device, *encode* = one "
        "end-to-end `encode` call; all variants on one shared backbone in one process, interleaved in rotating "
        "order; a ratio is the median over repeats of variant / plain within the same repeat, [min-max] over "
        "repeats in brackets (see tools/bench.py).",
        "",
    ]
    header = ["tokens " + " / ".join(rows[0]["tokens"]), "batch", "repeats", "plain forward s"]
    header += [f"**{v} / plain forward**" for v in others] + ["plain encode s"]
    header += [f"{v} / plain encode" for v in others] + [f"{v} / plain encode CPU time" for v in others]
    lines += _table(header, [
        [" / ".join(str(n) for n in row["tokens"].values()), str(row["batch"]), str(row["repeats"]),
         f"{row['forward_s']['plain']:.3f}", *(f"**{_ratio(row['forward_ratio'][v])}**" for v in others),
         f"{row['encode_s']['plain']:.3f}", *(_ratio(row["encode_ratio"][v]) for v in others),
         *(f"{row['encode_cpu_ratio'][v]['median']:.3f}" for v in others)]
        for row in rows
    ])  # fmt: skip
    if "activation_peak_ratio" in rows[0]:
        lines += ["", "Memory: CUDA `max_memory_allocated` during one forward minus the memory allocated before it "
                  "(activations only, weights excluded).", ""]  # fmt: skip
        header = ["tokens x batch", "plain activation peak MiB", *(f"**{v} / plain activation peak**" for v in others)]
        lines += _table(header, [
            [f"{row['length']}x{row['batch']}", f"{row['memory']['plain']['activation_mib']:.0f}",
             *(f"**{row['activation_peak_ratio'][v]:.3f}**" for v in others)]
            for row in rows
        ])  # fmt: skip
    elif "peak_rss_ratio" in rows[0]:
        lines += ["", "Memory: peak RSS of one encode call per variant in a fresh process (glibc mmap threshold "
                  "fixed, see tools/bench.py); RSS growth = peak RSS during encode minus RSS of the loaded model.",
                  ""]  # fmt: skip
        header = ["tokens x batch", "plain peak RSS MB", *(f"**{v} / plain peak RSS**" for v in others)]
        header += [f"{v} / plain RSS growth" for v in others]
        lines += _table(header, [
            [f"{row['length']}x{row['batch']}", f"{row['memory']['plain']['peak_rss_mb']:.0f}",
             *(f"**{row['peak_rss_ratio'][v]:.3f}**" for v in others),
             *(f"{row['rss_growth_ratio'][v]:.2f}" for v in others)]
            for row in rows
        ])  # fmt: skip
    tokenization = result["tokenization"]
    if tokenization:
        lines += [
            "",
            f"Tokenization (tools/bench_tokenize.py): {tokenization['texts']} texts of >= {tokenization['tokens']} "
            f"templated tokens (`{tokenization['variant']}` template), `TemplateTokenizer.encode` (what `preprocess` "
            "runs) against one batched tokenizer call over the same templated, uncut texts; median of paired ratios.",
            "",
        ]
        header = ["case", "max_seq_length", "texts cut", "tokens dropped", "one tokenizer call ms", "preprocess ms"]
        header.append("**preprocess / one call**")
        lines += _table(header, [
            [case, str(cost["max_length"]), str(cost["cut"]), str(cost.get("tokens_dropped", "")),
             f"{cost['baseline_ms']:.1f}", f"{cost['encode_ms']:.1f}", f"**{cost['ratio']:.2f}**"]
            for case, cost in ((c, tokenization[c]) for c in ("fit", "cut"))
        ])  # fmt: skip
    if result.get("attention_paths"):
        lines += ["", "Re-routed attention path (kernel, self-check):", "", *(f"- {p}" for p in result["attention_paths"].splitlines())]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def profile_markdown(self_ms: dict[str, dict[str, float]], tokens: int) -> str:
    """The 25 most expensive ops, then every other op that only kv runs."""
    ops = sorted(
        set(self_ms["plain"]) | set(self_ms["kv"]),
        key=lambda op: -max(self_ms["kv"].get(op, 0.0), self_ms["plain"].get(op, 0.0)),
    )
    total = {v: sum(ms.values()) for v, ms in self_ms.items()}
    lines = [
        f"One forward pass of {tokens} templated tokens (batch 1), torch.profiler self CPU time per op, "
        f"{torch.get_num_threads()} thread(s). kv / plain total: {total['kv'] / total['plain']:.3f}.",
        "",
        "The 25 most expensive ops, then every other op that only kv runs.",
        "",
        "| op | plain ms | kv ms | kv - plain ms |",
        "|---|---|---|---|",
    ]
    kv_only = [op for op in ops[25:] if op not in self_ms["plain"]]
    for op in ops[:25] + kv_only:
        plain_ms, kv_ms = self_ms["plain"].get(op, 0.0), self_ms["kv"].get(op, 0.0)
        lines.append(f"| `{op}` | {plain_ms:.1f} | {kv_ms:.1f} | {kv_ms - plain_ms:+.1f} |")
    lines.append(f"| **total** | {total['plain']:.1f} | {total['kv']:.1f} | {total['kv'] - total['plain']:+.1f} |")
    lines += ["", f"Command: `{this_command()}`", ""]
    return "\n".join(lines)
