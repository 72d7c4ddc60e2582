"""Embed a text corpus (Parquet, JSONL or CSV) with a saved KV-Embedding model on Ray Data; write Parquet.

Every input column is kept (ids stay with their rows, in input order) and a fixed-size float32 list
column is added. The same command runs on one machine (a local Ray cluster is started) or on a cluster
(``--address auto`` on a node of a running cluster); the model folder and the base model it names must be
readable from every node. Ray Data prints progress while it runs.

    python tools/embed_ray.py my-kvemb-model corpus.jsonl embeddings/ --num-actors 2
    python tools/embed_ray.py my-kvemb-model s3://bucket/corpus/ s3://bucket/emb/ --format parquet \\
        --address auto --num-actors 16 --gpus-per-actor 1 --device cuda --prompt-name document
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import ray
import ray.data

from kvemb_st.ray import TEXT_COLUMN, VECTOR_COLUMN, embed_dataset

READERS = {"parquet": ray.data.read_parquet, "jsonl": ray.data.read_json, "csv": ray.data.read_csv}
EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


def input_format(path: str, given: str | None) -> str:
    if given:
        return given
    extension = os.path.splitext(path.rstrip("/"))[1].lower()
    if extension not in EXTENSIONS:
        raise ValueError(
            f"cannot tell the format of '{path}' from its extension; pass --format {'/'.join(READERS)}"
        )
    return EXTENSIONS[extension]


def check_output(path: str) -> None:
    """Refuse to add files to a non-empty local output folder: it would then hold rows from two runs."""
    if os.path.isdir(path) and os.listdir(path):
        raise ValueError(f"output folder '{path}' exists and is not empty; remove it or choose another")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="saved KV-Embedding folder or Hub repo")
    parser.add_argument("input", help="corpus file or folder (local path or any URI pyarrow understands)")
    parser.add_argument("output", help="output folder for the Parquet files")
    parser.add_argument("--format", choices=sorted(READERS), help="input format (default: from the extension)")
    parser.add_argument("--text-column", default=TEXT_COLUMN)
    parser.add_argument("--vector-column", default=VECTOR_COLUMN)
    parser.add_argument("--prompt-name", help="ST prompt of the model, e.g. document or query")
    parser.add_argument("--num-actors", type=int, default=1, help="model replicas (each loads the model once)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--device", help="device of each actor's model, e.g. cuda (default: ST's choice)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per actor call")
    parser.add_argument("--encode-batch-size", type=int, default=32, help="texts per forward pass")
    parser.add_argument("--address", help="Ray cluster address, e.g. auto (default: start a local cluster)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    fmt = input_format(args.input, args.format)
    check_output(args.output)
    if not ray.is_initialized():
        ray.init(address=args.address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True

    start = time.perf_counter()
    dataset = READERS[fmt](args.input)
    embedded = embed_dataset(
        dataset,
        args.model,
        text_column=args.text_column,
        vector_column=args.vector_column,
        num_actors=args.num_actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        batch_size=args.batch_size,
        prompt_name=args.prompt_name,
        encode_batch_size=args.encode_batch_size,
        device=args.device,
    )
    embedded.write_parquet(args.output)
    seconds = time.perf_counter() - start
    rows = ray.data.read_parquet(args.output).count()
    summary = {"rows": rows, "seconds": round(seconds, 2), "docs_per_s": round(rows / seconds, 1)}
    print(json.dumps(summary), file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
