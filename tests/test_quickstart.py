"""The README's main command runs: the quickstart builds the default model on the shipped SmolLM2, reloads it, searches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_builds_reloads_and_searches(tmp_path):
    run = subprocess.run(
        [sys.executable, str(QUICKSTART), "--output", str(tmp_path / "model"), "--layers", "18-27"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "re-routed layers 18-27, post-processing: whiten" in run.stdout
    assert "Which team won the game?\n  " in run.stdout  # a hit line follows every query
    assert (tmp_path / "model" / "kvemb_config.json").is_file()
