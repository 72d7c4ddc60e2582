"""The ``kvemb`` console command.

Each subcommand lives in one ``add_<name>_parser(subparsers)`` function that declares its options and
sets ``handler``; :data:`SUBCOMMANDS` lists them, so a new subcommand (``eval``, ``bench``) is one
function plus one entry. Handlers receive the parsed namespace and the raw argument list and return an
exit status; bad input is reported as one ``error:`` line, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvemb_st.build import (
    DEFAULT_DOCUMENT_CALIBRATION,
    DEFAULT_DOCUMENT_STATISTICS,
    DEFAULT_POSTPROCESS,
    DEFAULT_SIDES,
    NO_POSTPROCESSING,
    build,
)
from kvemb_st.config import ROPE_MODES, KVEmbeddingConfig
from kvemb_st.intrinsic_dim import ESTIMATORS
from kvemb_st.layer_spec import AUTO, format_layer_spec
from kvemb_st.postprocessing import DEFAULT_EIGENVALUE_FLOOR, POSTPROCESSING_MODES
from kvemb_st.version import __version__
from kvemb_st.window_rule import (
    ANCHORS,
    DEFAULT_ANCHOR,
    DEFAULT_END_MARGIN,
    DEFAULT_MIN_TOLERANCE,
    DEFAULT_SKIP_FRACTION,
    DEFAULT_WINDOW_FRACTION,
    FLAT_SPREAD,
    SelectionParams,
)
from kvemb_st.side import SIDE_KEYS, flag_options

DTYPES = ("float32", "bfloat16", "float16")
_CONFIG_DEFAULTS = KVEmbeddingConfig(base_model="<base>", layers=[0]).to_dict()  # the defaults of method 'kv'
_SECRET_OPTIONS = ("--token",)
# --document-<knob> for every side knob but the template, whose --document-template sets the document side only
SIDE_FLAGS = tuple(key for key in SIDE_KEYS if key != "template")
KNOB_OPTIONS: dict[str, dict[str, Any]] = {  # KVEmbeddingConfig field -> argparse options of its --flag
    "prefix_bias": dict(type=float, help="added to the prefix slot's attention logit"),
    "prefix_rope": dict(choices=ROPE_MODES, help="position of the prefix key"),
    **{key: flag_options(key) for key in SIDE_KEYS},
    "max_seq_length": dict(type=int, help="maximum tokens of the templated input"),
}


# ---------------------------------------------------------------------------------------------- build
def add_build_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build",
        help="build a KV-Embedding model folder from a base LLM",
        description="Build a Hub-ready KV-Embedding sentence-transformers folder from a frozen decoder-only LLM: "
        "choose the re-routed layers by intrinsic dimension (or take them from --layers), save the config, "
        "plot the ID curve and write a model card.",
    )
    parser.add_argument("base_model", help="base model: Hub id, local folder or .gguf file")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--revision", dest="base_revision", help="Hub revision of the base model")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")

    knobs = parser.add_argument_group("model knobs (defaults: those of KVEmbeddingConfig)")
    knobs.add_argument(
        "--layers", default=AUTO, help=f"'{AUTO}' (default) or an explicit list/range, e.g. '20-29', '3,5,7'"
    )
    for name, options in KNOB_OPTIONS.items():
        _knob(knobs, name, **options)
    knobs.add_argument("--query-template", help="template for encode_query (ST prompt 'query')")

    document = parser.add_argument_group(
        "document side (encode_document); default: " + (json.dumps(DEFAULT_SIDES.get("document")) or "none")
    )
    document.add_argument("--document-template", help="template for encode_document (ST prompt 'document')")
    for name in SIDE_FLAGS:
        options = dict(KNOB_OPTIONS[name])
        options["help"] = f"document side: {options['help']}"
        document.add_argument(f"--document-{name.replace('_', '-')}", dest=f"document_{name}", **options)
    document.add_argument("--query-side", choices=("document", "default"), default="document",
                          help="encode_query reads like encode_document (document, the default: one space for "
                          "retrieval) or like plain encode (default)")
    document.add_argument("--no-document-side", action="store_true",
                          help="documents read out like plain encode (the --document-* flags still apply)")

    select = parser.add_argument_group("automatic layer selection")
    select.add_argument("--calibration", type=Path, help="calibration file, one text per line (default: shipped set)")
    select.add_argument("--calibration-limit", type=int, help="use only the first N calibration texts")
    select.add_argument(
        "--skip-fraction",
        type=float,
        default=DEFAULT_SKIP_FRACTION,
        help="fraction of first layers skipped (default: %(default)s)",
    )
    window = select.add_mutually_exclusive_group()
    window.add_argument("--window", type=int, help="window width in layers")
    window.add_argument(
        "--window-fraction",
        type=float,
        default=DEFAULT_WINDOW_FRACTION,
        help="window width as a fraction of the layers (default: %(default).3f)",
    )
    select.add_argument(
        "--anchor",
        choices=ANCHORS,
        default=DEFAULT_ANCHOR,
        help="window is centred on / starts at the minimum (default: %(default)s)",
    )
    select.add_argument(
        "--min-tolerance",
        type=float,
        default=DEFAULT_MIN_TOLERANCE,
        help="layers within this many standard errors of the lowest ID count as the minimum; the window is "
        "anchored at their mean position, 0 = the single lowest layer (default: %(default)s)",
    )
    select.add_argument(
        "--end-margin",
        type=int,
        default=DEFAULT_END_MARGIN,
        help="the window ends at least this many layers before the last one, 0 = it may end there (default: %(default)s)",
    )
    select.add_argument("--estimator", choices=ESTIMATORS, default="mle", help="TwoNN estimator (default: %(default)s)")
    select.add_argument("--batch-size", type=int, default=32, help="calibration batch size (default: %(default)s)")
    select.add_argument("--cache-dir", type=Path, help="ID-curve cache folder (default: <kvemb cache>/id_curves)")
    select.add_argument("--no-cache", action="store_true", help="always recompute the ID curve")

    post = parser.add_argument_group("post-processing, fitted on the calibration texts (saved as a statistics file)")
    post.add_argument(
        "--postprocess",
        choices=(NO_POSTPROCESSING, *POSTPROCESSING_MODES),
        default=DEFAULT_POSTPROCESS,
        help="subtract the calibration mean (center), also remove top principal directions (remove_pcs), or "
        "whiten with the calibration covariance (whiten) (default: %(default)s)",
    )
    post.add_argument(
        "--postprocess-calibration",
        metavar="SET",
        help="texts the post-processing is fitted on: sts-b-train, sts-b-train-paragraphs, both joined with '+', or "
        "a file (default: the calibration texts)",
    )
    post.add_argument(
        "--document-calibration",
        metavar="SET",
        default=DEFAULT_DOCUMENT_CALIBRATION,
        help="texts embedded by encode_document for the document side's whitening, or 'none' (default: %(default)s)",
    )
    post.add_argument(
        "--document-whitening",
        choices=("own", "shared"),
        default="own" if DEFAULT_DOCUMENT_STATISTICS else "shared",
        help="own: the query and document sides get statistics of their own, fitted on --document-calibration; "
        "shared: those texts join the one fit of every side (default: %(default)s)",
    )
    post.add_argument(
        "--components",
        type=int,
        help="remove_pcs: directions removed (required); whiten: output dimension (default: the full dimension)",
    )
    post.add_argument(
        "--eigenvalue-floor",
        type=float,
        default=DEFAULT_EIGENVALUE_FLOOR,
        help="whiten: eigenvalues below this fraction of the largest are raised to it (default: %(default)s)",
    )

    load = parser.add_argument_group("loading the base model")
    load.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: sentence-transformers' choice)")
    load.add_argument("--dtype", choices=DTYPES, help="dtype of the base model weights")
    load.add_argument("--token", help="Hugging Face token (never written to the card)")
    load.add_argument("--local-files-only", action="store_true", help="never contact the Hub")

    card = parser.add_argument_group("model card and Hub")
    card.add_argument("--base-model-id", help="Hub id of the base model, for the card, when building from a path")
    card.add_argument("--eval-results", type=Path, help="JSON object {metric: value} to show in the card")
    card.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub model repo")
    card.add_argument("--private", action="store_true", default=None, help="create the Hub repo as private")
    card.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_build)


def _knob(group: argparse._ArgumentGroup, name: str, **options: Any) -> None:
    """``--name`` for a config field: omitted means the config's own default, which is not repeated here."""
    help_text = f"{options.pop('help')} (default: {_CONFIG_DEFAULTS[name]!r})".replace("%", "%%")
    flag = "--" + name.replace("_", "-")
    group.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text, **options)


def document_side(args: argparse.Namespace) -> dict[str, Any]:
    """The document side the flags ask for: the default one (unless --no-document-side) with any --document-* set."""
    side = {} if args.no_document_side else dict(DEFAULT_SIDES.get("document", {}))
    side.update({name: getattr(args, f"document_{name}") for name in SIDE_FLAGS if getattr(args, f"document_{name}") is not None})
    return side


def run_build(args: argparse.Namespace, argv: Sequence[str]) -> int:
    knobs = {name: value for name, value in vars(args).items() if name in KNOB_OPTIONS}
    side = document_side(args)
    knobs["sides"] = {"document": side, **({"query": side} if args.query_side == "document" else {})} if side else {}
    result = build(
        args.base_model,
        args.output,
        layers=args.layers,
        base_revision=args.base_revision,
        calibration=args.calibration,
        calibration_limit=args.calibration_limit,
        postprocess=args.postprocess,
        postprocess_calibration=args.postprocess_calibration,
        document_calibration=None if args.document_calibration == NO_POSTPROCESSING else args.document_calibration,
        document_statistics=args.document_whitening == "own",
        components=args.components,
        eigenvalue_floor=args.eigenvalue_floor,
        selection=SelectionParams(
            skip_fraction=args.skip_fraction,
            window=args.window,
            window_fraction=args.window_fraction,
            anchor=args.anchor,
            min_tolerance=args.min_tolerance,
            end_margin=args.end_margin,
        ),
        estimator=args.estimator,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        query_template=args.query_template,
        document_template=args.document_template,
        device=args.device,
        token=args.token,
        local_files_only=args.local_files_only,
        model_kwargs={"dtype": args.dtype} if args.dtype else None,
        base_model_id=args.base_model_id,
        eval_results=read_eval_results(args.eval_results) if args.eval_results else None,
        push_to_hub=args.push_to_hub,
        private=args.private,
        overwrite=args.overwrite,
        command=shlex.join(["kvemb", *redact(argv)]),
        progress=not args.quiet,
        **knobs,
    )
    selection = result.selection
    curve = ", ".join(f"{i}:{value:.2f}" for i, value in enumerate(selection.id_curve))
    print(f"ID curve (TwoNN {selection.estimator}, {selection.num_calibration_texts} calibration texts): {curve}")
    print(
        f"ID curve spread: {selection.spread:.2f} ((max - min) / mean past the skipped layers; below {FLAT_SPREAD} "
        "counts as flat)"
    )
    how = "explicit"
    if selection.mode == AUTO:
        how = f"auto: ID minimum at layer {selection.argmin}, layers {selection.near_minimum} within noise of it"
    print(f"selected layers: {format_layer_spec(selection.layers)} ({how})")
    if args.postprocess != NO_POSTPROCESSING:
        print(f"post-processing: {args.postprocess}, {result.model.get_embedding_dimension()} dimensions")
    print(f"saved to {result.output_dir}")
    if result.repo_url:
        print(f"pushed to {result.repo_url}")
    return 0


def read_eval_results(path: Path) -> dict[str, int | float | str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read --eval-results file '{path}': {err}") from None
    if not isinstance(data, dict) or not all(
        isinstance(value, (int, float, str)) and not isinstance(value, bool) for value in data.values()
    ):
        raise ValueError(f"--eval-results file '{path}' must hold a JSON object of metric name -> number or string")
    return {str(name): value for name, value in data.items()}


def redact(argv: Sequence[str]) -> list[str]:
    """Replace the values of secret options, so that the recorded command never holds a token."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
        elif arg in _SECRET_OPTIONS:
            out.append(arg)
            hide_next = True
        elif any(arg.startswith(f"{option}=") for option in _SECRET_OPTIONS):
            out.append(f"{arg.split('=', 1)[0]}=***")
        else:
            out.append(arg)
    return out


# ----------------------------------------------------------------------------------------------- eval
def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    from kvemb_st.benchmark import command  # mteb itself is imported only when the command runs

    parser = subparsers.add_parser("eval", help="MTEB scores of a saved model", description=command.DESCRIPTION)
    command.add_arguments(parser)
    parser.set_defaults(handler=lambda args, argv: command.run_eval(args))


# ----------------------------------------------------------------------------------------------- main
SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_build_parser, add_eval_parser)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvemb", description="KV-Embedding models for sentence-transformers.")
    parser.add_argument("--version", action="version", version=f"kvemb-st {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    try:
        return args.handler(args, argv)
    except (ValueError, OSError) as err:  # bad input or unavailable model: one clear line, exit status 1
        print(f"kvemb {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
