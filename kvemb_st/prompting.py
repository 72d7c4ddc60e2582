"""Templates and the tokenization that keeps the template's instruction whole.

The instruction of a KV-Embedding prompt sits *after* the text ("... means in one word:"), and the
final token is the one whose key/value gets re-routed. Cutting the end of an over-long input, as
tokenizers do by default, would silently drop exactly that part. Here the text alone is shortened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from kvemb_st.config import TEXT_PLACEHOLDER, ConfigError, validate_template


@dataclass(frozen=True)
class Template:
    """A prompt split around its ``{text}`` placeholder(s) (``str.format`` is not used: texts contain braces).

    ``between`` holds what separates repeated copies of the text (echo embeddings repeat it); it is empty
    for the usual single copy.
    """

    prefix: str
    suffix: str
    between: tuple[str, ...] = ()

    @classmethod
    def parse(cls, template: str, copies: int = 1) -> Template:
        validate_template(template, "template", copies=copies)
        prefix, *between, suffix = template.split(TEXT_PLACEHOLDER)
        return cls(prefix, suffix, tuple(between))

    @property
    def copies(self) -> int:
        return 1 + len(self.between)

    def format(self, text: str) -> str:
        return f"{self.prefix}{text}{''.join(part + text for part in self.between)}{self.suffix}"


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
            return Template.parse(prompt, default.copies)
        except ConfigError as err:
            raise ValueError(f"prompt {prompt!r} is not a valid template: {err}") from None
    return replace(default, prefix=default.prefix + prompt)


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
        """Return ``{"input_ids", "attention_mask"}`` and the number of texts that had to be truncated.

        A template with repeated text (echo) also yields ``pool_mask``: the tokens of the last copy.
        """
        texts = list(texts)
        encoded = self.tokenizer([template.format(text) for text in texts])["input_ids"]
        truncated = 0
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_length:
                texts[i], encoded[i] = self._truncate(texts[i], template, len(ids))
                truncated += 1
        empty = [i for i, ids in enumerate(encoded) if not ids]
        if empty:
            raise ValueError(
                f"input at position {empty[0]} of the batch ({texts[empty[0]]!r}) gives no tokens with template "
                f"{template.format('{text}')!r}: the tokenizer adds no BOS token, so an empty text has nothing to "
                "embed; drop it or use a method whose template has an instruction (e.g. 'prompteol')"
            )
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if template.copies > 1:
            features["pool_mask"] = self._last_copy_mask(texts, template, attention_mask)
        return features, truncated

    def _last_copy_mask(self, texts: list[str], template: Template, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokens carrying characters of the text's last copy (the whole input if the text is empty)."""
        formatted = [template.format(text) for text in texts]
        offsets = self.tokenizer(formatted, return_offsets_mapping=True)["offset_mapping"]
        mask = torch.zeros_like(attention_mask)
        for row, (text, full, spans) in enumerate(zip(texts, formatted, offsets)):
            end = len(full) - len(template.suffix)
            start = end - len(text)
            spans = torch.tensor(spans, dtype=torch.long).reshape(-1, 2)
            mask[row, : len(spans)] = (spans[:, 0] < end) & (spans[:, 1] > start)
            if not text:
                mask[row] = attention_mask[row]
        return mask

    def _truncate(self, text: str, template: Template, full_length: int) -> tuple[str, list[int]]:
        """Cut ``text`` at a token boundary so that the templated whole fits; shrink until it does.

        Returns the cut text and its templated token ids. Each cut token removes ``template.copies`` tokens.
        """
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        keep = len(offsets) - math.ceil((full_length - self.max_length) / template.copies)
        while keep > 0:
            cut = text[: offsets[keep - 1][1]]
            ids = self.tokenizer(template.format(cut))["input_ids"]
            if len(ids) <= self.max_length:
                return cut, ids
            keep -= math.ceil((len(ids) - self.max_length) / template.copies)  # merged differently at the cut
        ids = self.tokenizer(template.format(""))["input_ids"]
        if len(ids) > self.max_length:
            raise ValueError(
                f"the template alone takes {len(ids)} tokens, more than max_seq_length={self.max_length}; "
                "raise max_seq_length or shorten the template"
            )
        return "", ids
