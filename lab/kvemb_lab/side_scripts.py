"""The command line and model of a script that runs one side of a backbone (long_documents, selective_pooling)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import kvemb_st

from kvemb_lab.backbones import BACKBONES
from kvemb_lab.paths import RESULTS


def side_script_parser(doc: str, sides_help: str, topic: str) -> argparse.ArgumentParser:
    """The options every script that runs one side of a backbone shares (long_documents, selective_pooling); its
    files go to ``--out``/BACKBONE/, by default ``results/<topic>/BACKBONE/``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("backbone", choices=sorted(BACKBONES))
    parser.add_argument("--sides", required=True, help=sides_help)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "kvemb_st" / "probe")
    parser.add_argument("--out", type=Path, default=RESULTS / topic, help="topic folder (default: %(default)s)")
    return parser


def side_model(args: argparse.Namespace, layers: str | None = None, **kwargs: Any):
    """The backbone re-routed at ``layers`` (default: its build window) with ``--sides``; sets ``--threads``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = BACKBONES[args.backbone]
    return kvemb_st.from_base(str(backbone.folder()), layers or backbone.layers, sides=json.loads(args.sides), **kwargs)
