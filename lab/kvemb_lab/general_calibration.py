"""The ``general`` calibration set, built on demand from gensim's test data -- never shipped in the wheel.

Source: ``lee_background.cor`` of gensim's test data (``pip install --no-deps gensim==4.4.0``), 300 Australian
news articles (ABC, 2001-2002) collected by Lee, Pincombe & Welsh (2005) as the *background* corpus of their
similarity study, i.e. other documents than the 50 they scored (``lee.cor``, one of our evaluation sets), and
unrelated to STS-B and to the newsgroups set. The article text is copyright of its publisher and reaches PyPI
only inside gensim's LGPL-2.1 wheel as research test data, so kvemb-st does not redistribute it: the set is
rebuilt from the installed gensim files whenever it is asked for by name (``general``).

The set mixes 256 paragraphs (3-6 consecutive sentences of one article, ~100 tokens) and 256 single sentences
(from the remaining sentences of the articles), no sentence used twice, shuffled so that any prefix is a mix
too. Deterministic (seed 0): the same gensim file gives the same set.
"""

from __future__ import annotations

import random
import re

from kvemb_lab.doc_tasks import gensim_data_file

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
    """The 512 texts (see the module docstring); needs gensim's test data installed."""
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
