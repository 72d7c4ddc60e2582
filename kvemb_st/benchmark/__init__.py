"""MTEB through mteb's own code: its task objects fed from local files, our models with an identity mteb keys on.

``mteb`` is an optional extra (``pip install 'kvemb-st[mteb]'``) and is imported only inside the functions that
need it, so ``import kvemb_st`` never needs it; :func:`import_mteb` gives the one error message for its absence.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from types import ModuleType
from typing import Any

INSTALL_HINT = "pip install 'kvemb-st[mteb]'"
MTEB_VERSIONS = (2, 26), (3, 0)  # the extra's range (pyproject.toml): its result cache, wrappers and benchmarks
# The classic English MTEB, which holds all 14 tasks of our table and is what the paper and the leaderboard score:
# a task listed there is evaluated on its splits and subsets there (AmazonCounterfactual: test split, "en" only,
# where mteb.get_task alone averages validation and test over four languages).
ENGLISH_BENCHMARK = "MTEB(eng, v1)"
# Raised by mteb's own code on every run (its calls to a renamed sentence-transformers method and to its own
# deprecated argument); nothing about the model, and nothing a user of kvemb eval can change.
MTEB_INTERNAL_WARNINGS = (
    r"The `get_sentence_embedding_dimension` method has been renamed",
    r"The fill_missing parameter is deprecated",
)


def import_mteb() -> ModuleType:
    """``mteb``, or an ImportError that names the extra to install (also for an mteb outside the extra's range)."""
    try:
        import mteb
    except ImportError as err:
        raise ImportError(f"MTEB evaluation needs the mteb package ({err}); install it with: {INSTALL_HINT}") from None
    version = tuple(int(part) for part in re.findall(r"\d+", mteb.__version__)[:2])
    low, high = MTEB_VERSIONS
    if not low <= version < high:
        raise ImportError(
            f"mteb {mteb.__version__} is installed; kvemb-st works with mteb >={'.'.join(map(str, low))},"
            f"<{'.'.join(map(str, high))}: {INSTALL_HINT} --upgrade"
        )
    return mteb


@contextmanager
def quiet_mteb() -> Iterator[None]:
    """Silence :data:`MTEB_INTERNAL_WARNINGS` (only those) around a call into mteb."""
    with warnings.catch_warnings():
        for message in MTEB_INTERNAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


@lru_cache(maxsize=1)
def _english_scopes() -> dict[str, tuple[list[str], list[str]]]:
    tasks = import_mteb().get_benchmark(ENGLISH_BENCHMARK).tasks
    return {task.metadata.name: (list(task.eval_splits), list(task.hf_subsets)) for task in tasks}


def get_task(name: str, eval_splits: Sequence[str] | None = None) -> Any:
    """mteb's task ``name``, scoped as :data:`ENGLISH_BENCHMARK` scores it (mteb's own scope for a task not listed
    there), so a main score here is the benchmark's number whether the data comes from the Hub or a local copy.
    ``eval_splits`` overrides the splits (a dev run's validation split)."""
    scopes = _english_scopes()
    splits, subsets = scopes.get(name, (None, None))
    try:
        return import_mteb().get_task(name, eval_splits=eval_splits or splits, hf_subsets=subsets)
    except KeyError as err:  # mteb's own "did you mean" guesses from every task; a benchmark task named in short
        close = [task for task in scopes if task.lower().startswith(name.lower())]
        if not close:
            raise
        raise KeyError(f"{err.args[0]}; in {ENGLISH_BENCHMARK}: {', '.join(close)}") from None
