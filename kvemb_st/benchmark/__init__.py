"""MTEB through mteb's own code: its task objects fed from local files, our models with an identity mteb keys on.

``mteb`` is an optional extra (``pip install 'kvemb-st[mteb]'``) and is imported only inside the functions that
need it, so ``import kvemb_st`` never needs it; :func:`import_mteb` gives the one error message for its absence.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

INSTALL_HINT = "pip install 'kvemb-st[mteb]'"
# Raised by mteb's own code on every run (its calls to a renamed sentence-transformers method and to its own
# deprecated argument); nothing about the model, and nothing a user of kvemb eval can change.
MTEB_INTERNAL_WARNINGS = (
    r"The `get_sentence_embedding_dimension` method has been renamed",
    r"The fill_missing parameter is deprecated",
)


def import_mteb() -> ModuleType:
    """``mteb``, or an ImportError that names the extra to install."""
    try:
        import mteb
    except ImportError as err:
        raise ImportError(f"MTEB evaluation needs the mteb package ({err}); install it with: {INSTALL_HINT}") from None
    return mteb


@contextmanager
def quiet_mteb() -> Iterator[None]:
    """Silence :data:`MTEB_INTERNAL_WARNINGS` (only those) around a call into mteb."""
    with warnings.catch_warnings():
        for message in MTEB_INTERNAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield
