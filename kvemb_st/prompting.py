"""Templates and the tokenization that keeps the template's instruction whole.

The instruction of a KV-Embedding prompt sits *after* the text ("... means in one word:"), and the
final token is the one whose key/value gets re-routed. Cutting the end of an over-long input, as
tokenizers do by default, would silently drop exactly that part. Here the text alone is shortened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvemb_st.config import TEXT_PLACEHOLDER, ConfigError, validate_template


@dataclass(frozen=True)
class Template:
    """A prompt split around its ``{text}`` placeholder (``str.format`` is not used: texts contain braces)."""

    prefix: str
    suffix: str

    @classmethod
    def parse(cls, template: str) -> Template:
        validate_template(template, "template")
        prefix, suffix = template.split(TEXT_PLACEHOLDER)
        return cls(prefix, suffix)

    def format(self, text: str) -> str:
        return f"{self.prefix}{text}{self.suffix}"


def resolve_template(default: Template, prompt: str | None) -> Template:
    """Combine the model's template with an ST prompt.

    A prompt containing ``{text}`` is a whole template of its own (e.g. separate query/document
    templates); any other prompt is prepended to the text inside the model's template, which is what
    sentence-transformers users expect a prompt to do.
    """
    if not prompt:
        return default
    if TEXT_PLACEHOLDER in prompt:
        try:
            return Template.parse(prompt)
        except ConfigError as err:
            raise ValueError(f"prompt {prompt!r} is not a valid template: {err}") from None
    return Template(default.prefix + prompt, default.suffix)


class TemplateTokenizer:
    """Tokenize templated texts with right padding, truncating only the text part to ``max_length`` tokens."""

    def __init__(self, tokenizer, max_length: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is a slow tokenizer; KV-Embedding needs a fast (Rust) tokenizer "
                "to truncate the text while keeping the template's instruction"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def encode(self, texts: Sequence[str], template: Template) -> tuple[dict[str, torch.Tensor], int]:
        """Return ``{"input_ids", "attention_mask"}`` and the number of texts that had to be truncated."""
        encoded = self.tokenizer([template.format(text) for text in texts])["input_ids"]
        truncated = 0
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_length:
                encoded[i] = self._truncate(texts[i], template, len(ids))
                truncated += 1
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}, truncated

    def _truncate(self, text: str, template: Template, full_length: int) -> list[int]:
        """Cut ``text`` at a token boundary so that the templated whole fits; shrink until it does."""
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        keep = self.max_length - (full_length - len(offsets))
        while keep > 0:
            ids = self.tokenizer(template.format(text[: offsets[keep - 1][1]]))["input_ids"]
            if len(ids) <= self.max_length:
                return ids
            keep -= len(ids) - self.max_length  # tokens merged differently at the cut: shrink further
        ids = self.tokenizer(template.format(""))["input_ids"]
        if len(ids) > self.max_length:
            raise ValueError(
                f"the template alone takes {len(ids)} tokens, more than max_seq_length={self.max_length}; "
                "raise max_seq_length or shorten the template"
            )
        return ids
