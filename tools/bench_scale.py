"""Throughput on this machine: one process vs ST's multi-process pool vs Ray Data, same total cores.

All three embed the same STS-B dev sentences with the same saved KV-Embedding model:

- ``single``: one process, ``torch.set_num_threads(cores)`` (and, for context, one thread);
- ``st_pool``: ``start_multi_process_pool(["cpu"] * cores)``, one torch thread per worker;
- ``ray``: :func:`kvemb_st.ray.embed_dataset` with ``cores`` actors of one CPU each on a local Ray cluster
  started with ``num_cpus=cores`` (the dataset is in memory, so no read/write tasks compete for CPUs).

``end_to_end`` includes what each path pays before its first vector: loading the model in-process,
spawning and loading the pool's workers, or starting Ray's actors, each of which loads the model
(Ray's own cluster start is reported apart: on a cluster it is already running). ``warm`` is a second
pass over the same texts once everything is loaded, for the two paths that can be reused. Offline::

    python tools/bench_scale.py                      # writes results/scale/smollm2/scale_smollm2.{json,md}
    python tools/bench_scale.py --docs 32 --cores 2  # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.data
import sentence_transformers
import torch

import kvemb_st
from kvemb_st.ray import embed_dataset

from kvemb_lab.assets import STS_DISTRIBUTION, load_sts_b, smollm2_folder
from kvemb_lab.backbones import run_assets
from kvemb_lab.evaluation import markdown_table, write_json
from kvemb_lab.paths import RESULTS

COLUMNS = ["path", "layout", "startup_s", "end_to_end_s", "end_to_end_docs_per_s", "warm_docs_per_s",
           "end_to_end_vs_single", "warm_vs_single"]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def corpus(n: int) -> list[str]:
    sentences = dict.fromkeys(s for s1, s2, _ in load_sts_b("dev") for s in (s1, s2))
    return list(sentences)[:n]


def rows_per_call(texts: list[str], cores: int) -> int:
    """Texts per pool chunk / Ray batch: about four per worker, so that the work spreads evenly."""
    return max(1, len(texts) // (4 * cores))


def run_single(folder: str, texts: list[str], threads: int, batch_size: int) -> dict[str, Any]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, startup = timed(lambda: kvemb_st.load(folder))
        _, cold = timed(lambda: model.encode(texts, batch_size=batch_size))
        _, warm = timed(lambda: model.encode(texts, batch_size=batch_size))
    finally:
        torch.set_num_threads(previous)
    return {"path": "single", "layout": f"1 process x {threads} thread(s)", "startup_s": startup,
            "end_to_end_s": startup + cold, "warm_s": warm}


def run_pool(folder: str, texts: list[str], cores: int, batch_size: int) -> dict[str, Any]:
    model = kvemb_st.load(folder)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by torch in each freshly spawned worker
    try:
        pool, startup = timed(lambda: model.start_multi_process_pool(["cpu"] * cores))
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    try:
        chunk = rows_per_call(texts, cores)
        _, cold = timed(lambda: model.encode(texts, pool=pool, batch_size=batch_size, chunk_size=chunk))
        _, warm = timed(lambda: model.encode(texts, pool=pool, batch_size=batch_size, chunk_size=chunk))
    finally:
        model.stop_multi_process_pool(pool)
    return {"path": "st_pool", "layout": f"{cores} processes x 1 thread", "startup_s": startup,
            "end_to_end_s": startup + cold, "warm_s": warm}


def run_ray(folder: str, texts: list[str], cores: int, batch_size: int) -> dict[str, Any]:
    _, cluster_start = timed(lambda: ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False))
    try:
        dataset = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)]).materialize()
        embedded = embed_dataset(dataset, folder, num_actors=cores, cpus_per_actor=1,
                                 batch_size=rows_per_call(texts, cores), encode_batch_size=batch_size)
        result, seconds = timed(embedded.materialize)
        if result.count() != len(texts):
            raise RuntimeError(f"Ray returned {result.count()} rows for {len(texts)} texts")
    finally:
        ray.shutdown()
    return {"path": "ray", "layout": f"{cores} actors x 1 CPU", "startup_s": None, "end_to_end_s": seconds,
            "warm_s": None, "ray_cluster_start_s": cluster_start}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=128, help="number of STS-B dev sentences")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", default="20-29")
    parser.add_argument("--out", default=str(RESULTS / "scale" / "smollm2" / "scale_smollm2"),
                        help="output path without extension (default: results/scale/smollm2/scale_smollm2)")
    args = parser.parse_args(argv)
    if args.docs < 1 or args.cores < 1:
        raise ValueError(f"--docs and --cores must be >= 1, got {args.docs} and {args.cores}")

    texts = corpus(args.docs)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        kvemb_st.from_base(str(smollm2_folder()), layers=args.layers).save(folder)
        rows = [run_single(folder, texts, args.cores, args.batch_size)]
        if args.cores > 1:  # context: the per-worker layout of the pool and of Ray, in one process
            rows.append(run_single(folder, texts, 1, args.batch_size))
        rows += [run(folder, texts, args.cores, args.batch_size) for run in (run_pool, run_ray)]
    load_after = os.getloadavg()

    single = rows[0]
    for row in rows:
        row["end_to_end_docs_per_s"] = len(texts) / row["end_to_end_s"]
        row["warm_docs_per_s"] = len(texts) / row["warm_s"] if row["warm_s"] else None
        row["end_to_end_vs_single"] = row["end_to_end_docs_per_s"] / single["end_to_end_docs_per_s"]
        row["warm_vs_single"] = row["warm_docs_per_s"] / single["warm_docs_per_s"] if row["warm_s"] else None
    command = "python tools/bench_scale.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    meta = {
        "command": command.strip(),
        "docs": len(texts),
        "cores": args.cores,
        "batch_size": args.batch_size,
        "model": f"SmolLM2-135M-Instruct fp32, kv layers {args.layers}",
        "cpu": platform.processor() or platform.machine(),
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "versions": {"torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
                     "ray": ray.__version__, "kvemb_st": kvemb_st.__version__},
    }
    write_json(f"{args.out}.json", {"meta": meta, "rows": rows}, run_assets(["smollm2"], [STS_DISTRIBUTION]))
    table = markdown_table(rows, COLUMNS, digits=2)
    note = (f"{len(texts)} STS-B dev sentences, {meta['model']}, {args.cores} cores, batch {args.batch_size}; "
            f"1-min load average {meta['load_average_1min_before_after'][0]} before / "
            f"{meta['load_average_1min_before_after'][1]} after (shared machine). Ray cluster start "
            f"{rows[-1]['ray_cluster_start_s']:.1f} s, not included. `{meta['command']}`\n")
    Path(f"{args.out}.md").write_text(table + "\n" + note, encoding="utf-8")
    print(table + "\n" + note)


if __name__ == "__main__":
    main()
