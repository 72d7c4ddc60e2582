"""Validation of what users pass to ``encode``: a clear ``ValueError`` instead of a vector made of garbage.

Empty and whitespace-only strings are valid: they are embedded inside the template like any other
text, so they get a well-defined (template-only) vector rather than NaN.
"""

from __future__ import annotations

from collections.abc import Sequence


def validate_texts(inputs: Sequence[object], where: str = "of the batch") -> list[str]:
    """Return ``inputs`` as a list of strings or raise ``ValueError`` naming the first bad item.

    ``where`` says what the index counts: :class:`kvemb_st.api.KVSentenceTransformer` validates the
    caller's own list before sentence-transformers sorts it by length into batches, so its errors name
    the caller's index; the module itself only sees sorted batches.

    ``ValueError`` (not ``TypeError``) on purpose: sentence-transformers retries ``preprocess`` without
    the prompt on ``TypeError``, which would hide the error and could embed the wrong text.
    """
    if isinstance(inputs, str):
        raise ValueError("expected a list of strings, got a single string; wrap it in a list")
    texts = list(inputs)
    for index, item in enumerate(texts):
        if not isinstance(item, str):
            raise ValueError(
                f"input at position {index} {where} is {type(item).__name__} ({item!r:.60}), not str; "
                "KV-Embedding embeds text only: convert or drop that item"
            )
    return texts
