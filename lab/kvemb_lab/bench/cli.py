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
over the same templated, uncut texts (``tools/bench_tokenize.py``'s measurement).

All ratios are against ``plain`` (or the plain tokenizer call) from the same run::

    python tools/bench.py                                  # writes results/bench/smollm2/bench_smollm2.{json,md}
    python tools/bench.py --lengths 64,512 --repeats 3     # a quick look
    python tools/bench.py --shape llama3-8b --dtype bf16 --device cuda --grid 128x64,512x16,2048x4,8192x1
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from kvemb_st import kernel_check

from kvemb_lab.assets import smollm2_folder
from kvemb_lab.backbones import run_assets
from kvemb_lab.bench.measure import measure_point, measure_tokenization, profile_ops, text_of_length, worker
from kvemb_lab.bench.report import device_name, markdown, profile_markdown, this_command, write
from kvemb_lab.bench.shapes import SHAPES, describe
from kvemb_lab.bench.variants import DTYPES, VARIANTS, load_models
from kvemb_lab.paths import RESULTS
from kvemb_lab.provenance import public_name

DEFAULT_BATCH = {64: 4, 512: 4, 2048: 1, 4096: 1}
ISSUE_GRID = "128x64,512x16,2048x4,8192x1"


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
        "base": public_name(args.base),
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
        write(result, args.out, args.assets)
        print(f"{length}x{batch}: " + ", ".join(
            f"{v} forward {row['forward_ratio'][v]['median']:.3f}x encode {row['encode_ratio'][v]['median']:.3f}x"
            for v in row["forward_ratio"]
        ), flush=True)  # fmt: skip
    if args.tokenize:
        result["tokenization"] = measure_tokenization(args, models)
        write(result, args.out, args.assets)
    print("attention path of the re-routed layers:\n" + result["attention_paths"], flush=True)
    return result


def parse_grid(spec: str) -> list[tuple[int, int]]:
    try:
        grid = [tuple(int(n) for n in point.split("x")) for point in spec.split(",")]
    except ValueError:
        grid = []
    if not grid or any(len(point) != 2 or min(point) < 1 for point in grid):
        raise argparse.ArgumentTypeError(f"--grid {spec!r}: expected TOKENSxBATCH,..., e.g. {ISSUE_GRID}")
    return grid  # type: ignore[return-value]


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
    parser.add_argument("--out", default=None,
                        help="output path without extension (default: results/bench/<model>/bench_<model>)")
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
    uses_smollm2 = not (args.base if not args.shape else args.tokenizer)  # its weights or its tokenizer
    args.assets = run_assets(["smollm2"] if uses_smollm2 else [], [])
    if not args.shape:
        args.base = args.base or str(smollm2_folder())
    args.tokenizer = args.tokenizer or (str(smollm2_folder()) if args.shape else None)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    name = args.shape or "smollm2"
    args.out = args.out or str(RESULTS / "bench" / name / f"bench_{name}")
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
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + f"_profile_{args.profile}.md").write_text(table)
        print(table)
        return
    print(markdown(run(args)))


if __name__ == "__main__":
    main()
