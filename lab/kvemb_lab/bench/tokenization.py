"""Cost of the template tokenizer against one plain batched tokenizer call over the same templated texts.

``TemplateTokenizer.encode`` (what ``KVEmbedding.preprocess`` runs) tokenizes the templated texts and, for
texts over ``max_length``, cuts the text part and re-tokenizes. The baseline is one batched call of the
tokenizer over the same templated, uncut texts: what tokenization costs when nothing has to be cut. Each
repeat times both, in an order alternating from repeat to repeat; the ratio is the median over repeats of
encode / baseline within one repeat (paired: the machine's speed drifts between repeats).
Texts are running STS-B sentences, each a different stretch, of about ``--tokens`` templated tokens::

    python tools/bench_tokenize.py                       # 32 texts of ~600 tokens, cut to 512 and uncut
    python tools/bench_tokenize.py --template echo --repeats 11
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from transformers import AutoTokenizer

from kvemb_st.config import NAMED_TEMPLATES
from kvemb_st.template import Template
from kvemb_st.template_tokenizer import TemplateTokenizer

from kvemb_lab.assets import load_sts_b, smollm2_folder

TEMPLATES = {**NAMED_TEMPLATES, "echo": "Rewrite the sentence: {text}, rewritten sentence: {text}"}


def running_texts(tokenizer, template: Template, count: int, tokens: int) -> list[str]:
    """``count`` texts of running STS-B sentences, each at least ``tokens`` tokens once templated."""
    sentences = iter(s for pair in load_sts_b("train") for s in pair[:2])
    texts = []
    for _ in range(count):
        text = next(sentences)
        while len(tokenizer(template.format(text))["input_ids"]) < tokens:
            text += " " + next(sentences)
        texts.append(text)
    return texts


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def tokenization_ratio(tokenizer, template: Template, texts: list[str], max_length: int, repeats: int) -> dict:
    """Median ms of ``TemplateTokenizer.encode`` and of one batched tokenizer call, and their paired ratio."""
    encoder = TemplateTokenizer(tokenizer, max_length)
    formatted = [template.format(text) for text in texts]
    variants = {"encode": lambda: encoder.encode(texts, template), "baseline": lambda: tokenizer(formatted)}
    _, cut = encoder.encode(texts, template)  # warm-up, untimed
    tokenizer(formatted)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name in sorted(variants, reverse=repeat % 2 == 1):
            times[name].append(_seconds(variants[name]))
    return {
        "texts": len(texts),
        "cut": cut.texts,
        "tokens_dropped": cut.tokens,
        "max_length": max_length,
        "encode_ms": 1e3 * statistics.median(times["encode"]),
        "baseline_ms": 1e3 * statistics.median(times["baseline"]),
        "ratio": statistics.median(e / b for e, b in zip(times["encode"], times["baseline"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: SmolLM2's)")
    parser.add_argument("--template", default="prompteol", choices=sorted(TEMPLATES))
    parser.add_argument("--count", type=int, default=32, help="texts in the batch")
    parser.add_argument("--tokens", type=int, default=600, help="templated tokens per text, about")
    parser.add_argument("--max-length", type=int, default=512, help="max_seq_length for the cut case")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or smollm2_folder())
    template = Template.parse(TEMPLATES[args.template], copies=TEMPLATES[args.template].count("{text}"))
    texts = running_texts(tokenizer, template, args.count, args.tokens)
    print(f"{args.count} texts of >= {args.tokens} templated tokens ({args.template}), {args.repeats} repeats")
    print("| case | texts cut | tokens dropped | encode ms | one call ms | encode / one call |")
    print("|---|---|---|---|---|---|")
    for case, max_length in (("cut", args.max_length), ("fit", 4 * args.tokens)):
        row = tokenization_ratio(tokenizer, template, texts, max_length, args.repeats)
        print(
            f"| {case} (max_length {max_length}) | {row['cut']} | {row['tokens_dropped']} | {row['encode_ms']:.1f} | "
            f"{row['baseline_ms']:.1f} | {row['ratio']:.2f}x |"
        )


if __name__ == "__main__":
    main()
