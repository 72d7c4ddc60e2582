"""The on-disk cache of ID curves, keyed by (base model, revision, local files, template, calibration hash,
estimator, max length): a rebuild with other knobs does not run the calibration forward passes again."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CACHE_FORMAT = 1


def cache_root() -> Path:
    """Where kvemb-st caches derived files (``$KVEMB_CACHE``, default ``~/.cache/kvemb_st``)."""
    return Path(os.environ.get("KVEMB_CACHE", Path.home() / ".cache" / "kvemb_st"))


def _source_fingerprint(base_model: str) -> list[Any] | None:
    """Size and mtime of a local model's files, so that a model re-saved at the same path is not a cache hit."""
    path = Path(base_model)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    else:
        return None  # a Hub id: the revision identifies it
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cache_key(
    base_model: str, revision: str | None, template: str, calib_hash: str, estimator: str, max_seq_length: int
) -> str:
    local = os.path.exists(base_model)
    key = {
        "format": CACHE_FORMAT,
        "base_model": os.path.abspath(base_model) if local else base_model,
        "revision": revision,
        "fingerprint": _source_fingerprint(base_model),
        "template": template,
        "calibration_hash": calib_hash,
        "estimator": estimator,
        "max_seq_length": max_seq_length,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    return cache_root() / "id_curves"



def read_cached_curve(path: Path, num_layers: int) -> list[float] | None:
    try:
        with open(path, encoding="utf-8") as f:
            curve = json.load(f)["id_curve"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(curve, list) or len(curve) != num_layers:
        return None
    return [float(value) for value in curve]


def write_cached_curve(path: Path, curve: list[float]) -> None:
    """Write atomically (temp file + rename): concurrent builds must never read a half-written curve."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"id_curve": curve}, f)
    os.replace(tmp, path)
