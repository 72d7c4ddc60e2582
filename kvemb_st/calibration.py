"""Calibration texts for layer selection and post-processing: a named set, a user file, or a list.

The default set (``kvemb_st/data/calibration.txt``, name ``sts-b-train``) is 512 distinct sentences from the
STS-B *train* split, balanced over captions, news and forum text; ``tools/make_calibration_set.py``
regenerates it. It ships inside the package, so a build never downloads anything. The hash identifies a
calibration set in the saved config and in the ID-curve cache key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CALIBRATION_FILE = Path(__file__).parent / "data" / "calibration.txt"
PARAGRAPH_CALIBRATION_FILE = Path(__file__).parent / "data" / "calibration_paragraphs.txt"


@dataclass(frozen=True)
class NamedSet:
    """A calibration set known by name: how to get its texts and how a model card names its source."""

    load: Callable[[], list[str]]
    source: str


# Sets by name (``kvemb build --calibration sts-b-train-paragraphs``); a name wins over a same-named relative path.
NAMED_CALIBRATION_SETS = {
    "sts-b-train": NamedSet(lambda: read_calibration_file(DEFAULT_CALIBRATION_FILE), f"{DEFAULT_CALIBRATION_FILE.name}"),
    "sts-b-train-paragraphs": NamedSet(
        lambda: read_calibration_file(PARAGRAPH_CALIBRATION_FILE), PARAGRAPH_CALIBRATION_FILE.name
    ),
}
JOIN = "+"  # "sts-b-train+sts-b-train-paragraphs": named sets joined in order, repeated texts dropped
MIN_CALIBRATION_TEXTS = 16  # TwoNN needs many more points than this to be reliable; below it, it is noise


def read_calibration_file(path: str | os.PathLike[str]) -> list[str]:
    """One text per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calibration file '{path}' does not exist; pass a text file with one text per line")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def named_sets(source: object) -> list[NamedSet] | None:
    """The named sets ``source`` stands for (``sts-b-train+sts-b-train-paragraphs`` joins them), or ``None``
    when it is not such a name (a path, a list, ``None``)."""
    if not isinstance(source, str):
        return None
    if source in NAMED_CALIBRATION_SETS:
        return [NAMED_CALIBRATION_SETS[source]]
    if JOIN not in source:
        return None
    parts = [part.strip() for part in source.split(JOIN)]
    unknown = [part for part in parts if part not in NAMED_CALIBRATION_SETS]
    if unknown:
        raise ValueError(
            f"calibration {source!r}: {unknown} are not named sets; only {sorted(NAMED_CALIBRATION_SETS)} can be "
            f"joined with '{JOIN}' (pass one file of your own instead)"
        )
    return [NAMED_CALIBRATION_SETS[part] for part in parts]


def load_calibration(
    source: str | os.PathLike[str] | Sequence[str] | None = None, limit: int | None = None
) -> list[str]:
    """Return the calibration texts: the default set (``None``), a shipped set by name
    (:data:`NAMED_CALIBRATION_SETS`, or several joined by ``+``), a file path, or a list of strings.

    ``limit`` keeps the first ``limit`` texts (the default file is shuffled, so a prefix is still varied).
    """
    sets = named_sets(source)
    if source is None:
        texts = read_calibration_file(DEFAULT_CALIBRATION_FILE)
    elif sets:
        texts = list(dict.fromkeys(t for named in sets for t in named.load()))
    elif isinstance(source, (str, os.PathLike)):
        texts = read_calibration_file(source)
    else:
        texts = list(source)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()), None)
        if bad is not None:
            raise ValueError(
                f"calibration text at position {bad} is {texts[bad]!r}: "
                "every calibration text must be a non-empty string"
            )
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < MIN_CALIBRATION_TEXTS:
            raise ValueError(f"calibration limit must be an integer >= {MIN_CALIBRATION_TEXTS}, got {limit!r}")
        texts = texts[:limit]
    distinct = len(set(texts))
    if distinct < MIN_CALIBRATION_TEXTS:
        raise ValueError(
            f"calibration set has {distinct} distinct text(s); the intrinsic-dimension estimate needs at least "
            f"{MIN_CALIBRATION_TEXTS} (a few hundred is better): pass more texts"
        )
    return texts


def calibration_hash(texts: Sequence[str]) -> str:
    """``sha256:<hex>`` of the texts in order, one per line (so it equals the hash of a clean calibration file)."""
    digest = hashlib.sha256("".join(f"{text}\n" for text in texts).encode("utf-8")).hexdigest()
    return f"sha256:{digest}"
