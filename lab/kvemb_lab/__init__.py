"""kvemb-lab: how kvemb-st was measured and chosen -- the evaluation harness, task loaders, probes, offline assets,
benchmarks and the code of the experiments under ``experiments/``. The product (``kvemb_st``) never imports it."""
