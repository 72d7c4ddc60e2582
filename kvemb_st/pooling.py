"""Pooling of the final hidden states into one float32 vector per text.

Pooling runs in float32 whatever the backbone's dtype: averaging hundreds of bf16 states loses the
precision that cosine similarity needs, and users get the same dtype from every backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's final real token; correct for right padding and for a mask with holes."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).amax(dim=1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    weights = attention_mask.to(torch.float32).unsqueeze(-1)
    return (hidden.to(torch.float32) * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def last_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask)].to(torch.float32)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str, last_weight: float = 0.5) -> torch.Tensor:
    """Pool ``hidden`` ``(B, T, H)`` over the real tokens of ``attention_mask`` ``(B, T)``.

    ``mean+last`` mixes the two *normalised* vectors: the last-token state has a much larger norm than
    the mean in most LLMs, so an unnormalised sum would just be the last token.
    """
    if mode == "mean":
        return mean_pool(hidden, attention_mask)
    if mode == "last":
        return last_pool(hidden, attention_mask)
    if mode == "mean+last":
        mean = F.normalize(mean_pool(hidden, attention_mask), dim=-1)
        last = F.normalize(last_pool(hidden, attention_mask), dim=-1)
        return (1.0 - last_weight) * mean + last_weight * last
    raise ValueError(f"unknown pooling mode {mode!r}; expected 'mean', 'last' or 'mean+last'")
