"""Cost of KV-Embedding against a plain forward pass of the same tokens and against echo embeddings.

For each sequence length L the same text is embedded three ways:

- ``plain``: method ``prompteol`` -- the templated input of exactly L tokens, one ordinary forward pass;
- ``kv``: method ``kv`` -- the same L tokens with K/V re-routing at ``--layers``;
- ``echo``: method ``echo`` -- the same text twice (about 2L tokens), mean over the second copy.

Time: wall-clock of one ``SentenceTransformer.encode`` call (tokenization + forward + pooling), in one
process where the three variants share one loaded backbone (separately loaded copies of the same weights
ran up to 15% apart in matrix-multiply speed), after an untimed warm-up call. Each repeat runs every variant
once, in an order rotated from repeat to repeat; a time ratio is the median over repeats of variant / plain
within one repeat (paired: on a shared VM single calls drifted by +-20%, which pairing largely cancels),
with its min-max over repeats.
Memory: one call per variant in a fresh process, its peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` just before) and, on CUDA, ``max_memory_allocated``. That process runs with a
fixed glibc mmap threshold, so that freed tensors leave RSS at once and the peak is that of live memory,
not of allocator caching (which made identical runs differ by 40 MB); it is not timed, as the setting
slows calls down. All ratios are against ``plain`` from the same run. Offline; SmolLM2-135M-Instruct by default::

    python scripts/bench.py                                  # writes results/bench_smollm2.{json,md}
    python scripts/bench.py --lengths 64,512 --repeats 3     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sentence_transformers import SentenceTransformer

from kvemb_st.assets import load_sts_b, smollm2_folder
from kvemb_st.config import KVEmbeddingConfig
from kvemb_st.module import KVEmbedding

METHOD_OF = {"plain": "prompteol", "kv": "kv", "echo": "echo"}
DEFAULT_BATCH = {64: 4, 512: 4, 2048: 1, 4096: 1}
DEFAULT_REPEATS = {64: 9, 512: 7, 2048: 7, 4096: 6}
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # fixed threshold: big frees go back to the OS at once


def config(variant: str, args: argparse.Namespace) -> KVEmbeddingConfig:
    layers = args.layers if variant == "kv" else ()
    return KVEmbeddingConfig(
        base_model=args.base, method=METHOD_OF[variant], layers=layers, max_seq_length=args.max_seq_length
    )


def build(variant: str, args: argparse.Namespace, backbone: KVEmbedding | None = None) -> SentenceTransformer:
    """One variant; with ``backbone``, it shares that module's loaded model and tokenizer."""
    if backbone is None:
        module = KVEmbedding(config(variant, args))
    else:
        module = KVEmbedding(config(variant, args), backbone.auto_model, backbone.tokenizer)
    return SentenceTransformer(modules=[module], device=args.device)


def text_of_length(model: SentenceTransformer, length: int) -> str:
    """A text (running STS-B sentences) whose ``plain``-templated input is exactly ``length`` tokens."""
    tokenizer = model.tokenizer
    corpus = " ".join(s for pair in load_sts_b("train") for s in pair[:2])
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    overhead = len(model[0].preprocess([""])["input_ids"][0])
    for start in range(64):  # token merges at the cut may make a window miss by one: slide it
        keep = length - overhead
        for _ in range(3):
            text = tokenizer.decode(ids[start : start + keep]).strip()
            n = len(model[0].preprocess([text])["input_ids"][0])
            if n == length:
                return text
            keep += length - n
    raise RuntimeError(f"could not build a text of exactly {length} templated tokens")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    """A fresh process: build one variant, embed the batch once, print that call's peak memory as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.variant, args)
    texts = json.loads(Path(args.texts_file).read_text())
    model.encode(["warm up"])  # lazy initialisation outside the measurement
    before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model.encode(texts, batch_size=len(texts))
    result = {"rss_before_mb": before / 1024, "peak_rss_mb": _rss_kb("VmHWM") / 1024}
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result), flush=True)


def measure_memory(args: argparse.Namespace, variant: str, texts_file: Path) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--worker", "--variant", variant, "--texts-file", str(texts_file),
        "--base", args.base, "--layers", args.layers, "--max-seq-length", str(args.max_seq_length),
        "--device", args.device, "--threads", str(args.threads or 0),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MEMORY_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed_encode(model: SentenceTransformer, texts: list[str], device: str) -> dict[str, float]:
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.encode(texts, batch_size=len(texts))
    sync(device)
    return {"time_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start}


def this_command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def load_models(args: argparse.Namespace) -> dict[str, SentenceTransformer]:
    """The three variants on one shared backbone, warmed up."""
    if args.threads:
        torch.set_num_threads(args.threads)
    plain = build("plain", args)
    models = {"plain": plain, **{v: build(v, args, backbone=plain[0]) for v in ("kv", "echo")}}
    for model in models.values():
        model.encode(["warm up"])
    return models


def profile_ops(args: argparse.Namespace) -> str:
    """Self CPU time per torch op of one ``plain`` and one ``kv`` forward at ``--profile`` tokens, as Markdown.

    Wall-clock ratios on a shared VM drift by several percent from call to call; this splits a kv - plain
    difference into the ops only kv runs (its real cost) and ops both run identically, such as the
    weight matrix multiplies, whose difference is the machine's drift.
    """
    from torch.profiler import profile

    models = load_models(args)
    texts = [text_of_length(models["plain"], args.profile)]
    features = {variant: models[variant][0].preprocess(texts) for variant in ("plain", "kv")}
    self_ms: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for variant in ("plain", "kv"):  # untimed first calls at this length: buffers are first touched here
            models[variant][0].forward(dict(features[variant]))
        for variant in ("plain", "kv"):
            with profile() as prof:
                models[variant][0].forward(dict(features[variant]))
            self_ms[variant] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    ops = sorted(
        set(self_ms["plain"]) | set(self_ms["kv"]),
        key=lambda op: -max(self_ms["kv"].get(op, 0.0), self_ms["plain"].get(op, 0.0)),
    )
    total = {v: sum(ms.values()) for v, ms in self_ms.items()}
    lines = [
        f"One forward pass of {args.profile} templated tokens (batch 1), torch.profiler self CPU time per op, "
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = load_models(args)
    text = {length: text_of_length(models["plain"], length) for length in args.lengths}  # fail before measuring
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for length in args.lengths:
        batch = args.batch or DEFAULT_BATCH.get(length, 1)
        repeats = args.repeats or DEFAULT_REPEATS.get(length, 2)
        texts = [text[length]] * batch
        tokens = {v: int(m[0].preprocess(texts[:1])["attention_mask"].sum()) for v, m in models.items()}
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in models}
        order = list(models)
        for repeat in range(repeats + 1):  # interleaved: a load change on a shared machine hits every variant
            for variant in order[repeat % len(order) :] + order[: repeat % len(order)]:  # rotated: no fixed neighbour
                measured = timed_encode(models[variant], texts, args.device)
                if repeat:  # the first call at a new length warms up
                    runs[variant].append(measured)
        texts_file = out_dir / f".bench_texts_{length}.json"
        texts_file.write_text(json.dumps(texts))
        memory = {v: measure_memory(args, v, texts_file) for v in models}
        texts_file.unlink()
        row = summarise(length, batch, tokens, runs, memory)
        rows.append(row)
        print(f"L={length}: time kv {row['time_ratio']['kv']:.3f}x echo {row['time_ratio']['echo']:.3f}x; "
              f"peak RSS kv {row['peak_rss_ratio']['kv']:.3f}x echo {row['peak_rss_ratio']['echo']:.3f}x", flush=True)
    kv = models["kv"][0].config
    return {
        "command": this_command(),
        "base": args.base,
        "kv_config": {"layers": args.layers, "prefix_rope": kv.prefix_rope, "prefix_bias": kv.prefix_bias},
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }


def summarise(
    length: int,
    batch: int,
    tokens: dict[str, int],
    runs: dict[str, list[dict[str, Any]]],
    memory: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Time ratios against ``plain`` and the memory calls' peaks, as ratios against ``plain``.

    A time ratio is the median over repeats of ``variant / plain`` within the same repeat (paired, so
    that a slow spell of a shared machine cancels); its spread (min-max over repeats) is kept too.
    """
    median = {v: statistics.median(r["time_s"] for r in rs) for v, rs in runs.items()}
    def paired(measure: str) -> dict[str, list[float]]:
        return {v: [r[measure] / p[measure] for r, p in zip(runs[v], runs["plain"])] for v in ("kv", "echo")}

    wall, cpu = paired("time_s"), paired("cpu_s")
    row: dict[str, Any] = {
        "length": length,
        "batch": batch,
        "tokens": tokens,
        "repeats": len(runs["plain"]),
        "time_s": median,
        "times_s": {v: [r["time_s"] for r in rs] for v, rs in runs.items()},
        "cpu_times_s": {v: [r["cpu_s"] for r in rs] for v, rs in runs.items()},
        "memory_mb": {v: {k: m[k] for k in m if k.endswith("_mb")} for v, m in memory.items()},
        "time_ratio": {v: statistics.median(ratios) for v, ratios in wall.items()},
        "time_ratio_range": {v: [min(ratios), max(ratios)] for v, ratios in wall.items()},
        "cpu_ratio": {v: statistics.median(ratios) for v, ratios in cpu.items()},
        "peak_rss_ratio": {v: memory[v]["peak_rss_mb"] / memory["plain"]["peak_rss_mb"] for v in ("kv", "echo")},
        "rss_growth_ratio": {v: _extra(memory[v]) / max(_extra(memory["plain"]), 1e-9) for v in ("kv", "echo")},
    }
    if "cuda_peak_mb" in memory["plain"]:
        plain_cuda = memory["plain"]["cuda_peak_mb"]
        row["cuda_peak_ratio"] = {v: memory[v]["cuda_peak_mb"] / plain_cuda for v in ("kv", "echo")}
    return row


def _span(row: dict[str, Any], variant: str) -> str:
    low, high = row["time_ratio_range"][variant]
    return f"{low:.2f}-{high:.2f}"


def _extra(memory: dict[str, Any]) -> float:
    """Memory the encode call added on top of the loaded model."""
    return memory["peak_rss_mb"] - memory["rss_before_mb"]


def markdown(result: dict[str, Any]) -> str:
    cuda = "cuda_peak_ratio" in result["rows"][0]
    kv = result["kv_config"]
    lines = [
        f"Device: {result['device']}, {result['torch_threads']} torch thread(s), torch {result['torch']}. "
        f"`kv`: layers {kv['layers']}, prefix_rope {kv['prefix_rope']}, prefix_bias {kv['prefix_bias']}. "
        "Time: wall-clock (and process CPU time) of one encode call, all variants on one shared backbone in one "
        "process, interleaved in rotating order; a ratio is the median over repeats of variant / plain within "
        "the same repeat, [min-max] over repeats in brackets; memory: peak of one encode call per variant in a "
        "fresh process (glibc mmap "
        "threshold fixed, see scripts/bench.py). "
        "Ratios are against `plain` (same templated tokens, no re-routing) from the same run; "
        "RSS growth = peak RSS during encode minus RSS of the loaded model.",
        "",
        "| tokens plain = kv / echo | batch | repeats | median plain s | median kv s | median echo s | **kv / plain time** "
        "| echo / plain time | kv / plain CPU time | echo / plain CPU time | plain peak RSS MB "
        "| **kv / plain peak RSS** | echo / plain peak RSS "
        "| kv / plain RSS growth | echo / plain RSS growth"
        + (" | **kv / plain CUDA peak** | echo / plain CUDA peak" if cuda else "")
        + " |",
        "|---" * (15 + (2 if cuda else 0)) + "|",
    ]
    for row in result["rows"]:
        t, m, tokens = row["time_s"], row["memory_mb"], row["tokens"]
        cells = [
            f"{tokens['plain']} / {tokens['echo']}",
            str(row["batch"]),
            str(row["repeats"]),
            f"{t['plain']:.2f}",
            f"{t['kv']:.2f}",
            f"{t['echo']:.2f}",
            f"**{row['time_ratio']['kv']:.3f}** [{_span(row, 'kv')}]",
            f"{row['time_ratio']['echo']:.2f} [{_span(row, 'echo')}]",
            f"{row['cpu_ratio']['kv']:.3f}",
            f"{row['cpu_ratio']['echo']:.2f}",
            f"{m['plain']['peak_rss_mb']:.0f}",
            f"**{row['peak_rss_ratio']['kv']:.3f}**",
            f"{row['peak_rss_ratio']['echo']:.3f}",
            f"{row['rss_growth_ratio']['kv']:.2f}",
            f"{row['rss_growth_ratio']['echo']:.2f}",
        ]
        if cuda:
            cells += [f"**{row['cuda_peak_ratio']['kv']:.3f}**", f"{row['cuda_peak_ratio']['echo']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None, help="base model folder or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--layers", default="20-29", help="re-routed layers of the kv variant")
    parser.add_argument("--lengths", default="64,512,2048,4096", help="comma-separated templated lengths")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 4 up to 512 tokens, else 1)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per length after a warm-up call (default: 9, 7, 7, 6)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/bench_smollm2", help="output path without extension")
    parser.add_argument(
        "--profile", type=int, metavar="TOKENS", help="instead: per-op CPU profile of plain vs kv at TOKENS tokens"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=sorted(METHOD_OF), help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", help=argparse.SUPPRESS)
    parser.add_argument("--max-seq-length", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.base = args.base or str(smollm2_folder())
    if not args.worker:
        args.lengths = [int(x) for x in args.lengths.split(",")]
        args.max_seq_length = 2 * max([*args.lengths, args.profile or 0]) + 64  # room for echo's second copy
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.profile:
        table = profile_ops(args)
        Path(args.out + f"_profile_{args.profile}.md").write_text(table)
        print(table)
        return
    result = run(args)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
