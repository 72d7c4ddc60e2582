"""Calibration texts for layer selection: the shipped default set, a user file, or a list.

The default set (``kvemb_st/data/calibration.txt``) is 512 distinct sentences from the STS-B *train*
split, balanced over captions, news and forum text; ``scripts/make_calibration_set.py`` regenerates it.
It ships inside the package, so a build never downloads anything. The hash identifies a calibration
set in the saved config and in the ID-curve cache key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

DEFAULT_CALIBRATION_FILE = Path(__file__).parent / "data" / "calibration.txt"
GENERAL_CALIBRATION_FILE = Path(__file__).parent / "data" / "calibration_general.txt"
# Shipped sets by name (``kvemb build --calibration general``); a name wins over a same-named relative path.
NAMED_CALIBRATION_SETS = {"sts-b-train": DEFAULT_CALIBRATION_FILE, "general": GENERAL_CALIBRATION_FILE}
JOIN = "+"  # "sts-b-train+general": shipped sets joined in order, repeated texts dropped
MIN_CALIBRATION_TEXTS = 16  # TwoNN needs many more points than this to be reliable; below it, it is noise


def read_calibration_file(path: str | os.PathLike[str]) -> list[str]:
    """One text per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calibration file '{path}' does not exist; pass a text file with one text per line")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def shipped_files(source: object) -> list[Path] | None:
    """The shipped files a set name stands for (``general``; ``sts-b-train+general`` joins them), or ``None``
    when ``source`` is not such a name (a path, a list, ``None``)."""
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
            f"calibration {source!r}: {unknown} are not shipped sets; only {sorted(NAMED_CALIBRATION_SETS)} can be "
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
    files = shipped_files(source)
    if source is None:
        texts = read_calibration_file(DEFAULT_CALIBRATION_FILE)
    elif files:
        texts = list(dict.fromkeys(t for path in files for t in read_calibration_file(path)))
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
