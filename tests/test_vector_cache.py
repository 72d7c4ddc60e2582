"""The lab's vector cache (lab/kvemb_lab/vector_cache.py): a sibling read out of another model's forward pass, and
two runs sharing one task.

``mean`` and ``last`` run the same plain forward; the MTEB table embeds each text once for both. The sibling's cached
vectors must be what the sibling model returns on its own, on every side, with padding in the batch. Two runs of the
same task (one ``shortest_first``) must split the texts between them, never embed one twice, and both return what
the model gives on its own.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvemb_st

vector_cache = pytest.importorskip("kvemb_lab.vector_cache", reason="the lab package is not installed (pip install -e ./lab)")
CachedEncode = vector_cache.CachedEncode

TEXTS = ["a short one", "a somewhat longer sentence about the weather in spring", "x", "two words",
         "the longest text of this little list, so that every batch of three has padding in it"]  # fmt: skip
KV = dict(method="kv", layers="1-2", document_template="Passage: {text} Compress it into one word:")


def own_vectors(model, texts, call):
    """The model's vectors as a user gets them: its own encode, no cache."""
    return getattr(model, call)(texts, batch_size=2, convert_to_numpy=True)


@pytest.mark.parametrize(
    ("first", "second"),
    [(dict(method="mean"), dict(method="last")),
     (KV, {**KV, "pooling": "mean"})],  # re-routed, with a document side of its own template
    ids=["mean-last", "kv-sides"],
)  # fmt: skip
def test_a_sibling_caches_what_its_own_forward_gives_on_every_side(tiny_llama, tmp_path, first, second):
    model, other = kvemb_st.from_base(tiny_llama, **first), kvemb_st.from_base(tiny_llama, **second)
    expected = {call: own_vectors(other, TEXTS, call) for call in ("encode", "encode_query", "encode_document")}
    mine = {call: own_vectors(model, TEXTS, call) for call in expected}

    encode = CachedEncode(model, tmp_path, siblings=[other])
    for call in expected:  # through the model's own encode_query / encode_document, as mteb calls them
        np.testing.assert_allclose(getattr(model, call)(TEXTS, batch_size=3), mine[call], atol=1e-5)
    assert encode.counts.embedded == 3 * len(TEXTS)
    encode.close()

    served = CachedEncode(other, tmp_path)  # the sibling's own cache file: every vector is there already
    for call, vectors in expected.items():
        np.testing.assert_allclose(getattr(other, call)(TEXTS, batch_size=3), vectors, atol=1e-5)
    assert served.counts.embedded == 0 and served.counts.cached == 3 * len(TEXTS)
    assert not np.allclose(expected["encode"], mine["encode"], atol=1e-3)  # two readouts, not one vector twice


def test_a_model_of_another_forward_pass_is_no_sibling(tiny_llama, tmp_path):
    mean = kvemb_st.from_base(tiny_llama, method="mean")
    with pytest.raises(ValueError, match="'prompteol' runs another forward pass than 'mean'"):
        CachedEncode(mean, tmp_path, siblings=[kvemb_st.from_base(tiny_llama, method="prompteol")])
    chunked = kvemb_st.from_base(tiny_llama, method="mean", long_inputs="chunk")  # the same forward, chunked
    for first, knob in ((mean, dict(pool_layers=[1])), (mean, dict(pool_span="text")), (chunked, dict(long_inputs="chunk"))):
        other = kvemb_st.from_base(tiny_llama, method="last", pooling="mean", **knob)
        with pytest.raises(ValueError, match="pools intermediate layers, averages the text's own tokens or chunks"):
            CachedEncode(first, tmp_path, siblings=[other])
    assert not list(tmp_path.iterdir())  # refused before any cache file was made


def test_two_runs_of_one_task_meet_in_the_middle(tiny_llama, tmp_path):
    """A run embeds longest first, chunk by chunk; a second run started beside it (shortest first, its own process
    in real use, its own model object here) embeds from the other end, and each skips what the other has cached."""
    first, second = (kvemb_st.from_base(tiny_llama, method="mean") for _ in range(2))
    expected = own_vectors(first, TEXTS, "encode")
    longest = sorted(TEXTS, key=len, reverse=True)
    lanes = {"first": CachedEncode(first, tmp_path, chunk=2),
             "second": CachedEncode(second, tmp_path, chunk=2, shortest_first=True)}  # fmt: skip
    assert lanes["first"].cache.path == lanes["second"].cache.path
    embedded = {name: [] for name in lanes}

    def recording(name):
        original = lanes[name].embed

        def embed(texts, *args):
            embedded[name].append(texts)
            if name == "first" and len(embedded["first"]) == 1:  # the second run starts during the first's chunk 1
                second.encode(longest[2:], batch_size=2)  # ...and is done with its end meanwhile
            return original(texts, *args)

        lanes[name].embed = embed

    for name in lanes:
        recording(name)
    got = first.encode(TEXTS, batch_size=2)

    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert embedded["first"] == [longest[:2]]  # its first chunk only: the rest was cached before it got there
    assert embedded["second"] == [longest[2:][::-1][:2], longest[2:][::-1][2:]]  # shortest first
    assert lanes["first"].counts.embedded == 2 and lanes["first"].counts.cached == len(TEXTS) - 2
    assert lanes["second"].counts.embedded == len(TEXTS) - 2
    np.testing.assert_allclose(second.encode(TEXTS, batch_size=2), expected, atol=1e-5)  # all cached, none twice
    assert lanes["second"].counts.embedded == len(TEXTS) - 2
