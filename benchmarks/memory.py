"""Memory figures: host RSS (now and peak), GPU peaks, and the bytes a (quantised) model really holds."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

GB = 10**9


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; psutil elsewhere when installed)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        import psutil  # pragma: no cover - not Linux

        return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The highest RSS this process has had (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True)
class GpuPeak:
    """torch.cuda's peak allocated and reserved bytes since the last reset."""

    allocated: int
    reserved: int

    @classmethod
    def read(cls, device: "torch.device") -> "GpuPeak | None":
        import torch

        if device.type != "cuda":
            return None
        torch.cuda.synchronize(device)
        return cls(torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))

    @staticmethod
    def reset(device: "torch.device") -> None:
        import torch

        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)


def tensor_bytes(tensor: "torch.Tensor") -> int:
    """Bytes behind a tensor, quantised ones included.

    quanto's QTensors are wrapper subclasses whose data lives in inner tensors (`__tensor_flatten__`);
    bitsandbytes keeps NF4 scales in `quant_state` and LLM.int8 row scales in `SCB`.
    """
    import torch

    if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:  # NF4: absmax (and, double-quantised, its own absmax and code)
        for part in (state.absmax, getattr(state, "state2", None) and state.state2.absmax, state.code):
            total += 0 if part is None else part.numel() * part.element_size()
    scales = getattr(tensor, "SCB", None)
    if scales is not None:
        total += scales.numel() * scales.element_size()
    return total


def module_bytes(module: "nn.Module") -> int:
    """Bytes of every distinct parameter and buffer of `module` (a tied tensor counts once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total
