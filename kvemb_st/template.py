"""Prompt templates: a prompt split around its ``{text}`` placeholder(s), and how an ST prompt combines with it."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
