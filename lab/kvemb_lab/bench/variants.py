"""The variants the benchmark compares (plain, kv, kv_keep, echo), built on one shared backbone."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer, PreTrainedModel

from kvemb_st import KVEmbedding, KVEmbeddingConfig

from kvemb_lab.bench.shapes import SHAPES, random_backbone

VARIANTS: dict[str, dict[str, Any]] = {  # KVEmbeddingConfig fields of each variant
    "plain": {"method": "prompteol"},
    "kv": {"method": "kv"},
    "kv_keep": {"method": "kv", "prefix_rope": "keep"},
    "echo": {"method": "echo"},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_backbone(args: argparse.Namespace) -> tuple[PreTrainedModel, Any]:
    if args.shape:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        return random_backbone(SHAPES[args.shape], len(tokenizer), DTYPES[args.dtype], args.device), tokenizer
    loaded = KVEmbedding(config("plain", args), model_kwargs={"dtype": DTYPES[args.dtype]})
    return loaded.auto_model, loaded.tokenizer


def config(variant: str, args: argparse.Namespace) -> KVEmbeddingConfig:
    knobs = VARIANTS[variant]
    return KVEmbeddingConfig(
        base_model=args.base or f"random:{args.shape}",
        layers=args.layers if knobs["method"] == "kv" else (),
        max_seq_length=args.max_seq_length,
        **knobs,
    )


def default_layers(num_layers: int) -> str:
    """The last third of the layers, e.g. 20-29 of 30."""
    return f"{num_layers - num_layers // 3}-{num_layers - 1}"


def load_models(args: argparse.Namespace) -> dict[str, SentenceTransformer]:
    """Every variant of ``args.variants`` on one shared backbone, warmed up; fills in default ``args.layers``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone, tokenizer = load_backbone(args)
    args.layers = args.layers or default_layers(backbone.config.num_hidden_layers)
    modules = {variant: KVEmbedding(config(variant, args), backbone, tokenizer) for variant in args.variants}
    models = {variant: SentenceTransformer(modules=[m], device=args.device) for variant, m in modules.items()}
    for model in models.values():
        model.encode(["warm up"])
    return models
