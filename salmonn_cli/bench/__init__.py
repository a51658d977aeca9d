"""Benchmarks on random weights of the real shapes: `python -m salmonn_cli.bench` or scripts/bench.py."""
