"""Decoding settings: the one type that carries them from the command line (or the API) to the decoder.

Torch-free, so the command line derives its option defaults from it without loading anything heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings, named as in SALMONN's generate_cfg / transformers 4.28's GenerationConfig."""

    max_new_tokens: int = 200
    num_beams: int = 4
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50  # 4.28's GenerationConfig default; only used when sampling
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    min_length: int = 1  # counts the bos placeholder, as in 4.28

    def __post_init__(self) -> None:
        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_real(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        problems = []
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not is_int(self.num_beams) or self.num_beams < 1:
            problems.append(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if not isinstance(self.do_sample, bool):
            problems.append(f"do_sample must be true or false, got {self.do_sample!r}")
        if not is_real(self.temperature) or (self.do_sample and self.temperature <= 0):
            problems.append(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if not is_real(self.length_penalty):
            problems.append(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not is_int(self.min_length) or self.min_length < 0:
            problems.append(f"min_length must be an integer >= 0, got {self.min_length!r}")
        if problems:
            raise UsageError("; ".join(problems))


def decode_options(base: DecodeOptions | None = None, **changes: Any) -> DecodeOptions:
    """`base` (default: the original's `DecodeOptions()`) with some fields changed; an unknown name is a UsageError."""
    unknown = sorted(set(changes) - {f.name for f in fields(DecodeOptions)})
    if unknown:
        raise UsageError(f"unknown decoding option(s): {', '.join(unknown)}")
    return replace(base or DecodeOptions(), **changes)
