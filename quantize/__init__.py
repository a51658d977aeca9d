"""LLM weight quantisation: a spec (none | 8bit | 4bit) and its backends (bitsandbytes, optimum-quanto).

Imports nothing heavy: torch and transformers load only when a config is built.
"""

from .backends import MissingBackendError, llm_quantization_config
from .spec import BACKENDS, MODES, QuantizationError, QuantSpec

__all__ = ["QuantSpec", "QuantizationError", "MissingBackendError", "llm_quantization_config", "MODES", "BACKENDS"]
