"""One forward pass, every readout: the probe's vectors equal models built with each readout."""

from __future__ import annotations

import numpy as np
import pytest

import kvemb_st
from kvemb_st.pooling import Readout

from kvemb_lab.layer_probe import ProbeVectors, probe

TEXTS = ["short", "a somewhat longer sentence with quite a few more tokens in it", "medium length text", "x"]
READOUTS = ["mean", "last", "mean+last:0.3", "mean/text", "mean@1", "last@0-2", "mean+last:0.5/text@1-2", "mean@3"]


@pytest.mark.parametrize("method", ["kv", "mean", "echo"])
def test_probe_readouts_equal_models_built_with_each_readout(tiny_llama, tmp_path, method):
    layers = "1-2" if method == "kv" else ()
    vectors = probe(kvemb_st.from_base(tiny_llama, layers, method=method), TEXTS, batch_size=3)
    vectors.save(tmp_path / "probe.npz")
    loaded = ProbeVectors.load(tmp_path / "probe.npz")
    assert loaded.texts == TEXTS
    for spec in READOUTS:
        readout = Readout.parse(spec)
        knobs = dict(pooling=readout.pooling, last_weight=readout.last_weight, pool_span=readout.span,
                     pool_layers=None if readout.layers is None else list(readout.layers))
        built = kvemb_st.from_base(tiny_llama, layers, method=method, **knobs)
        np.testing.assert_allclose(loaded.vectors(readout), built.encode(TEXTS), atol=2e-5, err_msg=spec)
    # the readouts really differ: a probe that ignored the layer or the span would pass nothing above
    assert not np.allclose(vectors.vectors(Readout.parse("mean@1")), vectors.vectors(Readout.parse("mean")), atol=1e-3)
    if method == "kv":  # mean: the raw text has no template tokens; echo: its default span is the text
        assert not np.allclose(vectors.vectors(Readout.parse("mean/text")), vectors.vectors(Readout.parse("mean")), atol=1e-3)


def test_probe_uses_the_side_a_role_names(tiny_llama):
    model = kvemb_st.from_base(tiny_llama, "1-2", document_template='Passage : "{text}" means in one word:"')
    doc = probe(model, TEXTS, "document").vectors(Readout())
    np.testing.assert_allclose(doc, model.encode_document(TEXTS), atol=2e-5)
    assert not np.allclose(doc, probe(model, TEXTS, "text").vectors(Readout()), atol=1e-3)
