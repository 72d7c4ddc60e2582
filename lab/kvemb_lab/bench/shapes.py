"""The backbones the benchmark can run without a download: real models' shapes with random weights.

A forward pass costs the same whatever the weight values, so a shape copied from a model's ``config.json`` times that
model; :func:`describe` reads the built model back so a report states what actually ran.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel


class Shape(NamedTuple):
    """The numbers of a real model's ``config.json`` that set the cost of a forward pass.
    """

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    vocab: int
    tied_embeddings: bool
    max_positions: int
    qkv_bias: bool = False  # Qwen2 has it built in (transformers hard-codes bias=True for q/k/v)
    extra: tuple[tuple[str, Any], ...] = ()  # other config.json keys that change the forward pass
    source: str = ""

    def config(self, min_vocab: int) -> Any:
        """A transformers config of this shape; the vocabulary grows to ``min_vocab`` if the tokenizer needs it."""
        return AutoConfig.for_model(
            self.model_type,
            num_hidden_layers=self.layers,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            vocab_size=max(self.vocab, min_vocab),
            tie_word_embeddings=self.tied_embeddings,
            max_position_embeddings=self.max_positions,
            attention_bias=self.qkv_bias,
            **dict(self.extra),
        )


HF = "https://huggingface.co"
SHAPES: dict[str, Shape] = {  # copied from each model's config.json on the Hub (URL in `source`)
    "qwen3-0.6b": Shape("qwen3", 28, 1024, 3072, 16, 8, 128, 1_000_000.0, 151_936, True, 40_960,
                        source=f"{HF}/Qwen/Qwen3-0.6B/blob/main/config.json"),
    "llama3-8b": Shape("llama", 32, 4096, 14_336, 32, 8, 128, 500_000.0, 128_256, False, 8192,
                       source=f"{HF}/meta-llama/Meta-Llama-3-8B/blob/main/config.json"),
    "mistral-7b": Shape("mistral", 32, 4096, 14_336, 32, 8, 128, 1_000_000.0, 32_768, False, 32_768,
                        extra=(("sliding_window", None),),
                        source=f"{HF}/mistralai/Mistral-7B-v0.3/blob/main/config.json"),
    "qwen2.5-0.5b": Shape("qwen2", 24, 896, 4864, 14, 2, 64, 1_000_000.0, 151_936, True, 32_768, qkv_bias=True,
                          source=f"{HF}/Qwen/Qwen2.5-0.5B/blob/main/config.json"),
    "smollm2-135m": Shape("llama", 30, 576, 1536, 9, 3, 64, 100_000.0, 49_152, True, 8192,
                          source=f"{HF}/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json"),
    "tiny": Shape("llama", 4, 64, 128, 4, 2, 16, 10_000.0, 49_152, True, 32_768,
                  source="made up for smoke tests (GQA, 4 layers)"),
}  # fmt: skip


def random_backbone(shape: Shape, min_vocab: int, dtype: torch.dtype, device: str) -> PreTrainedModel:
    """A random-weight base model of ``shape`` with the re-routing attention, built on ``device`` directly."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(shape.config(min_vocab), attn_implementation="kvemb_reroute", dtype=dtype)
    return model.eval().requires_grad_(False)


def describe(model: PreTrainedModel) -> dict[str, Any]:
    """The built backbone's shape, read back from the model itself (not from the table it was made from)."""
    attention = model.layers[0].self_attn
    return {
        "model_type": model.config.model_type,
        "layers": len(model.layers),
        "hidden": model.config.hidden_size,
        "heads": attention.q_proj.out_features // attention.head_dim,
        "kv_heads": attention.k_proj.out_features // attention.head_dim,
        "head_dim": attention.head_dim,
        "qkv_bias": attention.q_proj.bias is not None,
        "vocab": model.config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
