"""`--quant` / `--quant-backend` / `--dtype` -> how the model is loaded, checked against the memory there is.

`auto` picks from free GPU memory (CUDA) or available host memory (CPU); an explicit mode whose estimate does
not fit is refused here, before anything loads, with what would fit. The estimate is `quantize.memory`'s, the
same that `doctor`, `models` and the benchmark print.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantize.memory import GIB

from ..errors import OutOfMemoryError, UsageError

if TYPE_CHECKING:
    from quantize import QuantSpec
    from quantize.memory import Placement

    from ..model_file import ModelSpec


@dataclass(frozen=True)
class QuantChoice:
    """The quantisation chosen for a run, the backend that will apply it and the dtypes it runs in."""

    spec: QuantSpec
    backend: str
    placement: Placement

    def describe(self) -> str:
        """`none` or `4bit (quanto)`: the `quantization` of a result record."""
        return "none" if not self.spec.enabled else f"{self.spec.mode} ({self.backend})"

    @property
    def dtype(self) -> str:
        """The encoders' dtype (and an unquantised LLM's); quantised LLMs may run in another (`placement`)."""
        return self.placement.dtype


@dataclass(frozen=True)
class MemoryBudget:
    """What a model may take on the device it runs on: free GPU memory, or available host memory."""

    bytes: int
    source: str  # "free GPU memory" | "available host memory"


def memory_budget(device) -> MemoryBudget:
    """The budget `--quant auto` and `doctor` measure against: `device` (a torch.device, or "cuda" for the
    current GPU) has its free memory; a CPU, the host's available memory."""
    from quantize.memory import available_host_bytes

    if str(device).startswith("cuda"):
        import torch

        free_bytes, _ = torch.cuda.mem_get_info(device if str(device) != "cuda" else None)
        return MemoryBudget(free_bytes, "free GPU memory")
    return MemoryBudget(available_host_bytes(), "available host memory")


def pick_quantization(quant: str, backend: str, model_spec: ModelSpec, device, dtype: str = "auto", *,
                      compiled: bool = False) -> QuantChoice:  # fmt: skip
    """Resolve `auto` from the memory there is and the model's size; validate the rest; refuse what cannot fit.
    `compiled`: the decode step will be compiled, which decides the 8-bit library on CUDA (QuantSpec.backend_for)."""
    from quantize import MODES, QuantizationError, QuantSpec
    from quantize.memory import choose_placement, placements

    if quant != "auto" and quant not in MODES:
        raise UsageError(f"--quant must be auto, {', '.join(MODES)}; got {quant!r}")
    try:
        candidates = placements(device.type, dtype, backend, compiled=compiled)
    except QuantizationError as exc:
        raise UsageError(str(exc)) from None
    sizes = model_spec.sizes
    budget = memory_budget(device)
    if quant == "auto":
        usable, missing = _installed(candidates)
        placement = choose_placement(budget.bytes, sizes.llm_params, sizes.encoder_params, usable)
        _warn_if_auto_fell_short(model_spec, placement, candidates[0], missing, budget)
    else:
        placement = next(p for p in candidates if p.mode == quant)
        _refuse_if_it_cannot_fit(model_spec, placement, candidates, budget)
    try:
        # the library resolved here (with what is known of compiling) is the one loading uses
        chosen = QuantSpec.parse(placement.mode, backend=placement.backend if placement.mode != "none" else backend)
    except QuantizationError as exc:
        raise UsageError(str(exc)) from None
    return QuantChoice(chosen, chosen.backend_for(device.type), placement)


def _installed(candidates: list[Placement]) -> tuple[list[Placement], dict[Placement, str]]:
    """(the candidates whose quantisation library is installed, the others with what to install). A backend that
    cannot run here at all (torchao on a CPU) is the user's error, as for an explicit mode."""
    from quantize import MissingBackendError, QuantizationError, QuantSpec, resolve_backend

    usable, missing = [], {}
    for placement in candidates:
        if placement.mode == "none":
            usable.append(placement)
            continue
        try:
            resolve_backend(QuantSpec(placement.mode, placement.backend), placement.device_type)
        except MissingBackendError as exc:
            missing[placement] = str(exc)
            continue
        except QuantizationError as exc:
            raise UsageError(str(exc)) from None
        usable.append(placement)
    return usable, missing


def _warn_if_auto_fell_short(model_spec: ModelSpec, placement: Placement, preferred: Placement,
                             missing: dict[Placement, str], budget: MemoryBudget) -> None:  # fmt: skip
    """Say so when `auto` took less than its first choice for want of a library, or took what may not fit."""
    from quantize.memory import estimate_for

    from .runner import warn

    if preferred in missing:
        warn(f"--quant auto would run {preferred.describe()} here: {missing[preferred]}")
    needed = estimate_for(model_spec.sizes.llm_params, model_spec.sizes.encoder_params, placement).total_bytes
    if needed > budget.bytes:
        warn(f"{model_spec.name} may not fit: {placement.describe()} needs ~{needed / GIB:.1f} GiB, and "
             f"{budget.source} is {budget.bytes / GIB:.1f} GiB")  # fmt: skip


def _refuse_if_it_cannot_fit(model_spec: ModelSpec, placement: Placement, candidates: list[Placement],
                             budget: MemoryBudget) -> None:  # fmt: skip
    """An OutOfMemoryError (exit 6) naming what would fit, when `placement`'s estimate exceeds the whole budget."""
    from quantize.memory import estimate_for, placements

    sizes = model_spec.sizes

    def gib(p: Placement) -> float:
        return estimate_for(sizes.llm_params, sizes.encoder_params, p).total_bytes / GIB

    if gib(placement) * GIB <= budget.bytes:
        return
    others = candidates + [p for p in placements(placement.device_type, "bfloat16") if p.dtype != placement.dtype]
    fitting = [p for p in others if p != placement and gib(p) * GIB <= budget.bytes]
    hint = ("; ".join(f"{_flags(p, placement)} (~{gib(p):.1f} GiB) fits" for p in fitting[:2])
            or "no mode fits: try a smaller model (--model salmonn-7b) or free some memory")  # fmt: skip
    raise OutOfMemoryError(
        f"{model_spec.name} with {placement.describe()} needs ~{gib(placement):.1f} GiB, and {budget.source} is "
        f"{budget.bytes / GIB:.1f} GiB: {hint}"
    )


def _flags(p: Placement, asked: Placement) -> str:
    """The options that give placement `p` where `asked` was asked for."""
    flags = [f"--quant {p.mode}"]
    if p.dtype != asked.dtype:
        flags.append(f"--dtype {p.dtype}")
    return " ".join(flags)
