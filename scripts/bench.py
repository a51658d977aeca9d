"""Benchmark SALMONN: load, per-stage times for a 30 s clip, time to first token, decode speed, long-audio speed.

    python scripts/bench.py --shape tiny --device cpu --json OUT.json
    python scripts/bench.py --shape salmonn-13b --device cuda --quant 4bit,8bit --markdown

The code lives in benchmarks/ (shapes, layer-by-layer builder, measurements, report); see
`python scripts/bench.py --help` and benchmarks/runner.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
