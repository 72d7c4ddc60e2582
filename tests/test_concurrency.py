"""Two models with different settings used from two threads give the vectors they give alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

import kvemb_st

TEXTS = [f"sentence number {i} about {'cats' if i % 2 else 'the weather'}" + " and more" * (i % 5) for i in range(24)]


def test_two_models_in_two_threads_match_their_solo_vectors(tiny_llama):
    a = kvemb_st.from_base(tiny_llama, layers=[0, 1], prefix_bias=0.0, prefix_rope="keep", pooling="last")
    b = kvemb_st.from_base(tiny_llama, layers=[2, 3], prefix_bias=5.0, prefix_rope="start", pooling="mean")
    solo_a, solo_b = a.encode(TEXTS, batch_size=4), b.encode(TEXTS, batch_size=4)
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(m.encode, TEXTS, batch_size=4) for m in (a, b, a, b, a, b)]
        results = [job.result() for job in jobs]
    for i, result in enumerate(results):
        np.testing.assert_allclose(result, solo_a if i % 2 == 0 else solo_b, atol=1e-6)
    assert np.abs(solo_a - solo_b).max() > 1e-3
