"""IJR's benchmarks: each one prints a ratio against a baseline measured in the same run.

Run them all with `.venv/bin/python bench/run.py` (see bench/run.py). They are measurements,
not tests: nothing here fails because a figure is slow.
"""
