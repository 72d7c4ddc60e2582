"""Shared fixtures: tiny random decoder-only models (built in-test with ``from_config``) saved as local folders."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)


def pytest_configure(config: pytest.Config) -> None:
    """mteb's own warnings (kvemb_st.benchmark.MTEB_INTERNAL_WARNINGS), ignored where a test calls mteb directly, as a
    user would: the product silences the same list around its own calls; nothing about the model."""
    from kvemb_st.benchmark import MTEB_INTERNAL_WARNINGS

    for message in MTEB_INTERNAL_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}")


TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=1024,
)
# Gemma 3 as Gemma-3-270M is built: one KV head, a scaling by query_pre_attn_scalar (24 here) instead of head_dim
# (16), local RoPE (theta 1e4) on sliding-window layers and global RoPE (1e6) on full ones. The window (8 tokens)
# is shorter than the test texts; layers 0 and 2 slide, 1 and 3 see everything.
GEMMA3_WINDOW = 8
GEMMA3_TINY = dict(
    TINY,
    num_key_value_heads=1,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=GEMMA3_WINDOW,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
)
ARCHS = {
    "llama": lambda vocab: LlamaConfig(vocab_size=vocab, **TINY),
    "mistral": lambda vocab: MistralConfig(vocab_size=vocab, sliding_window=None, **TINY),
    "qwen2": lambda vocab: Qwen2Config(vocab_size=vocab, **TINY),
    "qwen3": lambda vocab: Qwen3Config(vocab_size=vocab, head_dim=16, **TINY),
    "gemma3_text": lambda vocab: Gemma3TextConfig(vocab_size=vocab, **GEMMA3_TINY),
}


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """The real SmolLM2 tokenizer (fast, 49k vocab), saved alone so tiny models can reuse it."""
    from kvemb_lab.assets import smollm2_folder

    path = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained(path)
    return path


def make_tiny_model(arch: str, directory, tokenizer_dir, seed: int = 0, dtype=torch.float32):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = ARCHS[arch](len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_tokenizer_dir):
    """One saved tiny random model folder per supported architecture."""
    return {
        arch: make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), smollm2_tokenizer_dir)
        for arch in ARCHS
    }


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return str(tiny_models["llama"])


DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every device of this machine: attention math runs on CPU in CI and on CUDA too where a GPU is present."""
    return request.param


@pytest.fixture(autouse=True)
def _fresh_kernel_verdicts():
    """Every test starts without self-check verdicts: a test that swaps kernels must not decide for the next."""
    from kvemb_st import kernel_check

    kernel_check.reset()
    yield
    kernel_check.reset()
