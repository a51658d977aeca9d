"""What to quantise the LLM to, and with which library. Knows nothing about audio."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["none", "8bit", "4bit"]
Backend = Literal["auto", "bitsandbytes", "quanto"]
MODES: tuple[str, ...] = ("none", "8bit", "4bit")
BACKENDS: tuple[str, ...] = ("auto", "bitsandbytes", "quanto")


class QuantizationError(ValueError):
    """A quantisation spec that cannot be honoured (bad name, or a backend missing for this device)."""


@dataclass(frozen=True)
class QuantSpec:
    """LLM weight quantisation applied at load time. The audio encoders are never quantised.

    `backend="auto"` picks bitsandbytes on CUDA (NF4 with double quant / LLM.int8, the QLoRA standard) and
    optimum-quanto on CPU and Apple MPS, where its int4/int8 kernels are several times faster than bitsandbytes.
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

    def backend_for(self, device_type: str) -> str:
        """The library that quantises on `device_type` ("cuda", "cpu", "mps")."""
        if self.backend != "auto":
            return self.backend
        return "bitsandbytes" if device_type == "cuda" else "quanto"
