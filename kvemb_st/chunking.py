"""Texts longer than the token budget: split into chunks that each fit, or, when truncated, counted.

With ``long_inputs="chunk"`` the embedding module's ``preprocess`` expands every over-long text of a batch into
chunks (:func:`split_long_texts`), tokenizes the chunk rows of all texts together, and its ``forward`` pools every
row and combines the chunk vectors of each text into one (:meth:`ChunkPlan.forward`). Doing it inside the module
is what makes ``encode``, ``encode_query``, ``encode_document``, ST's multi-process pool and the Ray path honour
it alike, and keeps ST's progress bar and output one row per input text.

Chunks are whole sentences packed greedily up to the budget *with* the template; a sentence too long alone is
split by tokens. Sentence boundaries come from a small regex (:data:`SENTENCE_BOUNDARY`), not a trained splitter:
they are only candidate cut points, so a false boundary (after "Dr.") matters only where a chunk happens to end
there. Every character of the text except the whitespace between chunks is in exactly one chunk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from kvemb_st.prompting import Template

SENTENCE_BOUNDARY = re.compile(r"""(?:(?<=[.!?…])|(?<=[.!?…]["'”’)\]]))\s+|\s*\n\s*""")
"""Whitespace after ``. ! ? …`` (possibly closed by a quote or bracket), or around a line break."""

_Region = tuple[int, int, int, int]
"""``(text index, start, end, capacity)``: characters ``start:end`` of a text to cut into chunks of at most
``capacity`` text tokens each."""


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text[start:end]``, without surrounding whitespace."""
    end = len(text) if end is None else end
    spans, begin = [], start
    for match in SENTENCE_BOUNDARY.finditer(text, start, end):
        spans.append((begin, match.start()))
        begin = match.end()
    spans.append((begin, end))
    return [_strip(text, a, b) for a, b in spans if text[a:b].strip()]


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _token_counts(tokenizer: Any, strings: list[str]) -> list[int]:
    """Tokens of each string with the special tokens, as the module tokenizes its inputs."""
    return [len(ids) for ids in tokenizer(strings, add_special_tokens=True)["input_ids"]] if strings else []


@dataclass(frozen=True)
class ChunkPlan:
    """Which input text each tokenized row belongs to; rows of one text are consecutive, texts in order.

    ``weights`` are the tokens each row's text adds to its templated input (the weights of ``"tokens"``).
    """

    owners: tuple[int, ...]
    weights: tuple[int, ...]
    texts: int

    def forward(
        self, features: dict[str, Any], embed: Callable[[dict[str, Any]], dict[str, torch.Tensor]], weighting: str
    ) -> dict[str, Any]:
        """Embed the rows of ``features`` in groups of at most :attr:`texts` rows, then one vector per text.

        A forward never holds more rows than the batch had texts, so ``batch_size`` bounds memory as it does
        without chunking. ``embed`` maps a group's features to its ``token_embeddings`` and unit
        ``sentence_embedding``. The token-level outputs of a text are its rows' real tokens joined, so that
        ``output_value="token_embeddings"`` still gives one entry per text.
        """
        vectors, tokens = [], {}
        for group in self._groups(features):
            out = embed(group)
            vectors.append(out["sentence_embedding"])
            mask = group["attention_mask"].bool()
            for key, value in {**group, "token_embeddings": out["token_embeddings"]}.items():
                if isinstance(value, torch.Tensor):
                    tokens.setdefault(key, []).extend(row[keep] for row, keep in zip(value, mask))
        joined = {key: self._join(rows) for key, rows in tokens.items()}
        return {**features, **joined, "sentence_embedding": self.combine(torch.cat(vectors), weighting)}

    def combine(self, vectors: torch.Tensor, weighting: str) -> torch.Tensor:
        """The unit mean of each text's unit chunk vectors, each weighted 1 (``"equal"``) or by its tokens."""
        weights = torch.tensor(self.weights if weighting == "tokens" else [1] * len(self.owners), device=vectors.device)
        owners = torch.tensor(self.owners, device=vectors.device)
        summed = vectors.new_zeros(self.texts, vectors.shape[1])
        summed.index_add_(0, owners, vectors * weights.to(vectors.dtype).unsqueeze(1))
        return F.normalize(summed, dim=-1)

    def _groups(self, features: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Consecutive row slices of the row tensors (the other values as they are), padding columns dropped."""
        mask = features["attention_mask"]
        for start in range(0, mask.shape[0], self.texts):
            stop = start + self.texts
            width = int(mask[start:stop].sum(1).max())
            yield {key: value[start:stop, :width] if isinstance(value, torch.Tensor) else value for key, value in features.items()}

    def _join(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Each text's rows concatenated, right-padded with zeros."""
        bounds = [0] * (self.texts + 1)
        for owner in self.owners:
            bounds[owner + 1] += 1
        for k in range(self.texts):
            bounds[k + 1] += bounds[k]
        return pad_sequence([torch.cat(rows[a:b]) for a, b in zip(bounds, bounds[1:])], batch_first=True)


def split_long_texts(texts: Sequence[str], template: Template, tokenizer: Any, budget: int) -> tuple[list[str], ChunkPlan]:
    """The rows to tokenize for ``texts``: each text that fits ``budget`` tokens in ``template`` as it is, each
    longer one as its chunks, every chunk fitting ``budget`` in ``template``; and the plan that recombines them.

    Lengths are measured with the model's own tokenizer, chunks of all texts in one call per round: a first
    round packs sentences by their token counts; a chunk that still does not fit (tokens merge across the joins)
    is packed again with a capacity smaller by its excess.
    """
    texts = list(texts)
    overhead = _token_counts(tokenizer, [template.format("")])[0]
    capacity = (budget - overhead) // template.copies
    if capacity < 1:
        raise ValueError(
            f"the template alone takes {overhead} tokens, leaving no room for text in max_seq_length={budget}; "
            "raise max_seq_length or shorten the template"
        )
    lengths = _token_counts(tokenizer, [template.format(text) for text in texts])
    chunks: dict[int, list[tuple[int, int, int]]] = {i: [] for i, n in enumerate(lengths) if n > budget}
    pending: list[_Region] = [(i, 0, len(texts[i]), capacity) for i in chunks]
    while pending:
        candidates = _pack(texts, pending, tokenizer)
        counts = _token_counts(tokenizer, [template.format(texts[i][a:b]) for i, a, b, _ in candidates])
        pending = []
        for (i, a, b, cap), count in zip(candidates, counts):
            if count <= budget:
                chunks[i].append((a, b, count))
                continue
            smaller = cap - math.ceil((count - budget) / template.copies)
            if smaller < 1:
                raise ValueError(
                    f"input at position {i} of the batch cannot be split into chunks of max_seq_length={budget} "
                    f"tokens: its characters {a}:{b} take {count} tokens with the template; raise max_seq_length"
                )
            pending.append((i, a, b, smaller))
    rows, owners, weights = [], [], []
    for i, text in enumerate(texts):
        for a, b, count in sorted(chunks[i]) if i in chunks else [(0, len(text), lengths[i])]:
            rows.append(text[a:b])
            owners.append(i)
            weights.append(count - overhead)
    return rows, ChunkPlan(tuple(owners), tuple(weights), len(texts))


def _pack(texts: list[str], regions: list[_Region], tokenizer: Any) -> list[_Region]:
    """Cut each region into candidate chunks: its sentences (split by tokens where one alone exceeds the
    capacity) packed greedily while their token counts sum to at most the capacity."""
    spans = [sentence_spans(texts[i], a, b) for i, a, b, _ in regions]
    flat = [(i, a, b) for (i, *_), region in zip(regions, spans) for a, b in region]
    strings = [texts[i][a:b] for i, a, b in flat]
    offsets = tokenizer(strings, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"] if strings else []
    units = iter(zip(flat, offsets))
    candidates: list[_Region] = []
    for (i, start, _, cap), region in zip(regions, spans):
        packed: list[list[int]] = []  # [start, end, tokens]
        for (_, a, b), offsets in (next(units) for _ in region):
            for piece_start, piece_end, count in _pieces(texts[i], a, b, offsets, cap):
                if packed and packed[-1][2] + count <= cap:
                    packed[-1][1:] = [piece_end, packed[-1][2] + count]
                else:
                    packed.append([piece_start, piece_end, count])
        candidates += [(i, a, b, cap) for a, b, _ in packed] or [(i, start, start, cap)]  # only whitespace: ""
    return candidates


def _pieces(text: str, start: int, end: int, offsets: list[tuple[int, int]], cap: int) -> list[tuple[int, int, int]]:
    """A sentence as ``(start, end, tokens)`` pieces of at most ``cap`` tokens, cut at token boundaries."""
    if len(offsets) <= cap:
        return [(start, end, len(offsets))]
    cuts = [start + offsets[k][0] for k in range(0, len(offsets), cap)][1:]
    bounds = zip([start, *cuts], [*cuts, end])
    return [(*_strip(text, a, b), min(cap, len(offsets) - k * cap)) for k, (a, b) in enumerate(bounds)]


class TruncationLog:
    """What ``long_inputs="truncate"`` dropped since the model was loaded, and when to say so.

    A warning is due when the running count of truncated texts reaches 1, 10, 100, ...: every user hears of it
    at once, with the numbers, and a corpus of a million long texts brings seven warnings, not one per batch.
    """

    def __init__(self) -> None:
        self.texts = 0
        self.tokens = 0
        self._next = 1

    def add(self, texts: int, tokens: int) -> bool:
        """Record one batch's truncated texts and dropped tokens; whether a warning is due."""
        self.texts += texts
        self.tokens += tokens
        if self.texts < self._next:
            return False
        while self._next <= self.texts:
            self._next *= 10
        return True


def dropped_tokens(texts: Sequence[str], template: Template, tokenizer: Any, kept: torch.Tensor, budget: int) -> int:
    """Tokens of the templated ``texts`` left out by truncation, given the tokens ``kept`` of each row."""
    lengths = _token_counts(tokenizer, [template.format(text) for text in texts])
    return sum(n - int(k) for n, k in zip(lengths, kept.tolist()) if n > budget)
