"""Benchmarks on random weights of the real shapes, or on real checkpoints: `python scripts/bench.py --help`.

A tool of the repository, not part of the installed package.
"""
