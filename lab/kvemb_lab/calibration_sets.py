"""Calibration sets by name for the lab: the product's named sets plus ``general``, joined by ``+`` the same way.

``general`` (:mod:`kvemb_lab.general_calibration`) is rebuilt from gensim's LGPL test data and never shipped, so the
product does not know the name; experiments and the harness ask for it here.
"""

from __future__ import annotations

import os

from kvemb_st.calibration import JOIN, load_calibration

from kvemb_lab.general_calibration import general_calibration_texts

GENERAL = "general"


def calibration_texts(source: str | os.PathLike[str] | None = None, limit: int | None = None) -> list[str]:
    """The default set (``None``), a named set (``general`` or one of
    :data:`kvemb_st.calibration.NAMED_CALIBRATION_SETS`, several joined by ``+``: ``sts-b-train+general``) or a
    file; repeated texts of joined sets are dropped, ``limit`` keeps the first texts."""
    parts = [part.strip() for part in source.split(JOIN)] if isinstance(source, str) else []
    if GENERAL not in parts:
        return load_calibration(source or None, limit)
    texts = [t for part in parts for t in (general_calibration_texts() if part == GENERAL else load_calibration(part))]
    return load_calibration(list(dict.fromkeys(texts)), limit)
