"""Where the lab reads and writes checked-in results: the repository's ``results/`` (the lab is used from a checkout)."""

from __future__ import annotations

from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]  # lab/kvemb_lab/paths.py -> the repository root
RESULTS = REPOSITORY / "results"
