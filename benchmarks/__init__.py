"""Benchmarks of reportgen's engines against the naive approaches, measured in the same run.

Each script runs standalone (`python benchmarks/filters.py ...`) or through `benchmarks/run_all.py`;
see benchmarks/README.md.
"""
