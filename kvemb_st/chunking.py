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

import bisect
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from kvemb_st.template import Template

SENTENCE_BOUNDARY = re.compile(r"""(?:(?<=[.!?…])|(?<=[.!?…]["'”’)\]]))\s+|\s*\n\s*""")
"""Whitespace after ``. ! ? …`` (possibly closed by a quote or bracket), or around a line break."""

_SLACK = 1
"""Tokens a first packing leaves free: the template and a chunk's ends can merge differently than in the whole text
(``'."'`` then ``'"'`` becomes ``'.'`` and ``'""'``), and a chunk that does not fit costs another round."""

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
        self,
        features: dict[str, Any],
        embed: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
        weighting: str,
        combine: str = "before",
    ) -> dict[str, Any]:
        """Embed the rows of ``features`` in groups of at most :attr:`texts` rows, then one vector per text.

        A forward never holds more rows than the batch had texts, so ``batch_size`` bounds memory as it does
        without chunking. ``embed`` maps a group's features to its ``token_embeddings`` and unit
        ``sentence_embedding``. The token-level outputs of a text are its rows' real tokens joined, so that
        ``output_value="token_embeddings"`` still gives one entry per text. With ``combine="after"`` the unit row
        vectors also go on as ``features["chunk_rows"]`` (:class:`ChunkRows`), for a post-processing module.
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
        rows = torch.cat(vectors)
        out = {**features, **joined, "sentence_embedding": self.combine(rows, weighting)}
        if combine == "after":
            out[CHUNK_ROWS] = ChunkRows(self, rows, weighting)
        return out

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
            yield {
                key: value[start:stop, :width] if isinstance(value, torch.Tensor) else value
                for key, value in features.items()
            }

    def _join(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Each text's rows concatenated, right-padded with zeros."""
        bounds = [0] * (self.texts + 1)
        for owner in self.owners:
            bounds[owner + 1] += 1
        for k in range(self.texts):
            bounds[k + 1] += bounds[k]
        return pad_sequence([torch.cat(rows[a:b]) for a, b in zip(bounds, bounds[1:])], batch_first=True)


CHUNK_ROWS = "chunk_rows"
"""The features key under which the chunk row vectors of a batch travel when they are combined after the
post-processing."""


class ChunkRows(NamedTuple):
    """The unit chunk-row vectors of one batch, for ``chunk_combine="after"``: a post-processing module transforms
    :attr:`vectors` row by row and :meth:`combine` averages the results per text. Without such a module nothing
    reads them, and the vector combined before stands: with no transform in between, before and after agree."""

    plan: ChunkPlan
    vectors: torch.Tensor
    weighting: str

    def combine(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One unit vector per text: the weighted mean of its rows' unit ``transform``-ed vectors."""
        return self.plan.combine(F.normalize(transform(self.vectors), dim=-1), self.weighting)


def split_long_texts(
    texts: Sequence[str], template: Template, tokenizer: Any, budget: int
) -> tuple[list[str], ChunkPlan | None]:
    """The rows to tokenize for ``texts``: each text that fits ``budget`` tokens in ``template`` as it is, each
    longer one as its chunks, every chunk fitting ``budget`` in ``template``; and the plan that recombines them
    (``None`` if every text fits: the rows are the texts).

    Lengths come from the model's own tokenizer. The templated texts are tokenized once: their lengths say which
    are too long, and their token spans give each sentence's token count, by which sentences are packed. The
    candidate chunks of all texts are then tokenized together, templated, to check that they fit; one that does
    not (tokens merge across its joins) is packed again with a capacity smaller by its excess.
    """
    texts = list(texts)
    encoded = tokenizer([template.format(text) for text in texts], add_special_tokens=True, return_offsets_mapping=True)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    over = [i for i, n in enumerate(lengths) if n > budget]
    if not over:
        return texts, None
    overhead = _token_counts(tokenizer, [template.format("")])[0]
    capacity = (budget - overhead) // template.copies
    if capacity < 1:
        raise ValueError(
            f"the template alone takes {overhead} tokens, leaving no room for text in max_seq_length={budget}; "
            "raise max_seq_length or shorten the template"
        )
    spans = {i: _text_spans(encoded["offset_mapping"][i], len(template.prefix), len(texts[i])) for i in over}
    chunks: dict[int, list[tuple[int, int, int]]] = {i: [] for i in over}
    pending: list[_Region] = [(i, 0, len(texts[i]), max(capacity - _SLACK, 1)) for i in over]
    while pending:
        candidates = [chunk for region in pending for chunk in _pack(texts[region[0]], spans[region[0]], region)]
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
            weights.append(max(count - overhead, 1))  # an empty chunk (a text of whitespace) still counts
    return rows, ChunkPlan(tuple(owners), tuple(weights), len(texts))


def _text_spans(offsets: list[tuple[int, int]], start: int, length: int) -> np.ndarray:
    """``(tokens, 2)`` character spans, relative to the text, of the tokens of a text found at ``start`` in a
    tokenized string (its first copy; the template's tokens and special tokens left out)."""
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    keep = (spans[:, 1] > spans[:, 0]) & (spans[:, 1] > start) & (spans[:, 0] < start + length)
    return np.clip(spans[keep] - start, 0, length)


def _pack(text: str, spans: np.ndarray, region: _Region) -> list[_Region]:
    """Candidate chunks of a region: its sentences (cut by tokens where one alone exceeds the capacity) packed
    greedily while their token counts sum to at most the capacity. A token counts where its last character is."""
    i, start, end, cap = region
    ends = spans[:, 1].tolist()
    packed: list[list[int]] = []  # [start, end, tokens]
    for a, b in sentence_spans(text, start, end):
        first, stop = bisect.bisect_right(ends, a), bisect.bisect_right(ends, b)
        cuts = [max(int(spans[k, 0]), a) for k in range(first + cap, stop, cap)]  # a sentence too long alone
        for k, (piece_start, piece_end) in enumerate(zip([a, *cuts], [*cuts, b])):
            count = min(cap, stop - first - k * cap)
            if packed and packed[-1][2] + count <= cap:
                packed[-1][1:] = [piece_end, packed[-1][2] + count]
            else:
                packed.append([piece_start, piece_end, count])
    return [(i, *_strip(text, a, b), cap) for a, b, _ in packed] or [(i, start, start, cap)]  # only whitespace: ""


class Truncation(NamedTuple):
    """What ``long_inputs="truncate"`` left out of one batch: the texts cut and the templated tokens dropped from
    them (counted by :class:`~kvemb_st.template_tokenizer.TemplateTokenizer` from the tokenization it does anyway)."""

    texts: int
    tokens: int


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
