"""`--quant` / `--quant-backend` -> the QuantSpec to load with (`auto` decides from the memory there is)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from quantize import QuantSpec

    from ..model_file import ModelSpec


@dataclass(frozen=True)
class QuantChoice:
    """The quantisation chosen for a run and the backend that will apply it."""

    spec: QuantSpec
    backend: str

    def describe(self) -> str:
        if not self.spec.enabled:
            return "none"
        return f"{self.spec.mode} ({self.backend})"


def pick_quantization(quant: str, backend: str, model_spec: ModelSpec, device) -> QuantChoice:
    """Resolve `auto` from free GPU memory (CUDA) or host memory (CPU) and the model's size; validate the rest."""
    from quantize import MODES, QuantizationError, QuantSpec

    if quant != "auto" and quant not in MODES:
        raise UsageError(f"--quant must be auto, {', '.join(MODES)}; got {quant!r}")
    mode = _auto_mode(model_spec, device) if quant == "auto" else quant
    try:
        chosen = QuantSpec.parse(mode, backend=backend)
    except QuantizationError as exc:
        raise UsageError(str(exc)) from None
    return QuantChoice(chosen, chosen.backend_for(device.type))


def _auto_mode(model_spec: ModelSpec, device) -> str:
    from quantize.memory import available_host_bytes, choose_cpu_mode, choose_mode

    sizes = model_spec.sizes
    if device.type == "cuda":
        import torch

        free_bytes, _ = torch.cuda.mem_get_info(device)
        return choose_mode(free_bytes, sizes.llm_params, sizes.encoder_params)
    return choose_cpu_mode(available_host_bytes(), sizes.llm_params, sizes.encoder_params)
