"""Validation of what users pass to ``encode``: a clear ``ValueError`` instead of a vector made of garbage.

Empty and whitespace-only strings are valid: they are embedded inside the template like any other
text, so they get a well-defined (template-only) vector rather than NaN.
"""

from __future__ import annotations

from collections.abc import Sequence


def validate_texts(inputs: Sequence[object]) -> list[str]:
    """Return ``inputs`` as a list of strings or raise ``ValueError`` naming the first bad item.

    ``ValueError`` (not ``TypeError``) on purpose: sentence-transformers retries ``preprocess`` without
    the prompt on ``TypeError``, which would hide the error and could embed the wrong text.
    """
    if isinstance(inputs, str):
        raise ValueError("expected a list of strings, got a single string; wrap it in a list")
    texts = list(inputs)
    for index, item in enumerate(texts):
        if not isinstance(item, str):
            raise ValueError(
                f"input at position {index} of the batch is {type(item).__name__} ({item!r:.60}), not str; "
                "KV-Embedding embeds text only: convert or drop that item"
            )
    return texts
