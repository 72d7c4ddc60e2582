"""Document-level evaluation data that ships on PyPI, and a synthetic long-input (passkey) task.

Real data comes from gensim's test data (``pip install --no-deps gensim==4.4.0``), read from the installed
files; gensim itself is never imported (it pulls in scipy and smart_open):

- **Lee** (Lee, Pincombe & Welsh 2005, "An empirical evaluation of models of text document similarity"):
  50 Australian news articles and the mean human similarity (0-1) of all 1,225 pairs
  (``lee.cor``, ``similarities0-1.txt``). No split exists: the whole set is used.
- **Newsgroups**: 200 Usenet posts from 1993, 100 ``alt.atheism`` and 100 ``sci.space``
  (``mini_newsgroup``, an sklearn ``Bunch`` pickled by gensim's tests). Headers, quoted replies and
  signatures are removed: the header names the newsgroup, i.e. the label. Split into seeded, stratified
  halves ``dev``/``test`` so that choices can be made on one half and reported on the other.
- **Newsgroups subject -> body retrieval**: the same posts; each distinct ``Subject:`` (``Re:`` removed) is a
  query whose relevant documents are the bodies of every post with that subject (seeded halves of the queries).

The **passkey** task hides a needle sentence ("Ann Smith's pass key is 12345 ...") at a random depth of
real filler sentences (STS-B *train*, minus the default calibration set); the query asks for the pass key of
that person, and the document must be found among ``n_docs`` documents of the same token length. Each
document is exactly ``length`` tokens long (the text alone, without template or special tokens). The **needle**
task (``kind="needle"``, after LongEmbed's needle-in-a-haystack) builds the same documents around a fact instead
("The best thing to do in Porto is to ...") and asks "What is the best thing to do in Porto?".
"""

from __future__ import annotations

import io
import pickle
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kvemb_st.calibration import DEFAULT_CALIBRATION_FILE, read_calibration_file

from kvemb_lab.assets import load_sts_b, package_dir

GENSIM_PACKAGE = "gensim"
GENSIM_INSTALL = "pip install --no-deps gensim==4.4.0"
NEWSGROUPS_SPLITS = ("dev", "test", "all")
PASSKEY_LENGTHS = (512, 1024, 2048, 4096)
NEEDLE_MARGIN = 8  # tokens of slack: pieces are counted one by one, the document as a whole
FIRST_NAMES = ("Ann", "Boris", "Chen", "Dara", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kofi", "Lena",
               "Marek", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yusuf")
LAST_NAMES = ("Abbott", "Baker", "Costa", "Dimitrov", "Eriksen", "Fischer", "Garcia", "Haddad", "Ito", "Jensen",
              "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quiroga", "Rossi", "Sato", "Tanaka")


@dataclass(frozen=True)
class DocumentTask:
    """Retrieval: queries, a corpus and the relevant corpus ids of each query."""

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant: dict[str, set[str]]


@dataclass(frozen=True)
class SimilarityTask:
    """Graded similarity of text pairs: ``pairs[k] = (i, j, score)`` indexes ``texts``."""

    texts: tuple[str, ...]
    pairs: tuple[tuple[int, int, float], ...]

    def text_pairs(self) -> list[tuple[str, str, float]]:
        return [(self.texts[i], self.texts[j], score) for i, j, score in self.pairs]


@dataclass(frozen=True)
class TopicTask:
    """Texts with one topic label each (``labels[k]`` indexes ``label_names``)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]


def gensim_test_data() -> Path:
    return package_dir(GENSIM_PACKAGE, GENSIM_INSTALL) / "test" / "test_data"


def gensim_data_file(name: str) -> Path:
    path = gensim_test_data() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{GENSIM_INSTALL}`")
    return path


# ------------------------------------------------------------------------------------------------ Lee
def load_lee() -> SimilarityTask:
    """The 50 Lee documents and their 1,225 human-scored pairs (upper triangle of the score matrix)."""
    texts = tuple(" ".join(line.split()) for line in gensim_data_file("lee.cor").read_text("latin-1").splitlines())
    texts = tuple(t for t in texts if t)
    rows = [line.split() for line in gensim_data_file("similarities0-1.txt").read_text("ascii").splitlines() if line.strip()]
    n = len(texts)
    if len(rows) != n or any(len(row) != n for row in rows):
        raise ValueError(f"gensim's Lee files disagree: {n} documents but a {len(rows)}-row score matrix; {GENSIM_INSTALL}")
    pairs = tuple((i, j, float(rows[i][j])) for i in range(n) for j in range(i + 1, n))
    return SimilarityTask(texts, pairs)


# ----------------------------------------------------------------------------------------- Newsgroups
class _BunchUnpickler(pickle.Unpickler):
    """Unpickle gensim's sklearn ``Bunch`` as a dict, allowing only the few classes it is made of."""

    ALLOWED = {
        ("copy_reg", "_reconstructor"): ("copyreg", "_reconstructor"),
        ("__builtin__", "object"): ("builtins", "object"),
        ("__builtin__", "dict"): ("builtins", "dict"),
        ("sklearn.datasets.base", "Bunch"): ("builtins", "dict"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"mini_newsgroup holds an unexpected object {module}.{name}; {GENSIM_INSTALL}")
        return super().find_class(*self.ALLOWED[module, name])


_QUOTE = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")


def clean_newsgroup_post(post: str) -> str:
    """The body alone: header (up to the first blank line), quoted lines and a trailing signature removed.

    The rules of sklearn's ``remove=("headers", "footers", "quotes")`` for 20 Newsgroups, except that only a
    dashes line starts the signature (sklearn also cuts at the last blank line, dropping a closing paragraph).
    """
    _, _, body = post.partition("\n\n")
    lines = [line for line in body.splitlines() if not _QUOTE.search(line)]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip().strip("-") == "" and lines[i].strip():  # the last "--" line starts the signature
            lines = lines[:i]
            break
    return " ".join(" ".join(lines).split())


def _newsgroup_posts() -> tuple[list[str], list[int], tuple[str, ...]]:
    """The raw posts (headers included), their labels and the label names."""
    raw = zlib.decompress(gensim_data_file("mini_newsgroup").read_bytes())
    bunch = _BunchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    names = tuple(str(name) for name in bunch["target_names"])
    return [str(text) for text in bunch["data"]], [int(label) for label in bunch["target"]], names


def _seeded_half(members: Sequence[int], split: str, rng: random.Random) -> list[int]:
    """``dev``: a seeded half of ``members``; ``test``: the other half."""
    members = list(members)
    rng.shuffle(members)
    half = len(members) // 2
    return members[:half] if split == "dev" else members[half:]


def _check_split(split: str) -> None:
    if split not in NEWSGROUPS_SPLITS:
        raise ValueError(f"newsgroups split must be one of {NEWSGROUPS_SPLITS}, got {split!r}")


def load_newsgroups(split: str = "all", seed: int = 0) -> TopicTask:
    """The cleaned posts; ``dev``/``test`` are seeded halves of each topic (posts left empty are dropped)."""
    _check_split(split)
    texts, labels, names = _newsgroup_posts()
    posts = [(clean_newsgroup_post(text), label) for text, label in zip(texts, labels)]
    posts = [(text, label) for text, label in posts if text]
    if split != "all":
        rng = random.Random(seed)
        keep = []
        for label in range(len(names)):
            keep += _seeded_half([i for i, (_, lab) in enumerate(posts) if lab == label], split, rng)
        posts = [posts[i] for i in sorted(keep)]
    texts, labels = zip(*posts)
    return TopicTask(tuple(texts), tuple(labels), names)


_REPLY = re.compile(r"^(re\s*:\s*)+", re.IGNORECASE)


def newsgroup_subject(post: str) -> str:
    """The ``Subject:`` of a raw post without its ``Re:`` prefixes (``""`` if it has none)."""
    header, _, _ = post.partition("\n\n")
    line = next((line for line in header.splitlines() if line.lower().startswith("subject:")), "subject:")
    return " ".join(_REPLY.sub("", line[len("subject:") :].strip()).split())


def load_newsgroup_retrieval(split: str = "all", seed: int = 0) -> DocumentTask:
    """Subject -> body retrieval over the newsgroups posts.

    Each distinct subject (``Re:`` removed) is a query; its relevant documents are the cleaned bodies of every
    post with that subject; the corpus is every non-empty body. ``dev``/``test`` are seeded halves of the
    queries over the same corpus, so a choice made on dev never sees a test query.
    """
    _check_split(split)
    corpus, relevant = {}, {}
    for i, post in enumerate(_newsgroup_posts()[0]):
        body = clean_newsgroup_post(post)
        subject = newsgroup_subject(post)
        if body:
            corpus[f"d{i}"] = body
            if subject:
                relevant.setdefault(subject, set()).add(f"d{i}")
    subjects = sorted(relevant)
    if split != "all":
        subjects = sorted(_seeded_half(range(len(subjects)), split, random.Random(seed)))
        subjects = [sorted(relevant)[i] for i in subjects]
    queries = {f"q{k}": subject for k, subject in enumerate(subjects)}
    return DocumentTask(queries, corpus, {f"q{k}": relevant[subject] for k, subject in enumerate(subjects)})


# -------------------------------------------------------------------------------------------- passkey
@dataclass(frozen=True)
class PasskeyTask:
    """``n`` documents of exactly ``length`` tokens; document ``i`` hides ``needles[i]`` at ``depths[i]``.

    ``depths`` are the realised depths: tokens before the needle / ``length``.
    """

    length: int
    documents: tuple[str, ...]
    needles: tuple[str, ...]
    queries: tuple[str, ...]
    depths: tuple[float, ...]

    def retrieval(self) -> DocumentTask:
        return DocumentTask(
            queries={f"q{i}": q for i, q in enumerate(self.queries)},
            corpus={f"d{i}": d for i, d in enumerate(self.documents)},
            relevant={f"q{i}": {f"d{i}"} for i in range(len(self.queries))},
        )


def passkey_fillers() -> list[str]:
    """Distinct STS-B train sentences (never evaluated on, none of the default calibration set), as prose."""
    excluded = set(read_calibration_file(DEFAULT_CALIBRATION_FILE))
    seen: set[str] = set()
    fillers = []
    for s1, s2, _ in load_sts_b("train"):
        for sentence in (s1, s2):
            text = " ".join(sentence.split())
            if len(text.split()) >= 4 and text not in excluded and text not in seen:
                seen.add(text)
                fillers.append(text if text[-1] in ".!?\"'" else text + ".")
    return fillers


CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tbilisi", "Hobart", "Tromso", "Cusco", "Marrakesh", "Hanoi",
          "Reykjavik", "Valparaiso", "Zanzibar", "Ljubljana", "Cartagena", "Tallinn", "Luang Prabang", "Oaxaca",
          "Bergen", "Kyoto", "Windhoek", "Salzburg", "Ushuaia", "Porto")
ACTIVITIES = ("rent a rowing boat at sunrise", "eat grilled sardines by the harbour", "climb the old lighthouse",
              "take the night train into the mountains", "buy spices at the covered market",
              "swim in the hot springs after dark", "watch the puppet theatre on Sunday", "cycle along the river dam",
              "learn to bake flatbread with a local family", "listen to the brass band in the main square",
              "hike to the glacier viewpoint", "ride the cable car to the monastery", "tour the abandoned salt mine",
              "sketch the street murals of the old port", "kayak through the mangrove channels",
              "visit the museum of antique clocks", "drink mint tea on a rooftop terrace",
              "watch the fishermen mend their nets", "ski down the volcano in spring", "collect shells on the black beach",
              "join the lantern parade at midnight", "sample cheese in the monastery cellar",
              "follow the tram line to its last stop", "feed the ducks in the botanical garden")


def _passkey_slots(rng: random.Random, n_docs: int) -> list[str]:
    return rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], n_docs)


def _passkey_needle(rng: random.Random, person: str) -> tuple[str, str]:
    key = rng.randrange(10_000, 100_000)
    return (f"{person}'s pass key is {key}. Remember it. {key} is the pass key for {person}.",
            f"What is the pass key for {person}?")  # fmt: skip


def _fact_slots(rng: random.Random, n_docs: int) -> list[tuple[str, str]]:
    return list(zip(rng.sample(CITIES, n_docs), rng.sample(ACTIVITIES, n_docs)))


def _fact_needle(rng: random.Random, slot: tuple[str, str]) -> tuple[str, str]:
    city, activity = slot
    return f"The best thing to do in {city} is to {activity}.", f"What is the best thing to do in {city}?"


class NeedleKind(NamedTuple):
    """How one kind of needle task draws a slot per document and turns a slot into its needle and query."""

    slots: Callable[[random.Random, int], list]
    needle: Callable[[random.Random, Any], tuple[str, str]]
    most: int  # documents one task can hold: distinct slots


# ``passkey`` is LongEmbed's passkey (a number to find); ``needle`` its needle-in-a-haystack (a fact, asked about in
# words that differ).
NEEDLE_KINDS = {
    "passkey": NeedleKind(_passkey_slots, _passkey_needle, len(FIRST_NAMES) * len(LAST_NAMES)),
    "needle": NeedleKind(_fact_slots, _fact_needle, min(len(CITIES), len(ACTIVITIES))),
}


def build_passkey_task(
    tokenizer: Any,
    length: int,
    n_docs: int = 8,
    seed: int = 0,
    fillers: Sequence[str] | None = None,
    kind: str = "passkey",
) -> PasskeyTask:
    """Deterministic in (``kind``, ``seed``, ``length``); no filler sentence repeats within one task.

    ``tokenizer`` is a fast Hugging Face tokenizer (offsets locate the needle and the exact cut).
    """
    if kind not in NEEDLE_KINDS:
        raise ValueError(f"unknown needle kind {kind!r}; choose one of {sorted(NEEDLE_KINDS)}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the passkey task needs a fast tokenizer (it uses offset mappings)")
    draw_slots, make_needle, most = NEEDLE_KINDS[kind]
    if n_docs < 2 or n_docs > most:
        raise ValueError(f"n_docs must be between 2 and {most} for {kind!r}, got {n_docs}")
    fillers = list(passkey_fillers() if fillers is None else fillers)
    rng = random.Random(f"{kind}-{seed}-{length}")
    rng.shuffle(fillers)
    slots = draw_slots(rng, n_docs)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    costs: dict[int, int] = {}
    cursor = 0

    def next_cost() -> int:  # tokens of the next unused filler sentence (as it follows a space)
        if cursor >= len(fillers):
            raise ValueError(f"{len(fillers)} filler sentences are too few for {n_docs} documents of {length} tokens")
        if cursor not in costs:
            costs[cursor] = count(" " + fillers[cursor])
        return costs[cursor]

    documents, needles, queries, depths = [], [], [], []
    for slot in slots:
        needle, query = make_needle(rng, slot)
        budget = length - count(needle) - NEEDLE_MARGIN
        if budget < 0:
            raise ValueError(f"length {length} is too short for the needle ({count(needle)} tokens)")
        target_before = round(rng.random() * budget)
        before: list[str] = []
        after: list[str] = []
        used = 0
        while used + next_cost() <= target_before:
            used += next_cost()
            before.append(fillers[cursor])
            cursor += 1
        used += count(" " + needle)
        while used <= length + NEEDLE_MARGIN:  # past the length; the document is cut exactly below
            used += next_cost()
            after.append(fillers[cursor])
            cursor += 1
        text = " ".join([*before, needle, *after])
        documents.append(_cut_to_tokens(tokenizer, text, length))
        start = len(" ".join(before)) + (1 if before else 0)
        offsets = tokenizer(documents[-1], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        depths.append(next(i for i, (begin, end) in enumerate(offsets) if end > start) / length)
        needles.append(needle)
        queries.append(query)
    return PasskeyTask(length, tuple(documents), tuple(needles), tuple(queries), tuple(depths))


def _cut_to_tokens(tokenizer: Any, text: str, length: int) -> str:
    """The longest prefix of ``text`` that ends on a token boundary and tokenizes to exactly ``length`` tokens."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for end in range(min(length, len(offsets)), 0, -1):
        prefix = text[: offsets[end - 1][1]]
        if len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) == length:
            return prefix
        if end < length - 8:  # merges at the cut never shift more than a few tokens
            break
    raise ValueError(f"could not cut the passkey document to exactly {length} tokens ({len(offsets)} available)")


# ------------------------------------------------------------------------------------------- metrics
def knn_accuracy(embeddings: np.ndarray, labels: Sequence[int], k: int = 5) -> float:
    """Leave-one-out k-NN accuracy with cosine similarity.

    Each text gets the majority label of its ``k`` most similar other texts; a tie goes to the tied
    label whose member ranks highest (is most similar).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"need one label per embedding row, got {x.shape} embeddings and {len(labels)} labels")
    if not 1 <= k < len(x):
        raise ValueError(f"k must be between 1 and {len(x) - 1} (texts minus one), got {k}")
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    correct = 0
    for i, row in enumerate(similarity):
        ranked = labels[np.argsort(-row, kind="stable")[:k]]
        values, counts = np.unique(ranked, return_counts=True)
        tied = set(values[counts == counts.max()].tolist())
        predicted = next(label for label in ranked if label in tied)
        correct += int(predicted == labels[i])
    return correct / len(x)
