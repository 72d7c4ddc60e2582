"""The measurements of one benchmark grid point: texts of an exact templated length, paired interleaved timings,
memory peaks (CUDA activations, or peak RSS of a fresh worker process on CPU), the tokenization ratio and an op
profile. How each is defined: ``tools/bench.py --help`` (:mod:`kvemb_lab.bench.cli`)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer

from kvemb_st import KVEmbedding
from kvemb_st.template import Template

from kvemb_lab.assets import load_sts_b
from kvemb_lab.bench.tokenization import running_texts, tokenization_ratio
from kvemb_lab.bench.variants import load_models

DEFAULT_REPEATS = {64: 9, 512: 7, 2048: 7, 4096: 6}  # any other length: 7
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # fixed threshold: big frees go back to the OS at once


@functools.cache
def corpus_ids(tokenizer: Any) -> list[int]:
    """Running STS-B train sentences as one token sequence: ~140k tokens of ordinary English."""
    corpus = " ".join(s for pair in load_sts_b("train") for s in pair[:2])
    return tokenizer(corpus, add_special_tokens=False)["input_ids"]


def templated_length(module: KVEmbedding, text: str) -> int:
    return len(module.preprocess([text])["input_ids"][0])


def text_of_length(module: KVEmbedding, length: int) -> str:
    """A text (running STS-B sentences) whose templated input is exactly ``length`` tokens."""
    ids = corpus_ids(module.tokenizer)
    overhead = templated_length(module, "")
    for offset in range(64):  # token merges at the cut may make a window miss by one: slide it
        keep = length - overhead
        for _ in range(3):
            text = module.tokenizer.decode(ids[offset : offset + keep]).strip()
            n = templated_length(module, text)
            if n == length:
                return text
            keep += length - n
    raise RuntimeError(f"could not build a text of exactly {length} templated tokens")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def on_device(features: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def timed(call: Callable[[], Any], device: str) -> dict[str, float]:
    """Wall-clock and process CPU time of one call, CUDA synchronised on both sides."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    call()
    sync(device)
    return {"time_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start}


def forward_call(module: KVEmbedding, features: dict[str, Any]) -> Callable[[], Any]:
    def call() -> Any:
        with torch.inference_mode():
            return module.forward(dict(features))  # forward adds keys: keep the prepared features clean

    return call


def paired(runs: dict[str, list[float]], baseline: str) -> dict[str, dict[str, Any]]:
    """Median and min-max over repeats of ``variant / baseline`` within the same repeat, per variant."""
    out = {}
    for variant, values in runs.items():
        if variant == baseline:
            continue
        ratios = [v / b for v, b in zip(values, runs[baseline], strict=True)]
        out[variant] = {"median": statistics.median(ratios), "range": [min(ratios), max(ratios)]}
    return out


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, list[dict[str, float]]]:
    """``repeats`` timed rounds of every call, in an order rotated each round, after one untimed round.

    Interleaving spreads a load change of a shared machine over every variant; rotating gives no variant a
    fixed neighbour; the untimed round pays first-touch costs at a new size.
    """
    order = list(calls)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in order}
    for repeat in range(repeats + 1):
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
            measured = timed(calls[name], device)
            if repeat:
                runs[name].append(measured)
    return runs


def _rss_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def worker(args: argparse.Namespace) -> None:
    """A fresh process: build one variant, embed the texts once, print that call's peak RSS as JSON."""
    args.variants = [args.variant]
    model = load_models(args)[args.variant]
    texts = json.loads(Path(args.texts_file).read_text())
    before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    model.encode(texts, batch_size=len(texts))
    print(json.dumps({"rss_before_mb": before / 1024, "peak_rss_mb": _rss_kb("VmHWM") / 1024}), flush=True)


def worker_command(args: argparse.Namespace, variant: str, texts_file: Path) -> list[str]:
    """The benchmark command in worker mode, with the options that rebuild the same backbone and variant."""
    source = ["--shape", args.shape, "--tokenizer", str(args.tokenizer)] if args.shape else ["--base", args.base]
    return [
        sys.executable, "-m", "kvemb_lab.bench.cli", "--worker", "--variant", variant, "--texts-file", str(texts_file), *source,
        "--dtype", args.dtype, "--layers", args.layers, "--max-seq-length", str(args.max_seq_length),
        "--device", args.device, "--threads", str(args.threads or 0),
    ]  # fmt: skip


def rss_peaks(args: argparse.Namespace, texts: list[str], out_dir: Path) -> dict[str, dict[str, float]]:
    """Peak RSS of one encode call per variant, each in a fresh process (CPU)."""
    texts_file = out_dir / f".bench_texts_{os.getpid()}.json"
    texts_file.write_text(json.dumps(texts))
    peaks = {}
    try:
        for variant in args.variants:
            command = worker_command(args, variant, texts_file)
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MEMORY_ENV})
            if done.returncode != 0:
                raise RuntimeError(f"memory worker for {variant} failed:\n{done.stderr[-3000:]}")
            peaks[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        texts_file.unlink()
    return peaks


def activation_peak_mib(call: Callable[[], Any]) -> float:
    """CUDA memory one call allocates at its peak on top of what was allocated before (the weights)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def memory_columns(peaks: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Ratios against plain of whichever peaks were measured: CUDA activation peak, or RSS (peak and growth)."""
    variants = [v for v in peaks if v != "plain"]
    plain = peaks["plain"]
    if "activation_mib" in plain:
        return {"activation_peak_ratio": {v: peaks[v]["activation_mib"] / plain["activation_mib"] for v in variants}}

    def growth(p: dict[str, float]) -> float:  # what the encode call added on top of the loaded model
        return p["peak_rss_mb"] - p["rss_before_mb"]

    return {
        "peak_rss_ratio": {v: peaks[v]["peak_rss_mb"] / plain["peak_rss_mb"] for v in variants},
        "rss_growth_ratio": {v: growth(peaks[v]) / max(growth(plain), 1e-9) for v in variants},
    }


def measure_point(
    args: argparse.Namespace, models: dict[str, SentenceTransformer], length: int, batch: int, out_dir: Path
) -> dict[str, Any]:
    """One grid point: forward-only and end-to-end timings, tokens, memory."""
    modules = {v: m[0] for v, m in models.items()}
    texts = [text_of_length(modules["plain"], length)] * batch
    features = {v: on_device(module.preprocess(texts), args.device) for v, module in modules.items()}
    calls: dict[str, Callable[[], Any]] = {}
    for v in models:
        calls[f"forward/{v}"] = forward_call(modules[v], features[v])
        calls[f"encode/{v}"] = functools.partial(models[v].encode, texts, batch_size=batch)
    runs = interleaved(calls, args.repeats or DEFAULT_REPEATS.get(length, 7), args.device)

    def series(kind: str, measure: str = "time_s") -> dict[str, list[float]]:
        return {v: [r[measure] for r in runs[f"{kind}/{v}"]] for v in models}

    if args.device.startswith("cuda"):
        peaks = {v: {"activation_mib": activation_peak_mib(calls[f"forward/{v}"])} for v in models}
    else:
        peaks = rss_peaks(args, texts, out_dir) if args.rss else {}
    forward, encode = series("forward"), series("encode")
    return {
        "length": length,
        "batch": batch,
        "tokens": {v: int(f["attention_mask"][0].sum()) for v, f in features.items()},
        "repeats": len(runs["forward/plain"]),
        "forward_s": {v: statistics.median(t) for v, t in forward.items()},
        "forward_ratio": paired(forward, "plain"),
        "encode_s": {v: statistics.median(t) for v, t in encode.items()},
        "encode_ratio": paired(encode, "plain"),
        "encode_cpu_ratio": paired(series("encode", "cpu_s"), "plain"),
        "times_s": {name: [r["time_s"] for r in rs] for name, rs in runs.items()},
        "memory": peaks,
        **(memory_columns(peaks) if peaks else {}),
    }


def measure_tokenization(args: argparse.Namespace, models: dict[str, SentenceTransformer]) -> dict[str, Any]:
    """The same N texts through the ``kv`` (else ``plain``) template, cut to M tokens and uncut.

    The measurement is ``tools/bench_tokenize.py``'s (one definition of the ratio the issue targets); the
    uncut case gives the texts room (``4 * T`` tokens), so both cases tokenize the same strings.
    """
    n, tokens, max_length = args.tokenize
    variant = "kv" if "kv" in models else "plain"
    module = models[variant][0]
    template = Template.parse(module.config.template)
    texts = running_texts(module.tokenizer, template, n, tokens)
    repeats = args.repeats or 7
    return {
        "texts": n,
        "tokens": tokens,
        "variant": variant,
        **{
            case: tokenization_ratio(module.tokenizer, template, texts, length, repeats)
            for case, length in (("cut", max_length), ("fit", 4 * tokens))
        },
    }


def profile_ops(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Self CPU time (ms) per torch op of one ``plain`` and one ``kv`` forward at ``--profile`` tokens.

    Wall-clock ratios on a shared VM drift by several percent from call to call; this splits a kv - plain
    difference into the ops only kv runs (its real cost) and ops both run identically, such as the
    weight matrix multiplies, whose difference is the machine's drift.
    """
    from torch.profiler import profile

    args.variants = ["plain", "kv"]
    models = load_models(args)
    texts = [text_of_length(models["plain"][0], args.profile)]
    calls = {v: forward_call(models[v][0], on_device(models[v][0].preprocess(texts), args.device)) for v in models}
    self_ms: dict[str, dict[str, float]] = {}
    for call in calls.values():  # untimed first calls at this length: buffers are first touched here
        call()
    for variant, call in calls.items():
        with profile() as prof:
            call()
        self_ms[variant] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    return self_ms
