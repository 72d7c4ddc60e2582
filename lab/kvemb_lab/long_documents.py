"""Texts longer than the token budget: truncation (the package's behaviour) vs chunks averaged, on dev documents.

Each Lee document and newsgroups post is embedded by the document side (i) whole (``--full`` tokens), (ii) cut
to ``--budget`` tokens as the model does, and (iii) split at sentence boundaries into chunks of at most
``--budget`` templated tokens, each embedded, the unit vectors averaged. The document side's own whitening, as the
default build fits it (the calibration sentences through ``encode_document``, at the full budget), is applied to all
three; queries go through ``encode_query``. Scores: Lee Pearson over all
1,225 pairs, newsgroups-dev 5-NN and subject -> body retrieval-dev nDCG@10, plus how many texts were long.

    python experiments/long_documents/long_documents.py smollm2 --budget 128
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import numpy as np

from kvemb_st.calibration import load_calibration
from kvemb_st.postprocessing_fit import fit_postprocessing

from kvemb_lab.backbones import BACKBONES, run_assets
from kvemb_lab.doc_scoring import Scorer
from kvemb_lab.evaluation import write_json
from kvemb_lab.general_calibration import split_sentences
from kvemb_lab.side_scripts import side_model, side_script_parser


def chunks(text: str, fits) -> list[str]:
    """Consecutive sentences packed greedily while ``fits(chunk)``; a sentence too long alone is its own chunk
    (and is cut by the model)."""
    out: list[str] = []
    for sentence in split_sentences(text):
        if out and fits(f"{out[-1]} {sentence}"):
            out[-1] = f"{out[-1]} {sentence}"
        else:
            out.append(sentence)
    return out or [text]


def main(argv: Sequence[str] | None = None) -> None:
    parser = side_script_parser(__doc__, "JSON of the model's sides, e.g. the default build's", "long_inputs")
    parser.add_argument("--layers", default=None, help="re-routed layers (default: the backbone's build window)")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--full", type=int, default=512)
    args = parser.parse_args(argv)
    backbone = BACKBONES[args.backbone]
    model = side_model(args, args.layers, max_seq_length=args.full)
    scorer = Scorer(args.cache, args.backbone)
    documents = {"lee": scorer.lee_texts, "newsgroups": scorer.news_texts}
    options = dict(batch_size=8, convert_to_numpy=True, show_progress_bar=False)
    whiten = fit_postprocessing(model.encode_document(load_calibration(), **options), "whiten").transform
    queries = whiten(model.encode_query(scorer.subjects, **options))
    module = model[0]
    template = module.config.side("document").template

    def fits(chunk: str) -> bool:
        return len(module.tokenizer(template.replace("{text}", chunk))["input_ids"]) <= args.budget

    rows = []
    long = {name: sum(not fits(t) for t in items) for name, items in documents.items()}
    for mode in ("full", "truncate", "chunk"):
        module.max_seq_length = args.full if mode == "full" else args.budget
        vectors = {}
        for name, items in documents.items():
            if mode != "chunk":
                vectors[name] = model.encode_document(items, **options)
                continue
            pieces = [chunks(text, fits) for text in items]
            flat = model.encode_document([p for piece in pieces for p in piece], **options)
            bounds = np.cumsum([0, *map(len, pieces)])
            mean = np.stack([flat[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])
            vectors[name] = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        lee, news = whiten(vectors["lee"]), whiten(vectors["newsgroups"])
        row = {"mode": mode, "budget": args.full if mode == "full" else args.budget,
               **scorer.documents(lee, news), **scorer.retrieval(queries, news)}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    result = {"backbone": args.backbone, "sides": json.loads(args.sides), "long_texts": long,
              "command": "python experiments/long_documents/long_documents.py " + " ".join(argv or sys.argv[1:]), "rows": rows}
    write_json(args.out / args.backbone / f"long_documents_{args.backbone}_{args.budget}.json", result,
               run_assets([args.backbone]))


if __name__ == "__main__":
    main()
