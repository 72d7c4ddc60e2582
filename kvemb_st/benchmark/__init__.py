"""MTEB through mteb's own code: its task objects fed from local files, our models with an identity mteb keys on.

``mteb`` is an optional extra (``pip install 'kvemb-st[mteb]'``) and is imported only inside the functions that
need it, so ``import kvemb_st`` never needs it; :func:`import_mteb` gives the one error message for its absence.
"""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = "pip install 'kvemb-st[mteb]'"


def import_mteb() -> ModuleType:
    """``mteb``, or an ImportError that names the extra to install."""
    try:
        import mteb
    except ImportError as err:
        raise ImportError(f"MTEB evaluation needs the mteb package ({err}); install it with: {INSTALL_HINT}") from None
    return mteb
