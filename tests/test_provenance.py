"""Provenance of new result files (lab/kvemb_lab/provenance.py): commit, dirty flag, versions, assets, and never a
machine path."""

from __future__ import annotations


import json
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from kvemb_lab.provenance import PACKAGES, provenance


def test_versions_and_assets_are_the_installed_ones(tmp_path):
    record = provenance(["pytest"], repository=tmp_path)  # not a git checkout
    assert record["commit"] is None and record["dirty"] is None
    assert set(record["versions"]) == set(PACKAGES)
    assert record["versions"]["torch"] == metadata.version("torch")
    assert record["assets"] == [f"pytest=={pytest.__version__}"]


def test_an_asset_that_is_not_installed_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no-such-asset-package.*not installed"):
        provenance(["no-such-asset-package"], repository=tmp_path)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_commit_and_dirty_follow_the_checkout(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("commit", "-qm", "a")
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True, check=True).stdout.strip()
    clean = provenance(repository=tmp_path)
    assert clean["commit"] == head and clean["dirty"] is False
    (tmp_path / "b.txt").write_text("b")  # an untracked file: the commit alone no longer reproduces the run
    assert provenance(repository=tmp_path)["dirty"] is True
    assert str(tmp_path) not in json.dumps(provenance(repository=tmp_path))


def test_public_names_and_commands_hold_no_machine_path():
    from kvemb_st.public_paths import public_command, public_name

    from kvemb_lab import provenance as lab_provenance

    assert (lab_provenance.public_command, lab_provenance.public_name) == (public_command, public_name)  # one helper
    assert public_name("/root/.cache/kvemb_st/gemma-3-270m") == "gemma-3-270m"
    assert public_name("../shared/mteb") == "mteb" and public_name("~/models/m-kvemb") == "m-kvemb"
    assert public_name("relative/folder") == "relative/folder" and public_name(None) is None
    command = public_command(["--base", "/root/x/qwen", "--out=/work/r", "load:/work/models/m-kvemb", "mean",
                              "--data-dir", "../shared/mteb", "--tasks", "STS12,SciFact", "kv:layers=20-29"])
    assert command == "--base qwen --out=r load:m-kvemb mean --data-dir mteb --tasks STS12,SciFact kv:layers=20-29"


MACHINE_PATH = re.compile(r"""(?<![\w.~-])/(?:root|home|work|tmp|Users|mnt|var|opt|check)/""")


def test_no_published_file_names_a_machine_path():
    """Results, docs and the README name folders, never where they lay on the machine that ran them."""
    root = Path(__file__).resolve().parents[1]
    published = [root / "README.md", *(root / "docs").rglob("*.md"), *(root / "results").rglob("*.json"),
                 *(root / "results").rglob("*.md")]  # fmt: skip
    leaks = [f"{path.relative_to(root)}: {match.group(0)}" for path in published
             for match in [MACHINE_PATH.search(path.read_text(encoding="utf-8"))] if match]  # fmt: skip
    assert not leaks, leaks


def test_every_markdown_result_file_has_a_provenance_line():
    """docs/results-index.md promises it: a table someone reads can be traced without opening its JSON."""
    root = Path(__file__).resolve().parents[1]
    missing = [str(path.relative_to(root)) for path in (root / "results").rglob("*.md")
               if "Provenance" not in path.read_text(encoding="utf-8")]  # fmt: skip
    assert not missing, missing
