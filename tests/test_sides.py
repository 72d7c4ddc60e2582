"""Sides as sentence-transformers tasks: ``encode_query`` / ``encode_document`` and ``encode(prompt_name=...)`` reach
each side's own template and readout -- checked against readouts written plainly here, on a plain forward of the
tiny model -- the side's ST prompt is a name tag that never reaches the text, the settings survive both loaders,
and configurations that would make two sides indistinguishable are refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

import kvemb_st
from kvemb_st.cli import KNOB_OPTIONS, SIDE_FLAGS
from kvemb_st.config import PROMPTEOL_TEMPLATE, ConfigError, KVEmbeddingConfig
from kvemb_st.side import SIDE_KEYS, Side, SideError, side_tag

TEXTS = ["A man is playing a guitar.", "Someone plays an instrument in the park today.", "Markets fell."]
DOC_TEMPLATE = 'This passage : "{text}" means in one word:"'
# Same template (prompteol's) on every side, three readouts: plain encode the last token, queries the mean of the
# final output, documents a mean+last mix at layer 1; only the readout can tell them apart.
SAME_TEMPLATE = {"query": {"pooling": "mean"},
                 "document": {"pooling": "mean+last", "last_weight": 0.25, "pool_layers": [1]}}  # fmt: skip


class Plain:
    """A plain forward of the tiny base, one text at a time, without padding or any kvemb code."""

    def __init__(self, folder: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.backbone = AutoModel.from_pretrained(folder).eval()

    def states(self, text: str, template: str, layer: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, H)`` output of decoder layer ``layer`` (``None``: the final, normed output) and the tokens' spans."""
        encoded = self.tokenizer(template.replace("{text}", text), return_offsets_mapping=True, return_tensors="pt")
        offsets = encoded.pop("offset_mapping")[0]
        with torch.no_grad():
            out = self.backbone(**encoded, output_hidden_states=True)
        return (out.last_hidden_state if layer is None else out.hidden_states[layer + 1])[0].double(), offsets

    def vector(self, text: str, template: str, readout: str, layer: int | None = None, weight: float = 0.0) -> np.ndarray:
        hidden, _ = self.states(text, template, layer)
        mean, last = hidden.mean(0), hidden[-1]
        vector = {"mean": mean, "last": last,
                  "mean+last": (1 - weight) * mean / mean.norm() + weight * last / last.norm()}[readout]  # fmt: skip
        return (vector / vector.norm()).float().numpy()


@pytest.fixture(scope="module")
def plain(tiny_llama) -> Plain:
    return Plain(tiny_llama)


@pytest.fixture(scope="module")
def same_template(tiny_llama):
    return kvemb_st.from_base(tiny_llama, method="prompteol", sides=SAME_TEMPLATE)


def expected_same_template(plain: Plain) -> dict[str | None, np.ndarray]:
    return {
        None: np.stack([plain.vector(t, PROMPTEOL_TEMPLATE, "last") for t in TEXTS]),
        "query": np.stack([plain.vector(t, PROMPTEOL_TEMPLATE, "mean") for t in TEXTS]),
        "document": np.stack([plain.vector(t, PROMPTEOL_TEMPLATE, "mean+last", layer=1, weight=0.25) for t in TEXTS]),
    }


def every_call(model) -> dict[str, tuple[str | None, np.ndarray]]:
    """Each way to reach a side -> (the side, the vectors): by task, by the prompt's name, and by its text (mteb)."""
    return {
        "encode": (None, model.encode(TEXTS)),
        "encode_query": ("query", model.encode_query(TEXTS)),
        "encode_document": ("document", model.encode_document(TEXTS)),
        "prompt_name=query": ("query", model.encode(TEXTS, prompt_name="query")),
        "prompt_name=document": ("document", model.encode(TEXTS, prompt_name="document")),
        "encode_query(prompt=tag)": ("query", model.encode_query(TEXTS, prompt=model.prompts["query"])),
        "encode(task=document)": ("document", model.encode(TEXTS, task="document")),
    }


def test_same_template_different_readouts_are_told_apart_by_task_and_by_prompt_name(same_template, plain):
    expected = expected_same_template(plain)
    for call, (side, got) in every_call(same_template).items():
        np.testing.assert_allclose(got, expected[side], atol=2e-5, err_msg=call)
    for a, b in ((None, "query"), (None, "document"), ("query", "document")):
        assert not np.allclose(expected[a], expected[b], atol=1e-3)  # the readouts really differ


def test_same_template_sides_survive_both_loaders(same_template, plain, tmp_path):
    same_template.save(str(tmp_path))
    prompts = json.loads((tmp_path / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": side_tag("query"), "document": side_tag("document")}
    expected = expected_same_template(plain)
    for loaded in (SentenceTransformer(str(tmp_path), trust_remote_code=True), kvemb_st.load(str(tmp_path))):
        for call, (side, got) in every_call(loaded).items():
            np.testing.assert_allclose(got, expected[side], atol=2e-5, err_msg=call)


def test_the_tag_never_reaches_the_text_and_other_prompts_keep_their_meaning(same_template):
    module = same_template[0]
    plain_ids = module.preprocess(["x"])["input_ids"][0]
    for prompt in (side_tag("query"), side_tag("document")):
        assert torch.equal(module.preprocess(["x"], prompt=prompt)["input_ids"][0], plain_ids)
    decode = lambda **kw: module.tokenizer.decode(module.preprocess(["x"], **kw)["input_ids"][0])  # noqa: E731
    assert decode(prompt="Topic: ", task="query") == 'This sentence : "Topic: x" means in one word:"'
    assert decode(prompt="Say {text} now") == "Say x now"  # a prompt with {text} is a whole template
    assert module.preprocess(["x"], prompt=side_tag("document"))["task"] == "document"  # for a following Router


# ----------------------------------------------------------------------------- a side's own template and span
@pytest.fixture(scope="module")
def text_span(tiny_llama):
    sides = {"document": {"template": DOC_TEMPLATE, "pool_layers": [1], "pool_span": "text", "pooling": "mean"}}
    return kvemb_st.from_base(tiny_llama, method="mean", sides=sides)


def text_span_vector(plain: Plain, text: str, template: str) -> np.ndarray:
    """Mean over the tokens holding the text's characters, at layer 1."""
    hidden, offsets = plain.states(text, template, layer=1)
    prefix = template.split("{text}")[0]
    inside = (offsets[:, 0] < len(prefix) + len(text)) & (offsets[:, 1] > len(prefix))
    vector = hidden[inside].mean(0)
    return (vector / vector.norm()).float().numpy()


def test_document_side_template_and_text_span_is_the_hand_written_readout(text_span, plain):
    got = text_span.encode_document(TEXTS)
    np.testing.assert_allclose(got, np.stack([text_span_vector(plain, t, DOC_TEMPLATE) for t in TEXTS]), atol=2e-5)
    np.testing.assert_array_equal(text_span.encode(TEXTS, prompt_name="document"), got)
    # an extra prompt goes inside the side's template, before the text, and is not part of the text's span
    prefixed = text_span.encode_document(TEXTS, prompt="Topic: ")
    assert not np.allclose(prefixed, got, atol=1e-3)
    np.testing.assert_allclose(prefixed[0], text_span_vector(plain, TEXTS[0], DOC_TEMPLATE.replace("{text}", "Topic: {text}")),
                               atol=2e-5)  # fmt: skip
    # no query side: encode_query reads out like plain encode
    np.testing.assert_array_equal(text_span.encode_query(TEXTS), text_span.encode(TEXTS))


# ---------------------------------------------------------------------------------------- refused setups
@pytest.fixture(scope="module")
def saved(same_template, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sides")
    same_template.save(str(folder))
    return str(folder)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ({"document": "Represent this passage: "}, r"ST prompt 'document' is .* a side of this model"),
        ({"document": ""}, None),  # ST's "no prompt": the side's tag
        ({"query": side_tag("document")}, r"ST prompt 'query' is .* a side of this model"),
        ({"passage": side_tag("document")}, None),  # another name for the document side
        ({"passage": "<kvemb-side:passage>"}, "looks like a side tag but is none"),
    ],
)
def test_st_prompts_that_hide_a_side_are_refused(saved, prompts, message):
    if message is None:
        model = SentenceTransformer(saved, trust_remote_code=True, prompts=prompts)
        np.testing.assert_array_equal(model.encode(TEXTS, prompt_name=next(iter(prompts))), model.encode_document(TEXTS))
        return
    with pytest.raises(ValueError, match=message):
        SentenceTransformer(saved, trust_remote_code=True, prompts=prompts)


def test_a_prompt_tagging_a_side_without_one_is_refused(text_span):
    with pytest.raises(ValueError, match="ST prompt 'query' is the tag of side 'document'"):
        SentenceTransformer(modules=[text_span[0]], prompts={"query": side_tag("document")})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_name": "document", "task": "query"}, "task 'query' and the prompt of side 'document' disagree"),
        ({"task": "passage"}, "unknown task 'passage'"),
        ({"prompt": "<kvemb-side:document"}, "looks like a side tag but is none"),
    ],
)
def test_calls_that_name_two_sides_or_none_are_refused(same_template, kwargs, message):
    with pytest.raises(ValueError, match=message):
        same_template.encode(TEXTS, **kwargs)


@pytest.mark.parametrize(
    ("sides", "message"),
    [
        ({"passage": {"pooling": "mean"}}, "unknown side 'passage'"),
        ({"document": {"pool_layer": 1}}, "sides.document': unknown key"),
        ({"document": {}}, "non-empty object"),
        ({"document": {"pool_layers": [9]}}, "sides.document.pool_layers.*out of range"),
        ({"document": {"pool_layers": []}}, "sides.document.pool_layers'.*non-empty list"),
        ({"document": {"pool_span": "words"}}, "sides.document.pool_span"),
        ({"document": {"last_weight": -1}}, "sides.document.last_weight"),
        ({"document": {"pooling": "max"}}, "sides.document.pooling"),
        ({"document": {"template": "no placeholder"}}, "sides.document.template"),
        ({"document": {"template": "<kvemb-side:query> {text}"}}, "sides.document.template'.*may not hold"),
        ({"query": {"layers": [1]}}, "unknown key"),
    ],
)
def test_bad_sides_in_a_saved_config_name_the_file_and_the_key(saved, tmp_path, sides, message):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "kvemb_config.json").read_text())
    (folder / "kvemb_config.json").write_text(json.dumps({**config, "sides": sides}))
    with pytest.raises(ConfigError, match=message) as err:
        kvemb_st.load(str(folder))
    assert "kvemb_config.json" in str(err.value)


# ------------------------------------------------------------------------------- one definition of a side
def test_every_side_knob_is_a_config_key_a_flag_and_validated_by_side():
    config_keys = {f.name for f in fields(KVEmbeddingConfig)}
    assert set(SIDE_KEYS) <= config_keys  # the top-level knobs of plain encode
    assert set(SIDE_KEYS) <= set(KNOB_OPTIONS) and set(SIDE_FLAGS) == set(SIDE_KEYS) - {"template"}
    with pytest.raises(SideError, match="'pool_span'"):
        Side(template="{text}", pooling="mean", pool_span="words")
    side = Side(template="{text}", pooling="mean", pool_span="all", pool_layers=[3, 1])
    assert side.pool_layers == (1, 3) and side.to_dict()["pool_layers"] == [1, 3]
    with pytest.raises(AttributeError):
        side.pooling = "last"  # frozen


@pytest.mark.parametrize("prompt", ["<kvemb-side:query> Represent it: ", " <kvemb-side:query>", "Topic <kvemb-side:document>",
                                    "<kvemb-side:query><kvemb-side:document>"])  # fmt: skip
def test_a_tag_with_more_text_is_refused_not_half_read(same_template, prompt):
    """Only a whole prompt is a tag: a tag with an instruction around it would lose the instruction silently."""
    with pytest.raises(ValueError, match="looks like a side tag but is none"):
        same_template.encode(TEXTS, prompt=prompt)
