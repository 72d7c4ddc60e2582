"""Texts longer than the token budget: truncation vs the module's chunking, on dev documents (rule:
``experiments/long_documents/RULE.md``).

A saved default build is run as users get it, at each ``--budgets`` value of ``max_seq_length``: its document side
``truncate``-s (its setting), and the same folder with the document side's ``long_inputs="chunk"`` gives the chunk
rows of every text exactly as the module splits them (:meth:`KVEmbedding.preprocess`). From those row vectors, one
forward pass per budget, every way of combining them is scored: chunk weights ``equal`` / ``tokens``, combined
``before`` the side's post-processing (what the module does) or ``after`` it (each chunk post-processed, then the
unit vectors averaged). Scores: Lee Pearson over all 1,225 pairs, newsgroups-dev 5-NN, subject -> body
retrieval-dev nDCG@10, plus how many texts were over the budget.

    python experiments/long_documents/long_documents.py smollm2 --folder MODELS/smollm2-kvemb --budgets 128,512
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kvemb_st
from kvemb_st.chunking import ChunkPlan, ChunkRows
from kvemb_st.postprocessing import PostProcessing
from kvemb_st.side_router import route_of

from kvemb_lab.backbones import BACKBONES, run_assets
from kvemb_lab.doc_scoring import Scorer
from kvemb_lab.evaluation import write_json
from kvemb_lab.provenance import public_command, public_name
from kvemb_lab.side_scripts import RESULTS

SIDE = "document"
CHUNK_CANDIDATES = tuple(f"chunk/{w}/{at}" for at in ("before", "after") for w in ("equal", "tokens"))


@dataclass(frozen=True)
class DocumentRows:
    """A side's chunk rows of every text as the module splits them: the module's own :class:`ChunkPlan` over all
    texts and the unit row vectors, combined here by the module's own code in every way a candidate asks."""

    plan: ChunkPlan
    vectors: torch.Tensor

    def combine(self, weighting: str, post: PostProcessing | None, at: str) -> np.ndarray:
        """One unit vector per text: its rows averaged (``weighting``), post-processed ``before`` or ``after`` that."""
        if post is None:
            unit = self.plan.combine(self.vectors, weighting)
        elif at == "after":
            unit = ChunkRows(self.plan, self.vectors, weighting).combine(post.transform_tensor)
        else:
            unit = post.transform_tensor(self.plan.combine(self.vectors, weighting))
        return unit.cpu().numpy()

    @property
    def long(self) -> int:
        """How many texts were split (had more than one row)."""
        return int((np.bincount(self.plan.owners, minlength=self.plan.texts) > 1).sum())


def chunk_rows(model, texts: Sequence[str], side: str = SIDE, batch_size: int = 8) -> DocumentRows:
    """The chunk rows of ``texts`` as ``model``'s side splits them (its ``long_inputs`` must be ``chunk``), each
    embedded by the module alone (unit vectors, before any post-processing)."""
    module = model[0]
    vectors, owners, weights = [], [], []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        features = module.preprocess(batch, task=side)
        plan = features.pop("chunks", None)
        features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        with torch.inference_mode():
            vectors.append(module.forward(features)["sentence_embedding"].float().cpu())
        owners.extend(start + o for o in (plan.owners if plan else range(len(batch))))
        weights.extend(plan.weights if plan else [1] * len(batch))  # a text of one row: its weight does not matter
    return DocumentRows(ChunkPlan(tuple(owners), tuple(weights), len(texts)), torch.cat(vectors))


def with_setting(folder: Path, target: Path, side: str | None = None, **setting: str) -> Path:
    """A copy of a saved folder (config and statistics only) with ``setting`` in its config: for ``side``, or at the
    top level (every side that does not set the knob itself) when ``side`` is None. As a user would edit it."""
    shutil.copytree(folder, target)
    config_path = target / "kvemb_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    (config if side is None else config.setdefault("sides", {}).setdefault(side, {})).update(setting)
    config_path.write_text(json.dumps(config, indent=4), encoding="utf-8")
    return target


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbone", choices=sorted(BACKBONES))
    parser.add_argument("--folder", type=Path, required=True, help="the backbone's default build (kvemb build)")
    parser.add_argument("--budgets", default="128,512", help="max_seq_length values, comma-separated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "kvemb_st" / "probe")
    parser.add_argument("--out", type=Path, default=RESULTS / "long_inputs", help="topic folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    scorer = Scorer(args.cache, args.backbone)
    documents = {"lee": scorer.lee_texts, "newsgroups": scorer.news_texts}
    options = dict(batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)
    model = kvemb_st.load(str(args.folder))
    with tempfile.TemporaryDirectory() as tmp:
        chunked = kvemb_st.load(str(with_setting(args.folder, Path(tmp) / "chunk", SIDE, long_inputs="chunk")))
    post = route_of(model[1], SIDE) if len(model) > 1 else None
    rows = []
    for budget in budgets:
        model[0].max_seq_length = chunked[0].max_seq_length = budget
        queries = model.encode_query(scorer.subjects, **options)
        vectors = {"truncate": {name: model.encode_document(texts, **options) for name, texts in documents.items()}}
        parts = {name: chunk_rows(chunked, texts, batch_size=args.batch_size) for name, texts in documents.items()}
        for candidate in CHUNK_CANDIDATES:
            _, weighting, at = candidate.split("/")
            vectors[candidate] = {name: part.combine(weighting, post, at) for name, part in parts.items()}
        for candidate, vecs in vectors.items():
            row = {"candidate": candidate, "budget": budget, "long_texts": {n: p.long for n, p in parts.items()},
                   **scorer.documents(vecs["lee"], vecs["newsgroups"]), **scorer.retrieval(queries, vecs["newsgroups"])}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "backbone": args.backbone,
        "folder": public_name(str(args.folder)),
        "command": public_command(["python", "experiments/long_documents/long_documents.py", *(argv or sys.argv[1:])]),
        "rows": rows,
    }
    write_json(args.out / args.backbone / f"long_documents_{args.backbone}.json", result, run_assets([args.backbone]))
    return result


if __name__ == "__main__":
    main()
