"""How much memory a model needs under each quantisation, and which mode `--quant auto` picks.

One estimate (`estimate_for` a `Placement`: device, dtypes, mode, library) shared by `doctor`, `models`,
`--quant auto`, the refusal of a mode that cannot fit and the benchmark, so what they print and choose agree.
Calibrated against the published weight sizes: Vicuna-13B fp16 26 GB, LLM.int8 13.3 GB, NF4 ~7.2 GB;
Vicuna-7B 13.5 / 7.0 / ~3.9 GB (GB = 10^9 bytes). Pure arithmetic: imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import APPLIED_AFTER_LOADING, MODES, QuantizationError, QuantSpec

GIB = 1024**3
LLAMA_VOCAB = 32_000
LLAMA_HEAD_RATIO = 128  # LLaMA widths are 128 x depth (7B: 4096 wide, 32 layers; 13B: 5120, 40)
NF4_BITS = 4 + 0.127  # double quantisation: 8-bit scale per 64 weights + fp32 scale per 256 scales
GROUP128_INT4_BITS = 4 + 2 * 16 / 128  # quanto's and torchao's int4: a bf16 scale and shift per 128 weights
LLAMA_BLOCK_PARAMS_PER_HIDDEN2 = 12  # a LLaMA decoder layer holds ~12 h^2 parameters (attention 4 h^2, MLP ~8 h^2)
INT8_ROW_SCALE_BYTES = 4  # LLM.int8 keeps one fp32 scale per output row; no more than a rounding error
RUNTIME_BYTES = GIB // 2  # CUDA context / torch runtime, whatever the model
ACTIVATION_SHARE = 0.05  # activations and allocator slack, as a share of the weights


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one loaded model needs: the LLM's weights, the encoders, the KV cache and the rest."""

    mode: str
    weights_bytes: int  # the LLM under `mode` (embeddings and lm_head stay full precision)
    encoders_bytes: int  # Whisper encoder + BEATs + Q-Former, never quantised
    kv_cache_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.encoders_bytes + self.kv_cache_bytes + self.overhead_bytes

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB


def llama_shape(llm_params: int, vocab: int = LLAMA_VOCAB) -> tuple[int, int]:
    """(hidden, layers) of a LLaMA with `llm_params` parameters, when the config is not at hand.

    A LLaMA block holds ~12 h^2 parameters and the depth is h / 128, so params ~ 12 h^3 / 128 + 2 V h.
    """
    hidden = 1.0
    for _ in range(20):  # fixed point; converges in a few steps
        hidden = max(64.0, (max(llm_params - 2 * vocab * hidden, 1) * LLAMA_HEAD_RATIO / 12) ** (1 / 3))
    hidden_int = max(64, round(hidden / 128) * 128)
    return hidden_int, max(1, round(hidden_int / LLAMA_HEAD_RATIO))


def llm_weight_bytes(llm_params: int, mode: str, *, hidden: int, vocab: int = LLAMA_VOCAB, full: int = 2,
                     int4_bits: float = NF4_BITS) -> int:  # fmt: skip
    """The LLM's weights under `mode`; `full` = bytes of an unquantised parameter (2 fp16/bf16, 4 fp32);
    `int4_bits`: bits per 4-bit weight, scales included (bitsandbytes' NF4 by default)."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantisation {mode!r}: use one of {', '.join(MODES)}")
    if mode == "none":
        return llm_params * full
    embeddings = min(2 * vocab * hidden, llm_params)  # token table + lm_head: neither backend quantises them
    body = llm_params - embeddings
    if mode == "8bit":
        rows = body // hidden  # one scale per output row, counting each matrix as (rows, hidden)
        return embeddings * full + body + rows * INT8_ROW_SCALE_BYTES
    return embeddings * full + round(body * int4_bits / 8)


def estimate_memory(
    llm_params: int,
    encoder_params: int,
    mode: str,
    *,
    context_tokens: int = 2048,
    hidden: int | None = None,
    layers: int | None = None,
    vocab: int = LLAMA_VOCAB,
    full_bytes: int = 2,
    encoder_bytes: int | None = None,
    int4_bits: float = NF4_BITS,
    layer_transient: bool = False,
) -> MemoryEstimate:
    """Memory for one model under `mode` ("none" | "8bit" | "4bit") on a GPU (fp16; `full_bytes=4` for fp32 CPU).

    full_bytes: bytes per unquantised LLM parameter and cache entry; encoder_bytes: per encoder parameter
    (default the same).
    context_tokens: positions held in the KV cache, summed over beams (4 beams x ~300 tokens for a 30 s clip
    with the original decoding, with room to spare). hidden/layers default to a LLaMA of that size.
    layer_transient: the loader holds one decoder layer at full precision while it quantises it (quanto and
    torchao quantise each layer as it arrives); counted so that loading never grows past the estimate.
    """
    guess_hidden, guess_layers = llama_shape(llm_params, vocab)
    hidden = hidden or guess_hidden
    layers = layers or guess_layers
    weights = llm_weight_bytes(llm_params, mode, hidden=hidden, vocab=vocab, full=full_bytes, int4_bits=int4_bits)
    encoders = encoder_params * (encoder_bytes or full_bytes)
    kv_cache = 2 * layers * hidden * context_tokens * full_bytes  # K and V, every layer, every position
    overhead = RUNTIME_BYTES + round(ACTIVATION_SHARE * (weights + encoders))
    if layer_transient and mode != "none":
        overhead += LLAMA_BLOCK_PARAMS_PER_HIDDEN2 * hidden * hidden * full_bytes
    return MemoryEstimate(mode, weights, encoders, kv_cache, overhead)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPES: tuple[str, ...] = ("auto", *DTYPE_BYTES)
CPU_DTYPE = "float32"  # `--dtype auto` on a CPU: the reference-parity dtype (see the README's CPU table)
AUTO_MARGIN = 0.10  # `--quant auto` leaves this share of the budget free; an explicit mode is refused only past it all


def resolve_dtype(dtype: str, device_type: str) -> str:
    """`--dtype`'s value -> the dtype the encoders (and an unquantised LLM) run in: auto = float16 on CUDA,
    CPU_DTYPE elsewhere."""
    if dtype not in DTYPES:
        raise QuantizationError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    return "float16" if device_type == "cuda" else CPU_DTYPE


def llm_run_dtype(mode: str, backend: str, device_type: str, dtype: str) -> str:
    """The dtype the LLM runs in: `dtype`, except quanto on CPU and torchao int4, which run in bfloat16.

    Why: quanto's fast CPU kernels take bfloat16 activations only (TinyGemm for int4, torch's int8pack matmul for
    int8); with float32 every weight is dequantised on every call. Measured on 2 cores: int4 1.6 vs 6.5 tok/s on a
    0.2 B LLaMA; int8 0.06 vs 3.10 tok/s on the 7B shape (`scripts/bench.py`). torchao's tinygemm packs bfloat16.
    """
    if mode != "none" and backend == "quanto" and device_type == "cpu":
        return "bfloat16" if dtype == "float32" else dtype
    if mode == "4bit" and backend == "torchao":
        return "bfloat16"
    return dtype


@dataclass(frozen=True)
class Placement:
    """How a model is to run: the kind of device, the dtype of the encoders (and of an unquantised LLM), and the
    LLM's quantisation with the library that applies it ("none" when unquantised)."""

    device_type: str
    dtype: str
    mode: str = "none"
    backend: str = "none"
    llm: str | None = None  # the LLM's dtype when set apart from the rule (the benchmark's --llm-dtype)

    @property
    def llm_dtype(self) -> str:
        return self.llm or llm_run_dtype(self.mode, self.backend, self.device_type, self.dtype)

    def describe(self) -> str:
        """`--quant 4bit (quanto; LLM in bfloat16, encoders in float32)`: what the estimate is of."""
        quant = "--quant none" if self.mode == "none" else f"--quant {self.mode} ({self.backend})"
        if self.llm_dtype == self.dtype:
            return f"{quant} in {self.dtype}"
        return f"{quant}, the LLM in {self.llm_dtype} and the encoders in {self.dtype}"


# `--quant auto`'s order of preference. On a GPU: the most precise mode that fits. On a CPU, the README's rule
# on its table (the 7B shape measured in one run; cosines from benchmarks/precision.py): the fastest mode whose
# first-step logits keep a cosine of at least CPU_MIN_COSINE to float32's on every reference case, else the fastest
# that fits. quanto int8 (0.99993 or more) decodes faster than a bfloat16 or float32 LLM at real sizes, where a step
# reads every weight; int4 is faster still but gives up more (0.987-0.992), so it is taken only when int8 cannot fit.
CPU_MIN_COSINE = 0.9999
AUTO_ORDER = {"cuda": MODES, "cpu": ("8bit", "none", "4bit")}


def placements(device_type: str, dtype: str = "auto", backend: str = "auto", *, compiled: bool = False
               ) -> list[Placement]:  # fmt: skip
    """Every mode as it would run on `device_type` with `--dtype dtype --quant-backend backend`, in `--quant
    auto`'s order of preference; `compiled`: the decode step will be compiled (QuantSpec.backend_for)."""
    resolved = resolve_dtype(dtype, device_type)
    found = []
    for mode in AUTO_ORDER.get(device_type, AUTO_ORDER["cpu"]):
        library = QuantSpec(mode, backend).backend_for(device_type, compiled=compiled) if mode != "none" else "none"
        found.append(Placement(device_type, resolved, mode, library))
    return found


def estimate_for(llm_params: int, encoder_params: int, placement: Placement, **shape_kwargs) -> MemoryEstimate:
    """The memory of one model run as `placement` says: the one estimate doctor, models, `--quant auto`, the
    refusal of a mode that cannot fit, and the benchmark all use. `shape_kwargs`: context_tokens, hidden,
    layers, vocab (see estimate_memory)."""
    after_loading = placement.backend in APPLIED_AFTER_LOADING  # quanto, torchao: group-128 int4, layer by layer
    return estimate_memory(llm_params, encoder_params, placement.mode, full_bytes=DTYPE_BYTES[placement.llm_dtype],
                           encoder_bytes=DTYPE_BYTES[placement.dtype],
                           int4_bits=GROUP128_INT4_BITS if after_loading else NF4_BITS,
                           layer_transient=after_loading, **shape_kwargs)  # fmt: skip


def choose_placement(
    budget_bytes: int, llm_params: int, encoder_params: int, candidates: list[Placement], **shape_kwargs
) -> Placement:
    """`--quant auto`: the first of `candidates` (in order of preference) whose estimate, plus AUTO_MARGIN, fits in
    `budget_bytes`; the last (the smallest) when none does, and the caller warns that it may not fit."""
    for placement in candidates:
        needed = estimate_for(llm_params, encoder_params, placement, **shape_kwargs).total_bytes
        if needed * (1 + AUTO_MARGIN) <= budget_bytes:
            return placement
    return candidates[-1]


def available_host_bytes() -> int:
    """Host memory a new allocation can use: MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def release_freed_memory() -> None:
    """Hand memory freed on the host back to the OS (glibc `malloc_trim`; elsewhere nothing).

    Why: glibc raises its mmap threshold after a large free (up to 32 MB), so later float copies come from the
    heap and, freed, stay resident: measured 2.6x the int4 size for a 4-layer 1024-wide LLaMA built layer by
    layer, 1.07x with a trim after each layer. Quantising three 1024x2816 bf16 Linear layers with quanto leaves
    73 MB of such garbage for 17 MB of weights until the next trim.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)
