"""What a benchmark is asked and what it reports, with no heavy import (so `--help` stays instant)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

# the measurements of benchmarks/measure.py, in the order they run
LIVE_WINDOW_S = 5.0  # `live`'s fixed windows in the bench: each one's end -> its text is one latency
MEASUREMENT_NAMES = ("stages", "first_token", "decode", "decode_beams", "ask", "long_audio", "live")


@dataclass(frozen=True)
class Stat:
    """Seconds (or another unit) of the timed runs of one measurement."""

    median: float
    min: float
    max: float
    runs: tuple[float, ...]

    @classmethod
    def of(cls, runs: list[float]) -> Stat:
        return cls(statistics.median(runs), min(runs), max(runs), tuple(runs))


@dataclass(frozen=True)
class BenchOptions:
    """What the measurements are asked to do."""

    repeat: int = 5
    warmup: int = 1
    new_tokens: int = 32  # tokens per answer (decode speed, ask, long audio)
    num_beams: int = 4  # beams of `ask` and the long-audio answers: the original's decoding
    long_seconds: float = 180.0
    live_seconds: float = 20.0  # audio fed to the live pipeline at real-time pace (so this many wall seconds)
    batch_size: int = 4
    compile: str = "auto"  # the decode step's `--compile`, as a long-lived run takes it (decode speed times each way)
    step_ways: tuple[str, ...] = ("compiled", "graph", "eager")  # what decode speed times, where the device has it
