"""Backends: turn a QuantSpec into the transformers quantisation config that `from_pretrained` applies."""

from __future__ import annotations

import importlib.util

from .spec import QuantizationError, QuantSpec

_INSTALL = {
    "bitsandbytes": "pip install bitsandbytes",
    "quanto": "pip install optimum-quanto",
}
_MODULE = {"bitsandbytes": "bitsandbytes", "quanto": "optimum.quanto"}


class MissingBackendError(QuantizationError):
    """The library a backend needs is not installed."""


def _require(backend: str) -> None:
    module = _MODULE[backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (optimum) is missing
        found = False
    if not found:
        raise MissingBackendError(
            f"{backend} quantisation needs the {module.split('.')[0]} package: {_INSTALL[backend]}"
        )


def llm_quantization_config(spec: QuantSpec | str | None, device_type: str, compute_dtype=None):
    """The `quantization_config` for `from_pretrained`, or None for full precision.

    bitsandbytes: 4bit = NF4 with double quantisation and `compute_dtype` (fp16 default) math; 8bit = LLM.int8.
    quanto: int4 / int8 weights.
    """
    spec = QuantSpec.parse(spec)
    if not spec.enabled:
        return None
    backend = spec.backend_for(device_type)
    _require(backend)
    if backend == "bitsandbytes":
        import torch
        from transformers import BitsAndBytesConfig

        if spec.mode == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or torch.float16,
        )
    from transformers import QuantoConfig

    return QuantoConfig(weights="int8" if spec.mode == "8bit" else "int4")
