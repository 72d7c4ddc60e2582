"""The cost benchmark of ``tools/bench.py``: shapes, variants, measurement, report and command line."""
