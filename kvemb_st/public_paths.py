"""Paths and command lines as a published result may record them: never where files lie on one machine.

A result names the command that produced it; a machine path in it (``/root/.cache/...``, ``../shared/mteb``) tells
a reader nothing and leaks the layout of the machine that ran it. Both ``kvemb eval`` and the lab record commands
through :func:`public_command`.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from pathlib import Path


def public_name(value: str | None) -> str | None:
    """A path as a result may record it: absolute paths and paths that climb out (``..``, ``~``) become their
    folder or file name (``/root/.cache/kvemb_st/gemma-3-270m`` -> ``gemma-3-270m``); anything else is kept."""
    if value is None:
        return None
    path = Path(value)
    if path.is_absolute() or (path.parts and path.parts[0] in ("..", "~")):
        return path.name
    return value


def public_word(word: str) -> str:
    """One command-line word with such a path, also in ``--opt=PATH`` or ``spec:PATH``, cut to its name."""
    head, sep, tail = word.rpartition("=") if "=" in word else word.rpartition(":")
    if sep and public_name(tail) != tail:
        return f"{head}{sep}{public_name(tail)}"
    return public_name(word) or word


def public_command(words: Iterable[str]) -> str:
    """A command line with every such path cut to its name (:func:`public_word`)."""
    return shlex.join(public_word(word) for word in words)
