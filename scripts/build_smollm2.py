"""Build the KV-Embedding model of SmolLM2-135M-Instruct with the default calibration set, offline.

Runs ``kvemb build`` on the locally dequantised SmolLM2 folder (``kvemb_st.assets.smollm2_folder``),
prints the ID curve and the chosen layers, and copies the plot to ``docs/id_curve_smollm2.png`` for
the README. Extra arguments are passed to ``kvemb build`` (e.g. ``--eval-results results.json``).

    python scripts/build_smollm2.py -o /tmp/kvemb-smollm2
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from kvemb_st.assets import smollm2_folder
from kvemb_st.build import PLOT_FILE
from kvemb_st.cli import main as kvemb

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DOCS_PLOT = Path(__file__).resolve().parent.parent / "docs" / "id_curve_smollm2.png"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("kvemb-smollm2"))
    args, extra = parser.parse_known_args()
    status = kvemb(
        [
            "build",
            str(smollm2_folder()),
            "-o",
            str(args.output),
            "--base-model-id",
            HUB_ID,
            "--local-files-only",
            *extra,
        ]
    )
    if status == 0:
        DOCS_PLOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(args.output / PLOT_FILE, DOCS_PLOT)
        print(f"plot copied to {DOCS_PLOT}")
    return status


if __name__ == "__main__":
    sys.exit(main())
