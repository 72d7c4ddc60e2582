"""The tokenization that keeps a template's instruction whole: only the text is shortened.

The instruction of a KV-Embedding prompt sits *after* the text ("... means in one word:"), and the
final token is the one whose key/value gets re-routed. Cutting the end of an over-long input, as
tokenizers do by default, would silently drop exactly that part. Here the text alone is shortened.

Truncation is batched: the over-long texts of a batch go through each step together, one tokenizer call
per step, and those calls tokenize only short windows near each cut (see :class:`TemplateTokenizer`), so
a batch that must be cut costs little more than one that fits: it would otherwise leave a GPU waiting.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from kvemb_st.chunking import Truncation
from kvemb_st.template import Template

_OVERLAP = 4
"""Tokens at the start of a window that must reproduce the uncut text's tokens for the window to be used."""
_SLACK = 8
"""Tokens the tail of a text alone holds beyond its first cut, for the shrink rounds that may follow."""
_SEARCH = 64
"""How many tokens a word start (a window's start) is looked for over before the whole text is tokenized."""


@dataclass(frozen=True)
class _Tokens:
    """One tokenizer output: ids, and character spans read token by token through the Rust encoding.

    Converting all of an encoding's offsets to Python costs about as much as tokenizing; a cut needs a few.
    """

    ids: list[int]
    encoding: Any  # tokenizers.Encoding
    shift: int = 0  # added to the encoding's spans: where the tokenized string sits in the text they refer to

    def __len__(self) -> int:
        return len(self.ids)

    def shifted(self, by: int) -> _Tokens:
        return _Tokens(self.ids, self.encoding, self.shift + by)

    def span(self, index: int) -> tuple[int, int]:
        """Characters of token ``index`` (negative counts from the end); ``(0, 0)`` for a special token."""
        span = self.encoding.token_to_chars(index % len(self.ids))
        return (0, 0) if span is None else (span[0] + self.shift, span[1] + self.shift)

    def first_ending_after(self, limit: int) -> int:
        """Index of the first token ending after character ``limit`` (special tokens sit at the two ends)."""
        middle = len(self.ids) / 2

        def end(index: int) -> float:
            span = self.encoding.token_to_chars(index)
            return span[1] + self.shift if span is not None else (-1 if index < middle else math.inf)

        return bisect.bisect_right(range(len(self.ids)), limit, key=end)


_Part = tuple[_Tokens, int, int]
"""Tokens ``start:stop`` of one output; an input's tokens are a list of parts."""


@dataclass(eq=False)
class _Cut:
    """One over-long text in the shrink loop."""

    text: str
    formatted: str
    full: _Tokens  # of ``formatted``, with special tokens
    drop: int  # tokens of the text alone to cut from its end
    tail: list[_Part] = field(default_factory=list)  # the last tokens of the text alone, spans in the text
    complete: bool = False  # ``tail`` holds all of them
    result: tuple[str, list[_Part]] | None = None  # the cut text and its templated tokens, once they fit


def _begins_word(known: _Tokens, source: str, index: int) -> bool:
    """Whether token ``index`` of ``known`` (a tokenization of ``source``) starts with a space after a non-space.

    Pre-tokenizers split there, so the tokens that follow do not depend on the text before.
    """
    start, end = known.span(index)
    return end > start > 0 and source[start] == " " and not source[start - 1].isspace()


def _word_start(known: _Tokens, source: str, floor: int, limit: int, need: int) -> int | None:
    """The last token of ``known`` that begins a word past character ``floor`` and has at least ``need``
    tokens from it ending by character ``limit``; ``None`` if there is none within reach.
    """
    stop = known.first_ending_after(limit) - need
    for index in range(stop, max(stop - _SEARCH, -1), -1):
        if known.span(index)[0] <= floor:
            return None
        if _begins_word(known, source, index):
            return index
    return None


def _next_word_start(known: _Tokens, source: str, index: int, stop: int) -> int:
    """The first token from ``index`` on that begins a word; ``stop`` if there is none before it."""
    return next((k for k in range(index, min(stop, index + _SEARCH)) if _begins_word(known, source, k)), stop)


def _reproduces(window: _Tokens, known: _Tokens, index: int) -> bool:
    """Whether ``window`` (spans in ``known``'s string) starts with ``known``'s tokens from ``index`` on.

    That is the check that the window's tokens do not depend on the text before it.
    """
    return (
        len(window) >= _OVERLAP
        and window.ids[:_OVERLAP] == known.ids[index : index + _OVERLAP]
        and all(window.span(k) == known.span(index + k) for k in range(_OVERLAP))
    )


def _length(parts: list[_Part]) -> int:
    return sum(stop - start for _, start, stop in parts)


def _span_from_end(parts: list[_Part], back: int) -> tuple[int, int]:
    """Span of the token ``back`` tokens from the end (1: the last)."""
    for tokens, start, stop in reversed(parts):
        if back <= stop - start:
            return tokens.span(stop - back)
        back -= stop - start
    raise IndexError(back)


def _ids(parts: list[_Part]) -> list[int]:
    if len(parts) == 1 and parts[0][1:] == (0, len(parts[0][0])):
        return parts[0][0].ids  # most inputs: one whole tokenizer output
    return list(itertools.chain.from_iterable(tokens.ids[start:stop] for tokens, start, stop in parts))


def _spans(parts: list[_Part]) -> list[tuple[int, int]]:
    return [tokens.span(index) for tokens, start, stop in parts for index in range(start, stop)]


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the attention mask (built in numpy: filling tensors from lists row by row is slow)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    attention_mask = np.arange(lengths.max()) < lengths[:, None]
    input_ids = np.full(attention_mask.shape, pad, dtype=np.int64)
    input_ids[attention_mask] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=lengths.sum())
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask.astype(np.int64))


class TemplateTokenizer:
    """Tokenize templated texts with right padding, truncating only the text part to ``max_length`` tokens.

    An over-long text is cut at a token boundary of the text alone, ``ceil(excess / copies)`` tokens from its
    end; if the templated cut still does not fit (tokens merge differently at the cut), it is cut shorter
    until it does. The over-long texts of a batch take each step together, one tokenizer call per step
    (and one more for the texts the shortcut below does not serve), so the number of calls does not grow
    with the number of texts cut.

    The shortcut: cutting changes only the tokens near the cut, and the templated uncut text's tokens
    (tokenized anyway) give the rest. A step tokenizes a *window*, from a word start (a space after a
    non-space, where pre-tokenizers split words: byte-level regexes, ``Metaspace``, whitespace) a few
    tokens before the cut to the end, and takes the uncut tokens before it; the text alone's last tokens,
    which place the cut, are the uncut tokens between two such word starts near its end, then a window.
    A window is used only if its first tokens reproduce the uncut tokens there, which catches tokenizers
    for which a space does not start a split (e.g. a normalizer that prepends "▁" to every string).
    Where a window fails that check, or no word start is near the cut (CJK, long runs without spaces),
    the whole string is tokenized. The outputs are those of cutting and re-tokenizing each text in full,
    one by one (``tests/test_truncation.py`` compares them with that algorithm).
    """

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

    def encode(
        self, texts: Sequence[str], template: Template, text_mask: bool = False
    ) -> tuple[dict[str, torch.Tensor], Truncation]:
        """Return ``{"input_ids", "attention_mask"}`` and what truncation left out (:class:`Truncation`).

        With ``text_mask`` also ``text_mask``: the tokens that carry characters of the text (of its last copy,
        for templates that repeat it), i.e. the template's own tokens left out.
        """
        texts = list(texts)
        formatted = [template.format(text) for text in texts]
        rows = self._tokenize(formatted, specials=True)
        parts = [[(tokens, 0, len(tokens))] for tokens in rows]
        over = [i for i, tokens in enumerate(rows) if len(tokens) > self.max_length]
        cuts = [_Cut(texts[i], formatted[i], rows[i], self._excess(len(rows[i]), template)) for i in over]
        self._truncate(cuts, template)
        for i, cut in zip(over, cuts):
            texts[i], parts[i] = cut.result
        encoded = [_ids(row) for row in parts]
        empty = [i for i, ids in enumerate(encoded) if not ids]
        if empty:
            raise ValueError(
                f"input at position {empty[0]} of the batch ({texts[empty[0]]!r}) gives no tokens with template "
                f"{template.format('{text}')!r}: the tokenizer adds no BOS token, so an empty text has nothing to "
                "embed; drop it or use a method whose template has an instruction (e.g. 'prompteol')"
            )
        input_ids, attention_mask = _padded(encoded, self.pad_token_id)
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if text_mask:
            spans = [_spans(row) for row in parts]
            features["text_mask"] = self._last_copy_mask(texts, template, spans, attention_mask)
        return features, Truncation(len(over), sum(len(rows[i]) - len(encoded[i]) for i in over))

    def _excess(self, length: int, template: Template) -> int:
        """Text tokens to cut for ``length`` templated tokens to fit: each one removes ``copies`` tokens."""
        return math.ceil((length - self.max_length) / template.copies)

    @staticmethod
    def _last_copy_mask(
        texts: list[str], template: Template, spans: list[list[tuple[int, int]]], attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Tokens carrying characters of the text's last copy (the whole input if the text is empty)."""
        mask = torch.zeros_like(attention_mask)
        for row, (text, row_spans) in enumerate(zip(texts, spans)):
            end = len(template.format(text)) - len(template.suffix)
            start = end - len(text)
            row_spans = torch.tensor(row_spans, dtype=torch.long).reshape(-1, 2)
            mask[row, : len(row_spans)] = (row_spans[:, 0] < end) & (row_spans[:, 1] > start)
            if not text:
                mask[row] = attention_mask[row]
        return mask

    # ------------------------------------------------------------------------------------------ truncation
    def _truncate(self, cuts: list[_Cut], template: Template) -> None:
        """Cut each text at a token boundary so that the templated whole fits; shrink until it does."""
        self._read_tails(cuts, template)
        pending = cuts
        while pending:
            self._read_whole([cut for cut in pending if not cut.complete and cut.drop >= _length(cut.tail)])
            emptied = [cut for cut in pending if cut.drop >= _length(cut.tail)]  # nothing of the text would be left
            if emptied:
                alone = self._tokenize([template.format("")], specials=True)[0]
                if len(alone) > self.max_length:
                    raise ValueError(
                        f"the template alone takes {len(alone)} tokens, more than max_seq_length={self.max_length}; "
                        "raise max_seq_length or shorten the template"
                    )
                for cut in emptied:
                    cut.result = "", [(alone, 0, len(alone))]
            pending = [cut for cut in pending if cut.drop < _length(cut.tail)]
            texts = [cut.text[: _span_from_end(cut.tail, cut.drop + 1)[1]] for cut in pending]
            shorter = []
            for cut, text, parts in zip(pending, texts, self._tokenize_cuts(pending, texts, template)):
                length = _length(parts)
                if length <= self.max_length:
                    cut.result = text, parts
                else:
                    cut.drop += self._excess(length, template)  # merged differently at the cut
                    shorter.append(cut)
            pending = shorter

    def _read_tails(self, cuts: list[_Cut], template: Template) -> None:
        """The last tokens of each text alone, enough for its cut.

        They are the uncut text's tokens between two word starts near the text's end, then the text from
        the second one on, tokenized alone (a window). A short probe from the first word start and the
        window must each reproduce the uncut tokens where they begin. The whole text is tokenized where a
        check fails or no word start is near.
        """
        plans: list[tuple[int, int, int, int] | None] = []
        strings = []
        for cut in cuts:
            full, source = cut.full, cut.formatted
            copy = len(source) - len(template.suffix) - len(cut.text)  # where the text's last copy starts
            last = _word_start(full, source, copy, copy + len(cut.text), _OVERLAP + 2)
            first = None if last is None else _word_start(full, source, copy, full.span(last)[0], cut.drop + 1 + _SLACK)
            if first is None:
                plans.append(None)
                strings.append(cut.text)
                continue
            probe_end = _next_word_start(full, source, first + _OVERLAP, last)
            a, z, b = (full.span(index)[0] - copy for index in (first, probe_end, last))
            plans.append((copy, first, last, b))
            strings += [cut.text[a:z], cut.text[b:]]
        tokens = iter(self._tokenize(strings, specials=False))
        retry = []
        for cut, plan in zip(cuts, plans):
            if plan is None:
                whole = next(tokens)
                cut.tail, cut.complete = [(whole, 0, len(whole))], True
                continue
            (copy, first, last, b), probe, window = plan, next(tokens), next(tokens)
            full = cut.full
            if _reproduces(probe.shifted(full.span(first)[0]), full, first) and _reproduces(
                window.shifted(copy + b), full, last
            ):
                cut.tail = [(full.shifted(-copy), first, last), (window.shifted(b), 0, len(window))]
            else:
                retry.append(cut)
        self._read_whole(retry)

    def _read_whole(self, cuts: list[_Cut]) -> None:
        """Tokenize each text alone, in full."""
        for cut, tokens in zip(cuts, self._tokenize([cut.text for cut in cuts], specials=False)):
            cut.tail, cut.complete = [(tokens, 0, len(tokens))], True

    def _tokenize_cuts(self, cuts: list[_Cut], texts: list[str], template: Template) -> list[list[_Part]]:
        """The templated tokens of each cut text: the uncut text's tokens up to a word start, then a window."""
        formatted = [template.format(text) for text in texts]
        trailing = self._trailing_special_count
        jobs = []
        for k, (cut, text) in enumerate(zip(cuts, texts)):
            index = _word_start(cut.full, cut.formatted, 0, len(template.prefix) + len(text), _OVERLAP + 2)
            if index is not None and trailing is not None:
                jobs.append((k, index, cut.full.span(index)[0]))
        windows = self._tokenize([formatted[k][start:] for k, _, start in jobs], specials=False)
        results: list[list[_Part] | None] = [None] * len(cuts)
        for (k, index, start), window in zip(jobs, windows):
            full, window = cuts[k].full, window.shifted(start)
            if _reproduces(window, full, index):
                results[k] = [(full, 0, index), (window, 0, len(window)), (full, len(full) - trailing, len(full))]
        missing = [k for k, parts in enumerate(results) if parts is None]
        for k, tokens in zip(missing, self._tokenize([formatted[k] for k in missing], specials=True)):
            results[k] = [(tokens, 0, len(tokens))]
        return results

    def _tokenize(self, strings: list[str], specials: bool) -> list[_Tokens]:
        if not strings:
            return []
        batch = self.tokenizer(strings, add_special_tokens=specials)
        return [_Tokens(ids, encoding) for ids, encoding in zip(batch["input_ids"], batch.encodings)]

    @cached_property
    def _trailing_special_count(self) -> int | None:
        """How many special tokens the tokenizer appends to a text; ``None`` if they do not simply wrap it."""
        probe = "a b"
        bare = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(probe)["input_ids"]
        extra = len(full) - len(bare)
        leads = [lead for lead in range(extra + 1) if full[lead : lead + len(bare)] == bare]
        return extra - leads[0] if len(leads) == 1 else None
