"""The documentation site builds with ``mkdocs build --strict``: no broken link, anchor or nav entry, no page left out
of the nav. Result files live outside ``docs/``, so pages name them in code spans instead of linking to them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[test]' installs mkdocs-material")
pytest.importorskip("material", reason="mkdocs-material (the site's theme) is not installed: pip install -e '.[test]'")


def test_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "index.html").is_file() and (site / "results-index" / "index.html").is_file()
