"""LLM weight quantisation: a spec (none | 8bit | 4bit), its backends (bitsandbytes, optimum-quanto) and the
memory each mode needs.

Imports nothing heavy: torch, transformers and the backends load only when a model is quantised.
"""

from .backends import (
    MissingBackendError,
    llm_dtype,
    llm_quantization_config,
    quantize_in_place,
    quantized_layers,
    quiet_bitsandbytes,
    resolve_backend,
    uncompilable_reason,
    unrecordable_reason,
)
from .memory import MemoryEstimate, Placement, choose_placement, estimate_for, estimate_memory, placements
from .spec import BACKENDS, MODES, QuantizationError, QuantSpec

__all__ = [
    "QuantSpec",
    "QuantizationError",
    "MissingBackendError",
    "llm_quantization_config",
    "llm_dtype",
    "quantize_in_place",
    "quantized_layers",
    "quiet_bitsandbytes",
    "resolve_backend",
    "uncompilable_reason",
    "unrecordable_reason",
    "MemoryEstimate",
    "estimate_memory",
    "estimate_for",
    "Placement",
    "placements",
    "choose_placement",
    "MODES",
    "BACKENDS",
]
