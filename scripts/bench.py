"""Cost of KV-Embedding against a plain forward pass of the same tokens and against echo embeddings.

For each grid point (L tokens x batch B) the same texts are embedded four ways:

- ``plain``: method ``prompteol`` -- the templated input of exactly L tokens, one ordinary forward pass;
- ``kv``: method ``kv`` -- the same L tokens with K/V re-routing at ``--layers`` (default: the last third
  of the layers) and the default knobs;
- ``kv_keep``: as ``kv`` with ``prefix_rope="keep"`` (no re-rotation of the prefix key);
- ``echo``: method ``echo`` -- the same text twice (about 2L tokens), mean over the second copy.

Backbone: a real model (``--base``, default SmolLM2-135M-Instruct, offline) or, with ``--shape``, a
random-weight model of a real model's shape built with ``AutoModel.from_config`` (no download: a forward
pass costs the same whatever the weight values), with the SmolLM2 tokenizer (``--tokenizer``).

Time, two columns, both paired and interleaved: *forward* is ``module.forward`` alone on features tokenised
and moved to the device beforehand (under ``inference_mode``; CUDA synchronised around the call), *encode*
is one end-to-end ``SentenceTransformer.encode`` call (tokenization + forward + pooling + copy back). All
variants share one loaded backbone in one process (separately loaded copies of the same weights ran up to 15%
apart in matrix-multiply speed); each repeat runs every variant once, in an order rotated from repeat to
repeat, after an untimed first repeat; a ratio is the median over repeats of variant / plain within one
repeat (paired: on a shared VM single calls drifted by +-20%, which pairing largely cancels), with its
min-max over repeats.

Memory: on CUDA, the activation peak of one forward call: ``max_memory_allocated`` during the call minus
the memory allocated before it (the weights). On CPU, one encode call per variant in a fresh process, its
peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` just before); that process runs with a fixed
glibc mmap threshold, so that freed tensors leave RSS at once and the peak is that of live memory, not of
allocator caching (which made identical runs differ by 40 MB); it is not timed, as the setting slows calls down.

Tokenization: ``preprocess`` (the template tokenizer) of N texts of at least T templated tokens
(``--tokenize NxT@M``), cut to ``max_seq_length`` M and uncut, each as a ratio to one batched tokenizer call
over the same templated, uncut texts (``scripts/bench_tokenize.py``'s measurement).

All ratios are against ``plain`` (or the plain tokenizer call) from the same run::

    python scripts/bench.py                                  # writes results/bench_smollm2.{json,md}
    python scripts/bench.py --lengths 64,512 --repeats 3     # a quick look
    python scripts/bench.py --shape llama3-8b --dtype bf16 --device cuda --grid 128x64,512x16,2048x4,8192x1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from kvemb_st import KVEmbedding, KVEmbeddingConfig, kernel_check
from kvemb_st.assets import load_sts_b, smollm2_folder
from kvemb_st.prompting import Template

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script, also when loaded by path (tests)
from bench_tokenize import running_texts, tokenization_ratio  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {  # KVEmbeddingConfig fields of each variant
    "plain": {"method": "prompteol"},
    "kv": {"method": "kv"},
    "kv_keep": {"method": "kv", "prefix_rope": "keep"},
    "echo": {"method": "echo"},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_BATCH = {64: 4, 512: 4, 2048: 1, 4096: 1}
DEFAULT_REPEATS = {64: 9, 512: 7, 2048: 7, 4096: 6}  # any other length: 7
ISSUE_GRID = "128x64,512x16,2048x4,8192x1"
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # fixed threshold: big frees go back to the OS at once


class Shape(NamedTuple):
    """The numbers of a real model's ``config.json`` that set the cost of a forward pass.

    (A NamedTuple, not a dataclass: the tests load this script without registering it in ``sys.modules``.)
    """

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    vocab: int
    tied_embeddings: bool
    max_positions: int
    qkv_bias: bool = False  # Qwen2 has it built in (transformers hard-codes bias=True for q/k/v)
    extra: tuple[tuple[str, Any], ...] = ()  # other config.json keys that change the forward pass
    source: str = ""

    def config(self, min_vocab: int) -> Any:
        """A transformers config of this shape; the vocabulary grows to ``min_vocab`` if the tokenizer needs it."""
        return AutoConfig.for_model(
            self.model_type,
            num_hidden_layers=self.layers,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            vocab_size=max(self.vocab, min_vocab),
            tie_word_embeddings=self.tied_embeddings,
            max_position_embeddings=self.max_positions,
            attention_bias=self.qkv_bias,
            **dict(self.extra),
        )


HF = "https://huggingface.co"
SHAPES: dict[str, Shape] = {  # copied from each model's config.json on the Hub (URL in `source`)
    "qwen3-0.6b": Shape("qwen3", 28, 1024, 3072, 16, 8, 128, 1_000_000.0, 151_936, True, 40_960,
                        source=f"{HF}/Qwen/Qwen3-0.6B/blob/main/config.json"),
    "llama3-8b": Shape("llama", 32, 4096, 14_336, 32, 8, 128, 500_000.0, 128_256, False, 8192,
                       source=f"{HF}/meta-llama/Meta-Llama-3-8B/blob/main/config.json"),
    "mistral-7b": Shape("mistral", 32, 4096, 14_336, 32, 8, 128, 1_000_000.0, 32_768, False, 32_768,
                        extra=(("sliding_window", None),),
                        source=f"{HF}/mistralai/Mistral-7B-v0.3/blob/main/config.json"),
    "qwen2.5-0.5b": Shape("qwen2", 24, 896, 4864, 14, 2, 64, 1_000_000.0, 151_936, True, 32_768, qkv_bias=True,
                          source=f"{HF}/Qwen/Qwen2.5-0.5B/blob/main/config.json"),
    "smollm2-135m": Shape("llama", 30, 576, 1536, 9, 3, 64, 100_000.0, 49_152, True, 8192,
                          source=f"{HF}/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json"),
    "tiny": Shape("llama", 4, 64, 128, 4, 2, 16, 10_000.0, 49_152, True, 32_768,
                  source="made up for smoke tests (GQA, 4 layers)"),
}  # fmt: skip


def random_backbone(shape: Shape, min_vocab: int, dtype: torch.dtype, device: str) -> PreTrainedModel:
    """A random-weight base model of ``shape`` with the re-routing attention, built on ``device`` directly."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(shape.config(min_vocab), attn_implementation="kvemb_reroute", dtype=dtype)
    return model.eval().requires_grad_(False)


def describe(model: PreTrainedModel) -> dict[str, Any]:
    """The built backbone's shape, read back from the model itself (not from the table it was made from)."""
    attention = model.layers[0].self_attn
    return {
        "model_type": model.config.model_type,
        "layers": len(model.layers),
        "hidden": model.config.hidden_size,
        "heads": attention.q_proj.out_features // attention.head_dim,
        "kv_heads": attention.k_proj.out_features // attention.head_dim,
        "head_dim": attention.head_dim,
        "qkv_bias": attention.q_proj.bias is not None,
        "vocab": model.config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


# ------------------------------------------------------------------------------------------ models
def load_backbone(args: argparse.Namespace) -> tuple[PreTrainedModel, Any]:
    if args.shape:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        return random_backbone(SHAPES[args.shape], len(tokenizer), DTYPES[args.dtype], args.device), tokenizer
    loaded = KVEmbedding(config("plain", args), model_kwargs={"dtype": DTYPES[args.dtype]})
    return loaded.auto_model, loaded.tokenizer


def config(variant: str, args: argparse.Namespace) -> KVEmbeddingConfig:
    knobs = VARIANTS[variant]
    return KVEmbeddingConfig(
        base_model=args.base or f"random:{args.shape}",
        layers=args.layers if knobs["method"] == "kv" else (),
        max_seq_length=args.max_seq_length,
        **knobs,
    )


def default_layers(num_layers: int) -> str:
    """The last third of the layers, e.g. 20-29 of 30."""
    return f"{num_layers - num_layers // 3}-{num_layers - 1}"


def load_models(args: argparse.Namespace) -> dict[str, SentenceTransformer]:
    """Every variant of ``args.variants`` on one shared backbone, warmed up; fills in default ``args.layers``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone, tokenizer = load_backbone(args)
    args.layers = args.layers or default_layers(backbone.config.num_hidden_layers)
    modules = {variant: KVEmbedding(config(variant, args), backbone, tokenizer) for variant in args.variants}
    models = {variant: SentenceTransformer(modules=[m], device=args.device) for variant, m in modules.items()}
    for model in models.values():
        model.encode(["warm up"])
    return models


# ------------------------------------------------------------------------------------------- texts
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


# ----------------------------------------------------------------------------------------- timing
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


# ----------------------------------------------------------------------------------------- memory
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
    """This script in worker mode, with the options that rebuild the same backbone and variant."""
    source = ["--shape", args.shape, "--tokenizer", str(args.tokenizer)] if args.shape else ["--base", args.base]
    return [
        sys.executable, __file__, "--worker", "--variant", variant, "--texts-file", str(texts_file), *source,
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


# ------------------------------------------------------------------------------------------- grid
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


# ---------------------------------------------------------------------------------- tokenization
def parse_tokenize(spec: str) -> tuple[int, int, int]:
    """``NxT@M``: N texts of about T templated tokens at max_seq_length M."""
    try:
        counts, max_length = spec.split("@")
        n, tokens = counts.split("x")
        parsed = int(n), int(tokens), int(max_length)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokenize {spec!r}: expected NxT@M, e.g. 32x600@512") from None
    if min(parsed) < 1 or parsed[1] <= parsed[2]:
        raise argparse.ArgumentTypeError(f"--tokenize {spec!r}: needs N, T, M >= 1 and T > M (texts to cut)")
    return parsed


def measure_tokenization(args: argparse.Namespace, models: dict[str, SentenceTransformer]) -> dict[str, Any]:
    """The same N texts through the ``kv`` (else ``plain``) template, cut to M tokens and uncut.

    The measurement is ``scripts/bench_tokenize.py``'s (one definition of the ratio the issue targets); the
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


# ---------------------------------------------------------------------------------------- profile
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


# ----------------------------------------------------------------------------------------- report
def this_command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({platform.machine()})"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every grid point, then the tokenization column; the outputs are rewritten after each step, so that a
    run cut short (a time limit on a lent GPU) still leaves the points it finished."""
    models = load_models(args)
    for length, _ in args.grid:
        text_of_length(models["plain"][0], length)  # fail before measuring
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    kv = models["kv"][0].config if "kv" in models else None
    result: dict[str, Any] = {
        "command": this_command(),
        "base": args.base,
        "shape": {"name": args.shape, **SHAPES[args.shape]._asdict()} if args.shape else None,
        "backbone": describe(models["plain"][0].auto_model),
        "kv_config": {
            "layers": args.layers, "prefix_rope": kv and kv.prefix_rope, "prefix_bias": kv and kv.prefix_bias
        },  # fmt: skip
        "device": device_name(args.device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": [],
        "tokenization": None,
    }
    for length, batch in args.grid:
        row = measure_point(args, models, length, batch, out_dir)
        result["rows"].append(row)
        result["attention_paths"] = kernel_check.summary()
        write(result, args.out)
        print(f"{length}x{batch}: " + ", ".join(
            f"{v} forward {row['forward_ratio'][v]['median']:.3f}x encode {row['encode_ratio'][v]['median']:.3f}x"
            for v in row["forward_ratio"]
        ), flush=True)  # fmt: skip
    if args.tokenize:
        result["tokenization"] = measure_tokenization(args, models)
        write(result, args.out)
    print("attention path of the re-routed layers:\n" + result["attention_paths"], flush=True)
    return result


def write(result: dict[str, Any], out: str) -> None:
    Path(out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(out + ".md").write_text(markdown(result))


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
        "repeats in brackets (see scripts/bench.py).",
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
                  "fixed, see scripts/bench.py); RSS growth = peak RSS during encode minus RSS of the loaded model.",
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
            f"Tokenization (scripts/bench_tokenize.py): {tokenization['texts']} texts of >= {tokenization['tokens']} "
            f"templated tokens (`{tokenization['variant']}` template), `TemplateTokenizer.encode` (what `preprocess` "
            "runs) against one batched tokenizer call over the same templated, uncut texts; median of paired ratios.",
            "",
        ]
        header = ["case", "max_seq_length", "texts cut", "one tokenizer call ms", "preprocess ms"]
        header.append("**preprocess / one call**")
        lines += _table(header, [
            [case, str(cost["max_length"]), str(cost["cut"]), f"{cost['baseline_ms']:.1f}", f"{cost['encode_ms']:.1f}",
             f"**{cost['ratio']:.2f}**"]
            for case, cost in ((c, tokenization[c]) for c in ("fit", "cut"))
        ])  # fmt: skip
    if result.get("attention_paths"):
        lines += ["", "Re-routed attention path (kernel, self-check):", "", *(f"- {p}" for p in result["attention_paths"].splitlines())]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI
def parse_grid(spec: str) -> list[tuple[int, int]]:
    try:
        grid = [tuple(int(n) for n in point.split("x")) for point in spec.split(",")]
    except ValueError:
        grid = []
    if not grid or any(len(point) != 2 or min(point) < 1 for point in grid):
        raise argparse.ArgumentTypeError(f"--grid {spec!r}: expected TOKENSxBATCH,..., e.g. {ISSUE_GRID}")
    return grid  # type: ignore[return-value]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--base", default=None, help="base model folder or .gguf (default: SmolLM2-135M-Instruct)")
    source.add_argument("--shape", choices=sorted(SHAPES), help="instead: random weights of this real model's shape")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --shape (default: SmolLM2's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, else fp32")
    parser.add_argument("--layers", default=None, help="re-routed layers of kv (default: the last third)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, plain first")
    points = parser.add_mutually_exclusive_group()
    points.add_argument("--lengths", default=None, help="comma-separated templated lengths (default: 64,512,2048,4096)")
    points.add_argument("--grid", type=parse_grid, default=None, help=f"TOKENSxBATCH,..., e.g. {ISSUE_GRID}")
    parser.add_argument("--batch", type=int, default=None, help="with --lengths (default: 4 up to 512 tokens, else 1)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per point (default: 9, 7, 7, 6 at 64-4096; else 7)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-self-check", action="store_true",
                        help=f"skip the attention self-check (sets {kernel_check.ENV}=0, also for the memory workers)")
    parser.add_argument("--no-rss", dest="rss", action="store_false", help="CPU: skip the peak-RSS worker processes")
    parser.add_argument("--tokenize", type=parse_tokenize, default="32x600@512", metavar="NxT@M",
                        help="tokenization column: N texts of ~T templated tokens at max_seq_length M")  # fmt: skip
    parser.add_argument("--no-tokenize", dest="tokenize", action="store_const", const=None)
    parser.add_argument("--out", default=None, help="output path without extension (default: results/bench_<model>)")
    parser.add_argument("--profile", type=int, metavar="TOKENS", help="instead: per-op CPU profile of plain vs kv")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", help=argparse.SUPPRESS)
    parser.add_argument("--max-seq-length", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokenizer and not args.shape:
        parser.error("--tokenizer goes with --shape (a --base model brings its own tokenizer)")
    if args.batch and args.grid:
        parser.error("--batch goes with --lengths; --grid names the batch of every point")
    args.variants = args.variants.split(",")
    if args.variants[0] != "plain" or not set(args.variants) <= set(VARIANTS):
        parser.error(f"--variants {','.join(args.variants)}: start with plain, choose from {', '.join(VARIANTS)}")
    if not args.shape:
        args.base = args.base or str(smollm2_folder())
    args.tokenizer = args.tokenizer or (str(smollm2_folder()) if args.shape else None)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.out = args.out or f"results/bench_{args.shape or 'smollm2'}"
    if not args.worker:
        lengths = [int(x) for x in (args.lengths or "64,512,2048,4096").split(",")]
        args.grid = args.grid or [(n, args.batch or DEFAULT_BATCH.get(n, 1)) for n in lengths]
        longest = max([n for n, _ in args.grid] + [args.profile or 0] + [args.tokenize[1] if args.tokenize else 0])
        args.max_seq_length = 2 * longest + 64  # room for echo's second copy
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.no_self_check:
        os.environ[kernel_check.ENV] = "0"
    if args.worker:
        worker(args)
        return
    if args.profile:
        table = profile_markdown(profile_ops(args), args.profile)
        Path(args.out + f"_profile_{args.profile}.md").write_text(table)
        print(table)
        return
    print(markdown(run(args)))


if __name__ == "__main__":
    main()
