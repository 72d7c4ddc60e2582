"""Batched truncation in ``TemplateTokenizer`` gives exactly what the per-text algorithm it replaced gave.

``ReferenceTemplateTokenizer`` below is that algorithm, kept verbatim as the spec: tokenize the templated
texts; for each over-long one, tokenize the text alone, cut it at a token boundary so that the templated
whole should fit, and shrink the cut until it does. The batched version must agree on every output
(ids, attention mask, echo's pool mask, truncated count, errors) for texts chosen to break shortcuts:
merges at the cut, emoji, CJK, combining marks, whitespace runs, texts at the limit. It is checked with
the real SmolLM2 tokenizer (byte-level BPE) and with SentencePiece-style BPE tokenizers trained here
(one splitting words, one BPE-merging across them, one whose normalizer prepends "▁" to every string), so
that the agreement does not rest on byte-level locality. (Each of the shortcut's two safeguards, windows
starting at a space after a non-space and the check that a window reproduces the uncut tokens, makes
some of these tests fail when removed.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kvemb_st.config import COMPRESSION_TEMPLATE, PROMPTEOL_TEMPLATE
from kvemb_st.template import Template, resolve_template
from kvemb_st.chunking import Truncation
from kvemb_st.template_tokenizer import TemplateTokenizer


class ReferenceTemplateTokenizer:
    """The per-text truncation that ``TemplateTokenizer`` replaced (its ``encode``, copied unchanged but for the
    count of dropped tokens it now also returns)."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def encode(
        self, texts: Sequence[str], template: Template, text_mask: bool = False
    ) -> tuple[dict[str, torch.Tensor], Truncation]:
        texts = list(texts)
        encoded = self.tokenizer([template.format(text) for text in texts])["input_ids"]
        truncated = dropped = 0
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_length:
                texts[i], encoded[i] = self._truncate(texts[i], template, len(ids))
                truncated += 1
                dropped += len(ids) - len(encoded[i])
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
        if text_mask:
            features["text_mask"] = self._last_copy_mask(texts, template, attention_mask)
        return features, Truncation(truncated, dropped)

    def _last_copy_mask(self, texts: list[str], template: Template, attention_mask: torch.Tensor) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------ tokenizers
WORDS = (
    "the of and to in is was for on that with as by at from this be are it an or which his her had not one "
    "sentence word means meaning context compress language model embedding token cut long text quick brown "
    "fox jumps over lazy dog 1999 2024 3.14 42 http://example.com/a/b?c=1 e-mail don't it's \"quoted\" "
    "(paren) [bracket] {brace} a aa aaa aaaa !!! ... ?! 漢字 東京 日本語 한국어 😀 👍🏽 👨‍👩‍👧 🇫🇷 café "
    "naïve e\u0301 a\u0308\u0301 \t \n"
).split(" ")


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(n)]


def _sentencepiece_tokenizer(split: bool | None, prepend_scheme: str, post: str) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (spaces become ``▁``) trained here on a few hundred sentences.

    ``split``: whether the ``Metaspace`` pre-tokenizer splits words; with ``False`` the whole text is one
    "word", so learned merges cross word boundaries. ``None``: no pre-tokenizer, and a normalizer that
    prepends ``▁`` to every string, as Llama-2's original ``tokenizer.json`` does.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    if split is None:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme, split=split)
        tokenizer.decoder = decoders.Metaspace(prepend_scheme=prepend_scheme, split=split)
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=special))
    ids = {token: tokenizer.token_to_id(token) for token in special}
    tokenizer.post_processor = processors.TemplateProcessing(
        single=post, special_tokens=[(token, ids[token]) for token in ("<s>", "</s>")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer_dir):
    return {
        "smollm2": AutoTokenizer.from_pretrained(smollm2_tokenizer_dir),
        # BOS, "▁" before every word (Llama-2 / Mistral as transformers 5 builds them)
        "metaspace": _sentencepiece_tokenizer(split=True, prepend_scheme="always", post="<s> $A"),
        # merges across words, "▁" prepended only at the start, BOS and EOS
        "metaspace-unsplit": _sentencepiece_tokenizer(split=False, prepend_scheme="first", post="<s> $A </s>"),
        # "▁" prepended to every string, even one that starts with a space: windows must not be trusted
        "prepend-normalizer": _sentencepiece_tokenizer(split=None, prepend_scheme="", post="<s> $A"),
    }


FAMILIES = ["smollm2", "metaspace", "metaspace-unsplit", "prepend-normalizer"]

TEMPLATES = {
    "prompteol": Template.parse(PROMPTEOL_TEMPLATE),
    "compression": Template.parse(COMPRESSION_TEMPLATE),
    "echo": Template.parse("Rewrite the sentence: {text}, rewritten sentence: {text}", copies=2),
    "st-prompt": resolve_template(Template.parse(PROMPTEOL_TEMPLATE), "query: "),
    "bare": Template.parse("{text}"),
}


# ----------------------------------------------------------------------------------------------- texts
NATURAL = (
    "The quick brown fox jumps over the lazy dog, while a language model reads the sentence and compresses "
    "its meaning into one word. In 2024 the context was long: 3.14 meters, 42 items, and a URL "
    "http://example.com/a/b?c=1 that nobody followed. "
)

ADVERSARIAL = {
    "natural": NATURAL * 3,
    "a-run": "a" * 400,
    "a-run-after-words": NATURAL + "a" * 300,
    "spaced-a": "a " * 150,
    "digits": "1234567890" * 30,
    "spaced-numbers": " ".join(str(n * 7919) for n in range(100)),
    "decimals": " ".join(f"{n / 7:.5f}" for n in range(60)),
    "url": "https://example.com/" + "/".join(f"path{n}?q={n}&r=x" for n in range(30)),
    "punctuation": "!?.,;:-" * 45,
    "punctuation-runs": "Wait!!! ... what?!?! " * 20,
    "emoji": "😀👍🏽🎉" * 60,
    "zwj": "👨‍👩‍👧‍👦 🏳️‍🌈 " * 40,
    "flags": "🇫🇷🇩🇪🇯🇵" * 50,
    "cjk": "東京は日本の首都です。漢字とかなとカナ。" * 15,
    "hangul": "한국어 문장입니다 " * 30,
    "combining": "e\u0301a\u0308\u0301o\u0302 " * 60,
    "spaces": "word" + " " * 300 + "end",
    "newlines": "line\n\n\n" * 75,
    "tabs-and-spaces": "x \t\t  \n " * 60,
    "braces": "a {text} and {0} }{ {{}} " * 30,
    "quotes": '"quoted" \'single\' ""' * 30,
    "specials-in-text": "<s> </s> <|endoftext|> " * 25,
    "mixed": NATURAL + "漢字😀👨‍👩‍👧 e\u0301 " * 10 + "1234567890" * 10 + " !!! " * 15,
    "trailing-space": NATURAL * 3 + "     ",
    "leading-space": "   " + NATURAL * 3,
}
SHORT = {"empty": "", "space": " ", "newline": "\n", "word": "hello", "braces": "{text}", "emoji": "👍🏽"}


def outcome(encoder, texts: list[str], template: Template):
    """Everything ``encode`` promises, as plain values; or the error message it raised."""
    try:
        features, truncated = encoder.encode(texts, template, text_mask=True)
    except ValueError as err:
        return f"ValueError: {err}"
    return {key: value.tolist() for key, value in features.items()}, truncated


def assert_same(tokenizer, max_length: int, texts: list[str], template: Template) -> None:
    expected = outcome(ReferenceTemplateTokenizer(tokenizer, max_length), texts, template)
    actual = outcome(TemplateTokenizer(tokenizer, max_length), texts, template)
    assert actual == expected


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("max_length", [24, 97])
def test_each_adversarial_text_alone_matches_reference(tokenizers, family, template, max_length):
    tokenizer = tokenizers[family]
    for text in [*ADVERSARIAL.values(), *SHORT.values()]:
        assert_same(tokenizer, max_length, [text], TEMPLATES[template])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("max_length", [64])
def test_mixed_batches_in_any_order_match_reference(tokenizers, family, template, max_length):
    texts = [*ADVERSARIAL.values(), *(v for k, v in SHORT.items() if k != "empty"), NATURAL[:40]]
    rng = random.Random(max_length)
    for _ in range(2):
        rng.shuffle(texts)
        assert_same(tokenizers[family], max_length, texts, TEMPLATES[template])


def _at_limit(tokenizer, template: Template, max_length: int, text: str) -> tuple[str, str]:
    """The longest character prefix of ``text`` whose templated form fits, and the next one (which does not)."""
    length = lambda n: len(tokenizer(template.format(text[:n]))["input_ids"])  # noqa: E731
    low, high = 0, len(text)
    assert length(high) > max_length
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if length(middle) <= max_length else (low, middle)
    return text[:low], text[:high]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", ["prompteol", "echo", "bare"])
@pytest.mark.parametrize("name", ["natural", "a-run-after-words", "zwj", "cjk", "combining", "spaced-numbers"])
def test_texts_that_just_fit_or_exceed_by_one_token_match_reference(tokenizers, family, template, name):
    tokenizer, parsed = tokenizers[family], TEMPLATES[template]
    for max_length in (40, 97):
        fits, exceeds = _at_limit(tokenizer, parsed, max_length, ADVERSARIAL[name])
        assert_same(tokenizer, max_length, [fits], parsed)
        assert_same(tokenizer, max_length, [exceeds], parsed)
        assert_same(tokenizer, max_length, [exceeds, fits, exceeds + " x"], parsed)


PIECES = [
    "a", "aa", "aaaa", " ", "  ", "\n", "\t", "1", "23", "456", ".", "!!", "?", ",", "'s", "-", "/", ":",
    "http://x.y/", "the", " quick", " brown", "word", "é", "e\u0301", "\u0308", "ä", "漢", "字", "。", "😀",
    "👍🏽", "👨‍👩‍👧", "🇫🇷", "\u200d", "{", "}", "{text}", '"', "<s>", "</s>",
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_random_texts_match_reference(tokenizers, family, template):
    rng = random.Random(f"{family}-{template}")
    for _ in range(12):
        texts = ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 300))) for _ in range(6)]
        assert_same(tokenizers[family], rng.choice([16, 29, 64, 100]), texts, TEMPLATES[template])


@pytest.mark.parametrize("family", FAMILIES)
def test_template_alone_too_long_is_the_same_error(tokenizers, family):
    template = Template.parse("word " * 20 + "{text} means:")
    texts = [NATURAL * 2, "short"]
    expected = outcome(ReferenceTemplateTokenizer(tokenizers[family], 8), texts, template)
    assert isinstance(expected, str) and "template alone takes" in expected
    assert outcome(TemplateTokenizer(tokenizers[family], 8), texts, template) == expected


def test_text_cut_to_nothing_leaves_the_template(tokenizers):
    """A max_length that the template alone just fits: the reference cuts the text away entirely."""
    tokenizer, template = tokenizers["smollm2"], TEMPLATES["prompteol"]
    alone = len(tokenizer(template.format(""))["input_ids"])
    for max_length in (alone, alone + 1):
        assert_same(tokenizer, max_length, [NATURAL, "a" * 300, "hi"], template)


def test_empty_text_without_instruction_is_the_same_error(tokenizers):
    assert_same(tokenizers["smollm2"], 16, [NATURAL, ""], TEMPLATES["bare"])


class CountingTokenizer:
    """Counts calls to the wrapped tokenizer; everything else is passed through."""

    def __init__(self, tokenizer) -> None:
        self.inner = tokenizer
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def _calls(tokenizer, texts: list[str], template: Template, max_length: int) -> int:
    counting = CountingTokenizer(tokenizer)
    TemplateTokenizer(counting, max_length).encode(texts, template)
    return counting.calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", ["prompteol", "echo"])
def test_tokenizer_calls_do_not_grow_with_the_number_of_cut_texts(tokenizers, family, template):
    words = NATURAL.split(" ")
    rng = random.Random(0)
    texts = [" ".join(rng.sample(words, len(words)) * 4) for _ in range(48)]
    alone = max(_calls(tokenizers[family], [text], TEMPLATES[template], 64) for text in texts)  # its steps
    assert _calls(tokenizers[family], texts, TEMPLATES[template], 64) == alone  # the same steps, batched
    everything = list(ADVERSARIAL.values()) * 2  # some take the shortcut, some not
    assert _calls(tokenizers[family], everything, TEMPLATES[template], 64) <= 12
