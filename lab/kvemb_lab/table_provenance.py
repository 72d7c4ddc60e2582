"""Provenance of a published table: the commit, package versions and asset names, never a machine path.

MERGER: a stand-in written because lab/kvemb_lab/provenance.py did not exist on this branch; replace the import
in mteb_table.py with kvemb_lab.provenance's function and delete this file.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvemb_st.benchmark.run import VERSIONED

REPOSITORY = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def provenance(assets: Mapping[str, str]) -> dict[str, Any]:
    """The commit (``+dirty`` with uncommitted changes to tracked files), versions and the named assets."""
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    versions = {package: importlib.metadata.version(package) for package in VERSIONED}
    return {"commit": f"{commit}+dirty" if commit and dirty else commit, "versions": versions, "assets": dict(assets)}
