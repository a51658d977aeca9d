"""What to quantise the LLM to, and with which library. Knows nothing about audio."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["none", "8bit", "4bit"]
Backend = Literal["auto", "bitsandbytes", "quanto", "torchao"]
MODES: tuple[str, ...] = ("none", "8bit", "4bit")
BACKENDS: tuple[str, ...] = ("auto", "bitsandbytes", "quanto", "torchao")
APPLIED_AFTER_LOADING: tuple[str, ...] = ("quanto", "torchao")  # quantise a loaded layer; bitsandbytes loads quantised


class QuantizationError(ValueError):
    """A quantisation spec that cannot be honoured (bad name, or a backend missing for this device)."""


@dataclass(frozen=True)
class QuantSpec:
    """LLM weight quantisation applied at load time. The audio encoders are never quantised.

    `backend="auto"` (`backend_for`): on CUDA, torchao where it is installed and the GPU has tinygemm's int4 kernel
    (compute capability 8.0 and up), else bitsandbytes; optimum-quanto on CPU and Apple MPS, where its int4/int8
    kernels are several times faster than bitsandbytes'. Why torchao first on CUDA: the published batch-1 decode
    figures (research/gpu_decode.md: int4 tinygemm ~200 tok/s for 7-8B against ~30 for bitsandbytes NF4 through
    eager transformers); bitsandbytes stays for QLoRA training, older GPUs and LLM.int8's original numerics.
    """

    mode: Mode = "none"
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QuantizationError(f"unknown quantisation {self.mode!r}: use one of {', '.join(MODES)}")
        if self.backend not in BACKENDS:
            raise QuantizationError(f"unknown quantisation backend {self.backend!r}: use one of {', '.join(BACKENDS)}")

    @classmethod
    def parse(cls, value: "QuantSpec | str | None", backend: str = "auto") -> "QuantSpec":
        """`None`, "none", "8bit", "4bit" (also "int8", "int4", "nf4") or a QuantSpec."""
        if isinstance(value, QuantSpec):
            return value
        aliases = {None: "none", "": "none", "int8": "8bit", "int4": "4bit", "nf4": "4bit"}
        name = aliases.get(value, value)
        return cls(mode=str(name).lower(), backend=backend)  # type: ignore[arg-type]

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def backend_for(self, device_type: str, *, torchao_ready: bool | None = None, compiled: bool = False) -> str:
        """The library that quantises on `device_type` ("cuda", "cpu", "mps").

        `torchao_ready`: torchao is installed and the GPU takes its int4 kernel (default: asked of this machine).
        `compiled`: the decode step will be compiled. torchao's int8 weight-only layer converts its whole weight to
        the activations' dtype on every call (`w.t().to(dtype)` in torchao 0.18): 5 bytes moved per parameter, more
        than float16's 2, unless compilation fuses the conversion into the matmul; so 8-bit is torchao's only then.
        """
        if self.backend != "auto":
            return self.backend
        if device_type != "cuda":
            return "quanto"
        if self.mode == "8bit" and not compiled:
            return "bitsandbytes"
        if torchao_ready is None:
            from .backends import torchao_ready as ready

            torchao_ready = ready()
        return "torchao" if torchao_ready else "bitsandbytes"

    def applied_after_loading(self, device_type: str) -> bool:
        """Quantised layer by layer once loaded (quanto, torchao), not by `from_pretrained` (bitsandbytes)."""
        return self.enabled and self.backend_for(device_type) in APPLIED_AFTER_LOADING
