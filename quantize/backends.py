"""Backends: apply a QuantSpec to an LLM — bitsandbytes while `from_pretrained` loads, optimum-quanto and torchao
after.

bitsandbytes replaces Linear layers as the weights are read (`llm_quantization_config`), so its spec must be known
before loading. optimum-quanto and torchao quantise a loaded model in place (`quantize_in_place`), which lets the
caller wrap the model with LoRA first and keep the adapter in full precision (peft refuses to wrap a torchao int4
layer, but a wrapped layer's base can be quantised under it: peft's forward only calls it). Call both; each does
nothing for the other backends.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import logging
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .memory import release_freed_memory
from .spec import QuantizationError, QuantSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

_INSTALL = {
    "bitsandbytes": "pip install bitsandbytes",
    "quanto": "pip install optimum-quanto",
    "torchao": "pip install torchao",
}
_MODULE = {"bitsandbytes": "bitsandbytes", "quanto": "optimum.quanto", "torchao": "torchao"}

# torchao int4 weight-only through tinygemm (`_weight_int4pack_mm`): group size 128 as gpt-fast and torchao's
# published figures use; the kernel needs in_features a multiple of the group and out_features of 8, bfloat16
# weights, and a GPU of compute capability 8.0 or later. torchao 0.18 runs its int4 nowhere else (no CPU path).
TINYGEMM_GROUP = 128
_TORCHAO_CUDA_ONLY = (
    "torchao's int4/int8 kernels run on CUDA only here (on CPU torchao 0.18 has no int4 and its int8 is ~10x"
    " slower than bfloat16): use --quant-backend quanto"
)
_TINYGEMM_OUT_MULTIPLE = 8
_TINYGEMM_MIN_CAPABILITY = (8, 0)

# bitsandbytes' CPU 4-bit kernel repacks a weight for AVX512-BF16 only when it is a whole number of these blocks;
# for any other shape it asserts (bitsandbytes 0.50), so such layers must take the plain dequantise path.
_BNB_CPU_PACK_ROWS = 32


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


@functools.lru_cache(maxsize=None)
def torchao_ready() -> bool:
    """torchao is installed and this machine's GPU takes tinygemm's int4 kernel (what `auto` picks torchao for)."""
    if importlib.util.find_spec("torchao") is None:
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= _TINYGEMM_MIN_CAPABILITY


def resolve_backend(spec: QuantSpec | str | None, device_type: str) -> str | None:
    """The backend that will quantise on `device_type`, checked to be installed; None for full precision."""
    spec = QuantSpec.parse(spec)
    if not spec.enabled:
        return None
    backend = spec.backend_for(device_type)
    if backend == "torchao" and device_type != "cuda":
        raise QuantizationError(_TORCHAO_CUDA_ONLY)  # before the install check: installing would not help
    _require(backend)
    return backend


def llm_dtype(spec: QuantSpec | str | None, device_type: str, dtype: "torch.dtype") -> "torch.dtype":
    """The torch dtype to load the LLM in under `spec` (the rule and its reasons: `memory.llm_run_dtype`)."""
    import torch

    from .memory import llm_run_dtype

    spec = QuantSpec.parse(spec)
    backend = spec.backend_for(device_type) if spec.enabled else "none"
    name = str(dtype).removeprefix("torch.")
    return getattr(torch, llm_run_dtype(spec.mode, backend, device_type, name))


def llm_quantization_config(spec: QuantSpec | str | None, device_type: str, compute_dtype=None):
    """The `quantization_config` for `from_pretrained`, or None (full precision, or a backend applied later).

    bitsandbytes: 4bit = NF4 with double quantisation and `compute_dtype` math (fp16 default; pass float32 on
    CPU); 8bit = LLM.int8. optimum-quanto returns None here — see `quantize_in_place` — but is still checked to
    be installed, so a missing library fails before anything heavy is loaded.
    """
    quiet_bitsandbytes()  # even at full precision: peft imports bitsandbytes whenever it is installed
    backend = resolve_backend(spec, device_type)
    if backend != "bitsandbytes":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    spec = QuantSpec.parse(spec)
    if spec.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float16,
    )


def quantize_in_place(
    model: "nn.Module", spec: QuantSpec | str | None, device_type: str, *, exclude: Sequence[str] = ()
) -> "nn.Module":
    """Finish quantising a loaded `model` under `spec`; returns it.

    quanto: every `nn.Linear` whose qualified name matches none of the `exclude` shell patterns becomes a frozen
    quanto QLinear (int8 or int4 weights); torchao: the same layers get int4 (tinygemm) or int8 weight-only
    tensors, on CUDA only. bitsandbytes (already applied by `from_pretrained`): on CPU, layers
    whose shape the packed kernel cannot take are steered to the generic path. Full precision: nothing.
    """
    backend = resolve_backend(spec, device_type)
    if backend == "bitsandbytes" and device_type == "cpu":
        _bitsandbytes_cpu_shapes(model)
    elif backend == "quanto":
        _quanto(model, QuantSpec.parse(spec).mode, list(exclude))
    elif backend == "torchao":
        _torchao(model, QuantSpec.parse(spec).mode, list(exclude), device_type)
    return model


def quantized_layers(model: "nn.Module") -> list["nn.Module"]:
    """The layers of `model` that hold quantised weights (bitsandbytes Linear4bit/Linear8bitLt, quanto QLinear,
    a Linear whose weight is a torchao tensor)."""
    found = []
    for module in model.modules():
        name = type(module).__name__
        if name in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith("bitsandbytes"):
            found.append(module)
        elif type(module).__module__.startswith("optimum.quanto") and name == "QLinear":
            found.append(module)
        elif type(getattr(module, "weight", None)).__module__.startswith("torchao"):
            found.append(module)
    return found


def unrecordable_reason(model: "nn.Module") -> str | None:
    """Why a decode step over `model` cannot be recorded as a CUDA graph, or None when it can.

    LLM.int8 with an outlier threshold (bitsandbytes' and transformers' default, 6.0) asks on every matmul whether
    any input column is an outlier (`if outliers.any(): torch.argwhere(...)` in bitsandbytes 0.50's
    `int8_vectorwise_quant`): a host read, which a recording stream refuses, and a branch a graph would freeze.
    """
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes"):
            if getattr(module.state, "threshold", 0.0) > 0:
                return "LLM.int8 (bitsandbytes 8-bit) reads its outliers back to the host on every matmul"
    return None


def uncompilable_reason(model: "nn.Module") -> str | None:
    """Why a decode step over `model` cannot be compiled into one graph, or None when it can: LLM.int8's outlier
    split has data-dependent shapes, and quanto's int4 layers step out of inference mode (`_outside_inference_mode`),
    which torch.compile cannot trace."""
    reason = unrecordable_reason(model)
    if reason is not None:
        return reason
    for module in model.modules():
        if getattr(module.forward, "__func__", None) is _outside_inference_mode:
            return "quanto int4 layers run outside inference mode, which torch.compile cannot trace"
    return None


# -- bitsandbytes ---------------------------------------------------------------------------------------------
class _DropMessages(logging.Filter):
    """Drops bitsandbytes log lines that say nothing a user can act on."""

    PREFIXES = (
        "MatMul8bitLt: inputs will be cast",  # logged on EVERY int8 matmul whose input is not fp16 (all of CPU)
        "Failed to load CPU gemm_4bit_forward",  # an optional download from the Hub; we run offline
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


_DROP = _DropMessages()


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' log lines that say nothing a user can act on, and import it without its Hub kernel; call
    it before peft imports bitsandbytes."""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if _DROP not in logger.filters:
            logger.addFilter(_DROP)
    _import_bitsandbytes_without_hub_kernels()


def _import_bitsandbytes_without_hub_kernels() -> None:
    """Import bitsandbytes (where installed) with the `kernels` package out of its reach.

    Why: on a CPU with AVX512-BF16, bitsandbytes 0.50 asks `kernels.get_kernel` at import time for a 4-bit kernel
    from the Hub, which sends requests (offline runs included: it reads huggingface_hub's offline flag, not ours)
    and would run code fetched from there. `kernels` arrives with transformers >= 5.2x. Hidden, the import fails
    inside bitsandbytes' own try, and it keeps its built-in CPU kernel, as on machines without `kernels`.
    """
    import importlib.util
    import sys

    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    hidden = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # type: ignore[assignment]  # `from kernels import ...` raises ImportError
    try:
        import bitsandbytes  # noqa: F401
    finally:
        if hidden is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden


def _bitsandbytes_cpu_shapes(model: "nn.Module") -> None:
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            blocksize = module.weight.quant_state.blocksize
            if module.out_features % _BNB_CPU_PACK_ROWS or module.in_features % blocksize:
                module.support_avx512bf16_for_cpu = False


# -- optimum-quanto -------------------------------------------------------------------------------------------
def _quanto(model: "nn.Module", mode: str, exclude: list[str]) -> None:
    from optimum.quanto import QLinear, qint4, qint8, quantize
    from optimum.quanto.nn import QModuleMixin

    unsafe = [name for name, module in model.named_modules() if _int8pack_unsafe(module, mode)]
    quantize(model, weights=qint8 if mode == "8bit" else qint4, exclude=exclude + unsafe or None)
    for module in model.modules():
        if not isinstance(module, QModuleMixin):
            continue
        # what `freeze(model)` does, one layer at a time: quantise the weight now and drop the float copy, then
        # hand quanto's temporaries back to the OS before the next layer makes its own
        module.freeze()
        release_freed_memory()
        if isinstance(module, QLinear) and type(module.weight).__name__ == "WeightQBitsTensor":
            # optimum-quanto 0.2.7: its generic int4 weight cannot be used under torch.inference_mode ("Cannot set
            # version_counter for inference tensor"), which generation uses; step out of it for this one matmul.
            module.forward = types.MethodType(_outside_inference_mode, module)
    model.requires_grad_(False)


def _int8pack_unsafe(module: "nn.Module", mode: str) -> bool:
    """A bfloat16 Linear that quanto int8 would send to torch's int8pack kernel with a shape it mishandles.

    torch 2.13's CPU `_weight_int8pack_mm` crashes (a dimension of 172) or returns wrong values (200, 24 or 8)
    unless both in_features and out_features are multiples of 16; published LLaMA shapes all are, tiny test models
    need not be.
    """
    import torch

    return (
        mode == "8bit"
        and isinstance(module, torch.nn.Linear)
        and module.weight.dtype == torch.bfloat16
        and module.weight.device.type == "cpu"
        and (module.in_features % 16 != 0 or module.out_features % 16 != 0)
    )


def _outside_inference_mode(self, input: "torch.Tensor") -> "torch.Tensor":
    """quanto's QLinear.forward, out of inference mode (see `_quanto`)."""
    import torch
    from optimum.quanto import QLinear

    if not torch.is_inference_mode_enabled():
        return QLinear.forward(self, input)
    with torch.inference_mode(False), torch.no_grad():
        return QLinear.forward(self, input)


# -- torchao --------------------------------------------------------------------------------------------------
def _torchao(model: "nn.Module", mode: str, exclude: list[str], device_type: str) -> None:
    import torch

    if device_type != "cuda":
        raise QuantizationError(_TORCHAO_CUDA_ONLY)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if mode == "4bit":
        if torch.cuda.get_device_capability() < _TINYGEMM_MIN_CAPABILITY:
            raise QuantizationError(
                "torchao int4 (tinygemm) needs a GPU of compute capability 8.0 or later: use --quant-backend"
                " bitsandbytes"
            )
        # tile_packed_to_4d is tinygemm's layout; torchao's default formats need the mslk package
        config = Int4WeightOnlyConfig(group_size=TINYGEMM_GROUP, int4_packing_format="tile_packed_to_4d")
    else:
        config = Int8WeightOnlyConfig()

    def wanted(module: "nn.Module", name: str) -> bool:
        if not isinstance(module, torch.nn.Linear) or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            return False
        if mode == "4bit":  # a shape tinygemm cannot take stays in bfloat16 (tiny test models; no published LLaMA)
            return module.in_features % TINYGEMM_GROUP == 0 and module.out_features % _TINYGEMM_OUT_MULTIPLE == 0
        return True

    quantize_(model, config, filter_fn=wanted)
    model.requires_grad_(False)
