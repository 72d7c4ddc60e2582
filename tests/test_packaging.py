"""The wheel carries what an installed copy needs outside Python code: the card template and calibration set."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_data_and_renders_cards_outside_the_checkout(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("kvemb_st-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {"kvemb_st/model_cards/kvemb_model_card.md", "kvemb_st/data/calibration.txt"} <= names
        archive.extractall(tmp_path / "site")
    script = (
        "import kvemb_st, kvemb_st.model_card as card, kvemb_st.calibration as cal\n"
        "print(kvemb_st.__file__)\n"
        "assert card.TEMPLATE.read_text(encoding='utf-8').startswith('---')\n"
        "assert '## Post-processing' in card.TEMPLATE.read_text(encoding='utf-8')\n"
        "assert len(cal.load_calibration(None, None)) == 512\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(tmp_path / "site"))  # the wheel's copy, not the checkout
