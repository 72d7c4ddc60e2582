"""Regenerate ``kvemb_st/data/calibration_general.txt``, the general-domain calibration set.

Source: ``lee_background.cor`` of gensim's test data (``pip install --no-deps gensim==4.4.0``), 300
Australian news articles (ABC, 2001-2002) collected by Lee, Pincombe & Welsh (2005) as the *background*
corpus of their similarity study, i.e. a different set of documents from the 50 they scored (``lee.cor``,
one of our evaluation sets), and unrelated to STS-B and to the newsgroups set. It covers politics, crime,
sport, business, science and disasters: general news prose, not captions or forum posts.

The set mixes 256 paragraphs (3-6 consecutive sentences of one article, ~100 tokens) and 256 single
sentences (from the remaining sentences of the articles), no sentence used twice, shuffled so that any prefix is a
mix too; one text per line. Deterministic (seed 0): the same gensim file gives the same set.

    pip install --no-deps gensim==4.4.0
    python scripts/make_general_calibration.py
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from kvemb_st.doc_tasks import gensim_data_file
from kvemb_st.calibration import GENERAL_CALIBRATION_FILE

PARAGRAPHS, SENTENCES = 256, 256
PARAGRAPH_SENTENCES = (3, 6)
MIN_WORDS = 5
SEED = 0
ABBREVIATIONS = {"Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Jr.", "Sr.", "Gen.", "Sen.", "Lt.", "Col.", "Capt.", "Sgt.",
                 "Prof.", "Rev.", "No.", "Co.", "Corp.", "Inc.", "Ltd.", "U.S.", "U.N.", "Mt."}
_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def split_sentences(text: str) -> list[str]:
    """Sentences of one article: split after . ! ? before a capital, except after a known abbreviation."""
    sentences: list[str] = []
    for piece in _BOUNDARY.split(" ".join(text.split())):
        if sentences and sentences[-1].split()[-1] in ABBREVIATIONS:
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return sentences


def general_calibration_texts(seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    articles = [split_sentences(line) for line in gensim_data_file("lee_background.cor").read_text("latin-1").splitlines()]
    articles = [a for a in articles if a]
    order = list(range(len(articles)))
    rng.shuffle(order)
    paragraphs: list[str] = []
    leftovers: list[list[str]] = []
    used: set[str] = set()  # every sentence appears at most once in the whole set (some articles repeat)
    for index in order:
        sentences = articles[index]
        size = rng.randint(*PARAGRAPH_SENTENCES)
        if len(paragraphs) < PARAGRAPHS and len(sentences) >= size:
            start = rng.randrange(len(sentences) - size + 1)
            window = sentences[start : start + size]
            if not used.intersection(window):
                paragraphs.append(" ".join(window))
                used.update(window)
                sentences = sentences[:start] + sentences[start + size :]
        leftovers.append([s for s in sentences if len(s.split()) >= MIN_WORDS])
    if len(paragraphs) < PARAGRAPHS:
        raise ValueError(f"only {len(paragraphs)} articles are long enough for a paragraph; {PARAGRAPHS} needed")
    singles: list[str] = []
    while len(singles) < SENTENCES:  # round-robin over articles: one sentence from each in turn
        pool = [article for article in leftovers if article]
        if not pool:
            raise ValueError(f"only {len(singles)} distinct sentences left; {SENTENCES} needed")
        for article in pool:
            sentence = article.pop(rng.randrange(len(article)))
            if sentence not in used and len(singles) < SENTENCES:
                used.add(sentence)
                singles.append(sentence)
    texts = paragraphs + singles
    rng.shuffle(texts)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=GENERAL_CALIBRATION_FILE)
    args = parser.parse_args()
    texts = general_calibration_texts()
    args.output.write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(f"wrote {len(texts)} texts ({PARAGRAPHS} paragraphs, {SENTENCES} sentences) to {args.output}")


if __name__ == "__main__":
    main()
