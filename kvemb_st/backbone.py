"""Loading the frozen base LLM (Hub id, local folder or GGUF file) with the re-routing attention enabled.

Remote code is never enabled: the architectures we support are native to transformers, and the
base model is named by a config that may have been downloaded from anywhere.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

from kvemb_st.attention import ATTN_IMPLEMENTATION

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
_FORBIDDEN_MODEL_KWARGS = ("trust_remote_code", "attn_implementation", "revision", "subfolder")


class UnsupportedArchitectureError(ValueError):
    """The base model is not a decoder-only architecture that KV-Embedding supports."""


class BaseModelUnavailableError(OSError):
    """The base model cannot be found (offline and not cached, wrong path, no access)."""


def check_architecture(config: PretrainedConfig, base_model: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown class"
        raise UnsupportedArchitectureError(
            f"base model '{base_model}' has architecture '{model_type}' ({arch}), which KV-Embedding does not "
            f"support; supported model types: {', '.join(SUPPORTED_ARCHITECTURES)} (decoder-only with RoPE)"
        )
    if getattr(config, "use_bidirectional_attention", False):  # e.g. EmbeddingGemma: not a causal decoder
        raise UnsupportedArchitectureError(
            f"base model '{base_model}' ({model_type}) uses bidirectional attention; KV-Embedding re-routes the final "
            "token's key/value to the tokens that causal attention keeps blind, so it needs a causal decoder"
        )


def _source_args(base_model: str) -> tuple[str, dict[str, Any]]:
    """A ``.gguf`` file is loaded through its folder plus ``gguf_file=`` (transformers dequantises it)."""
    if base_model.endswith(".gguf"):
        if not os.path.isfile(base_model):
            raise BaseModelUnavailableError(f"GGUF file '{base_model}' does not exist")
        return os.path.dirname(os.path.abspath(base_model)), {"gguf_file": os.path.basename(base_model)}
    return base_model, {}


def load_backbone(
    base_model: str,
    revision: str | None = None,
    *,
    token: bool | str | None = None,
    cache_folder: str | None = None,
    local_files_only: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load the base model (without LM head) and its tokenizer, frozen, with the KV re-routing attention.

    ``model_kwargs`` (e.g. ``dtype``, ``device_map``) go to ``from_pretrained``; the ST repo's own
    revision/subfolder never do, since the base model's revision lives in the KV-Embedding config.
    """
    model_kwargs = dict(model_kwargs or {})
    for key in _FORBIDDEN_MODEL_KWARGS:
        if key in model_kwargs:
            raise ValueError(
                f"model_kwargs may not set '{key}': KV-Embedding fixes it (remote code is never enabled, the "
                "attention is the re-routing one, and the base revision comes from the config's 'base_revision')"
            )
    path, source_kwargs = _source_args(base_model)
    hub_kwargs: dict[str, Any] = {
        "revision": revision,
        "token": token,
        "cache_dir": cache_folder,
        "local_files_only": local_files_only,
        "trust_remote_code": False,
        **source_kwargs,
    }
    try:
        config = AutoConfig.from_pretrained(path, **hub_kwargs)
        check_architecture(config, base_model)
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
        model = AutoModel.from_pretrained(
            path, config=config, attn_implementation=ATTN_IMPLEMENTATION, **hub_kwargs, **model_kwargs
        )
    except OSError as err:  # transformers/huggingface_hub report missing files and offline misses as OSError
        raise BaseModelUnavailableError(
            f"cannot load base model '{base_model}' (revision {revision or 'default'}): {err}\n"
            "To make it available: download it while online (e.g. `hf download "
            f"{base_model}{f' --revision {revision}' if revision else ''}`) into the Hugging Face cache, or set "
            "'base_model' in kvemb_config.json to a local folder or .gguf file that holds it."
        ) from err
    model.eval().requires_grad_(False)
    if not hasattr(model, "rotary_emb"):
        raise UnsupportedArchitectureError(f"base model '{base_model}' has no rotary embedding module ('rotary_emb')")
    return model, tokenizer
