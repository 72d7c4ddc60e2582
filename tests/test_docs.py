"""The documentation site builds with ``mkdocs build --strict``: no broken link, anchor or nav entry, no page left out
of the nav. Result files live outside ``docs/``, so pages name them in code spans instead of linking to them."""

from __future__ import annotations

import os
import re
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


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NAMED_PATH = re.compile(r"(?<![\w/.$-])((?:results|experiments|tools|examples|lab|kvemb_st|tests|docs)/[\w./{},-]*)")
NOT_CHECKED_IN = {
    "kvemb_st/id_curves/",  # a folder of the user's cache, named as the cache names it
    "results/gpu/",  # where tools/gpu_check.sh puts its tables, once it has run on a GPU
}


def named_paths(line: str) -> list[str]:
    """Repository paths a line names (``a.{json,md}`` is two); placeholders (``BACKBONE``, ``<out>``, ``*``) are
    skipped, and so are the commands the results index records as they were run (their paths are of that commit)."""
    if "command:" in line:
        return []
    paths = []
    for match in NAMED_PATH.finditer(line):
        path, after = match.group(1).rstrip(".,"), line[match.end() : match.end() + 1]
        if (after and after in "<*") or any(part.isupper() for part in path.split("/")) or ".." in path:
            continue
        head, brace, tail = path.partition("{")
        options, _, rest = tail.partition("}")
        expanded = [head + option + rest for option in options.split(",")] if brace else [path]
        paths += [p for p in expanded if p.endswith("/") or "." in p.rsplit("/", 1)[-1]]
    return paths


def test_every_repository_path_a_page_names_exists():
    """mkdocs cannot check the result files, scripts and modules the pages name in code spans; this does."""
    missing = [f"{page.relative_to(ROOT)}:{n}: {path}"
               for page in PAGES for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
               for path in named_paths(line) if path not in NOT_CHECKED_IN and not (ROOT / path).exists()]  # fmt: skip
    assert not missing, "pages name paths that do not exist:\n" + "\n".join(missing)
