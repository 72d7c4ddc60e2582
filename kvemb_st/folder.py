"""Reading the files of a saved model folder, so that a damaged file fails at load instead of giving garbage vectors.

Every file a folder loads goes through here: JSON files must parse and hold the right kind of value, tensor files
must parse and hold exactly the expected float32 tensors, with the expected shapes and only finite values.
Each error names the file, what is wrong with it, and what to do (:data:`REMEDY`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

REMEDY = "rebuild the model folder (`kvemb build`, or save the model again) or download it again"


class DamagedFileError(ValueError):
    """A file of a model folder cannot be used as it is; the message names the file, the problem and the fix."""


def damaged(path: str, problem: str) -> DamagedFileError:
    return DamagedFileError(f"{path}: {problem}; {REMEDY}")


def read_json(path: str, kind: type = dict) -> Any:
    """The JSON value of ``path``, which must be a ``kind`` (an object, or a list for ``modules.json``)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise damaged(path, f"not valid JSON ({err}): the file is damaged or truncated") from None
    if not isinstance(value, kind):
        expected = {dict: "an object", list: "a list"}.get(kind, kind.__name__)
        raise damaged(path, f"holds {type(value).__name__} {_short(value)}, expected {expected}")
    return value


def load_float32_tensors(path: str, shapes: Mapping[str, tuple[int, ...]], needs: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, which must be exactly ``shapes`` (name -> shape), float32 and finite.

    ``needs`` says where the expected shapes come from (e.g. the config's mode and dimensions).
    """
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:  # truncated, garbage bytes, a bad header
        raise damaged(path, f"not a readable safetensors file ({err}): it is truncated or corrupt") from None
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        found = f"missing tensor(s) {missing}" if missing else f"unexpected tensor(s) {extra}"
        raise damaged(path, f"{found}: {needs} needs exactly {sorted(shapes)} (holds {sorted(tensors)})")
    for name, shape in shapes.items():
        tensor = tensors[name]
        if tensor.dtype != torch.float32:
            raise damaged(path, f"tensor '{name}' is {str(tensor.dtype).removeprefix('torch.')}, expected float32")
        if tuple(tensor.shape) != tuple(shape):
            raise damaged(path, f"tensor '{name}' has shape {tuple(tensor.shape)}, but {needs} needs {tuple(shape)}")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise damaged(path, f"tensor '{name}' holds {bad} NaN or infinite value(s) of {tensor.numel()}")
    return tensors


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class CheckedConfigMixin:
    """``load_config`` of a sentence-transformers module, through :func:`read_json` (ST's own reads it bare)."""

    @classmethod
    def load_config(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        config_filename: str | None = None,
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
    ) -> dict[str, Any]:
        path = cls.load_file_path(  # type: ignore[attr-defined]
            model_name_or_path,
            config_filename or cls.config_file_name,  # type: ignore[attr-defined]
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        return {} if path is None else read_json(path)
