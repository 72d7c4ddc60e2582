"""The intrinsic-dimension curve of a base model on calibration texts: the final token's TwoNN ID after each layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from kvemb_st.intrinsic_dim import ESTIMATORS, twonn
from kvemb_st.pooling import last_token_index
from kvemb_st.template import Template
from kvemb_st.template_tokenizer import TemplateTokenizer


@torch.inference_mode()
def compute_id_curve(
    model: PreTrainedModel,
    tokenizer: Any,
    texts: Sequence[str],
    template: str,
    *,
    max_seq_length: int = 512,
    batch_size: int = 32,
    estimator: str = "mle",
    progress: bool = True,
) -> list[float]:
    """TwoNN ID of the final-token state after each decoder layer, on ``texts`` wrapped in ``template``.

    The forward pass is the plain one (no re-routing). Layer ``l``'s value is that of its *output*: the
    input of layer 0 is the final token's embedding, which a template makes identical for every text.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown TwoNN estimator {estimator!r}; expected one of {ESTIMATORS}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    encoder = TemplateTokenizer(tokenizer, max_seq_length)
    parsed = Template.parse(template)
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_hidden_layers)]
    by_length = sorted(texts, key=len)  # less padding; TwoNN does not depend on the order of the points
    batches = range(0, len(by_length), batch_size)
    for start in tqdm(batches, desc="ID curve: calibration batches", unit="batch", disable=not progress):
        features, _ = encoder.encode(by_length[start : start + batch_size], parsed)
        input_ids, attention_mask = features["input_ids"].to(device), features["attention_mask"].to(device)
        output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        rows = torch.arange(input_ids.shape[0], device=device)
        last = last_token_index(attention_mask)
        for layer, hidden in enumerate(output.hidden_states[1:]):
            per_layer[layer].append(hidden[rows, last].float().cpu())
    return [twonn(torch.cat(states), estimator) for states in per_layer]
